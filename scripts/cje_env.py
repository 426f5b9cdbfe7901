#!/usr/bin/env python
"""Create (once) a separate virtual environment holding cje-eval 0.3.x, and print its python.

cje-eval 0.3.0 pins numpy<2.1 and pandas<3, which clash with this project's environment, so it
lives in its own venv under a cache folder and is driven through a subprocess
(see scripts/cje_roundtrip.py).

    python scripts/cje_env.py            # prints the venv's python, e.g. ~/.cache/ope_prep/cje-eval-0.3.0/bin/python

The folder is ``$OPE_PREP_CJE_VENV`` if set, else ``${XDG_CACHE_HOME:-~/.cache}/ope_prep/cje-eval-<version>``.
A venv counts as ready only after a marker file is written at the end of a successful install,
so an interrupted install is redone rather than half-used.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import venv
from pathlib import Path

CJE_VERSION = "0.3.0"          # newest 0.3.x on PyPI (pip index versions cje-eval)
REQUIREMENT = f"cje-eval=={CJE_VERSION}"
MARKER = ".ope_prep_ready"


def venv_dir() -> Path:
    if os.environ.get("OPE_PREP_CJE_VENV"):
        return Path(os.environ["OPE_PREP_CJE_VENV"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "ope_prep" / f"cje-eval-{CJE_VERSION}"


def venv_python(path: Path) -> Path:
    return path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure(quiet: bool = False) -> Path:
    """The python of a venv where ``import cje`` gives cje-eval CJE_VERSION; builds it if needed."""
    path = venv_dir()
    py = venv_python(path)
    marker = path / MARKER
    if marker.is_file() and marker.read_text().strip() == REQUIREMENT and py.is_file():
        return py
    if path.exists():
        shutil.rmtree(path)          # a half-made venv from an interrupted install
    path.parent.mkdir(parents=True, exist_ok=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    out = subprocess.DEVNULL if quiet else None
    subprocess.run([str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q", REQUIREMENT],
                   check=True, stdout=out)
    version = subprocess.run([str(py), "-c", "import cje; print(cje.__version__)"],
                             check=True, capture_output=True, text=True).stdout.strip()
    if version != CJE_VERSION:
        raise SystemExit(f"{path}: installed cje reports version {version}, expected {CJE_VERSION}")
    (path / MARKER).write_text(REQUIREMENT + "\n")
    return py


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quiet", action="store_true", help="hide pip's output")
    args = p.parse_args()
    print(ensure(quiet=args.quiet))


if __name__ == "__main__":
    main()
