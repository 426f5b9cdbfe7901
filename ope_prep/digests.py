"""File digests, remembered: a model's or a data file's sha256 is computed once per (path, size,
mtime), not at every stage start."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

DIGEST_CACHE = Path(os.environ.get("OPE_PREP_DIGEST_CACHE",
                                   Path.home() / ".cache" / "ope_prep" / "file_digests.json"))


def file_sha256(path: Path) -> str:
    """A file's sha256, remembered per (path, size, mtime) in ~/.cache/ope_prep/file_digests.json,
    so a multi-GB model is hashed once, not at every stage start."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        cache = json.loads(DIGEST_CACHE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        cache[key] = h.hexdigest()
        try:
            DIGEST_CACHE.parent.mkdir(parents=True, exist_ok=True)
            tmp = DIGEST_CACHE.with_name(f"{DIGEST_CACHE.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache), encoding="utf-8")
            tmp.replace(DIGEST_CACHE)
        except OSError:
            pass   # only a cache: the digest is still right
    return cache[key]


def files_digest(paths: list[Path]) -> str:
    """sha256 of a file's bytes (of several: of their digests in order), each remembered by
    file_sha256 (hashing a 1.6 GB parquet file takes over a second)."""
    digests = [file_sha256(p) for p in paths]
    return "sha256:" + (digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest())
