"""The request caches' files as a whole: the spend a cache records, and moving a stage's caches
aside when it is redone (``--force``), the spend carried over. The cache itself is written by
http.ApiClient."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..store import atomic_write_bytes, failed_row

CACHE_VERSION = "api-cache-v1"


def ledger_total(path: Path) -> float:
    """Dollars a request cache records as paid: every reply (usable or not), and the spend
    carried over from caches superseded before it (`supersede_caches`). A line that does not
    parse (a torn last line, not yet cut) counts nothing."""
    total = 0.0
    for line in path.read_bytes().splitlines():
        try:
            row = json.loads(line)
            if "_header" in row:
                continue
            total += float(row.get("usd", 0.0) if row["status"] != "ok" else row["record"].get("usd", 0.0))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return total


def supersede_caches(data_dir: Path, stage: str, dest: Path) -> list[str]:
    """A forced redo of ``stage`` must ask again, not be answered from its old replies: each of
    its request caches (``<data_dir>/cache/<stage>_*api_cache.jsonl``) is copied to ``dest``
    (with the stage's superseded work) and replaced, in one rename, by a cache holding only one
    ledger line with the spend it recorded, so money already paid still counts against the
    budget. Returns the caches moved (relative to data_dir)."""
    moved = []
    for path in sorted((data_dir / "cache").glob(f"{stage}_*api_cache.jsonl")):
        rel = path.relative_to(data_dir)
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        spent = ledger_total(path)
        header = {"_header": {"fingerprint": {"cache": CACHE_VERSION, "stage": stage}}}
        ledger = failed_row(f"ledger:{target.relative_to(data_dir)}", "spend of superseded replies, "
                            f"carried over (the replies are in {target.relative_to(data_dir)})", usd=spent)
        atomic_write_bytes(path, "".join(json.dumps(r, separators=(",", ":")) + "\n"
                                         for r in (header, ledger)).encode())
        moved.append(str(rel))
    return moved
