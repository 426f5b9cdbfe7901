"""Shared test helpers: small configs over the real models, and running the real scripts."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


def default_config() -> dict:
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def small_config(data_dir: Path, **overrides) -> dict:
    """The embedded default made small: absolute model paths, short responses."""
    cfg = copy.deepcopy(default_config())
    cfg["paths"]["data_dir"] = str(data_dir)
    for m in cfg["models"].values():
        m["path"] = str(ROOT / m["path"])
        m["n_ctx"] = 2048    # the judge prompt (rubric, worked examples, texts) needs ~1000+
    cfg["generation"]["max_tokens"] = 12
    cfg["generation"]["batch_size"] = 2
    cfg["source"]["max_prompt_chars"] = 600
    for key, value in overrides.items():
        _set(cfg, key, value)
    return cfg


def _set(cfg: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    node = cfg
    for part in path:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def write_config(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_script(script: str, *args: str, timeout: float = 900, env: dict | None = None,
               check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def tmp_config(tmp_path):
    """A function: tmp_config(**overrides) -> path of a small config in tmp_path."""
    def make(name: str = "config.yaml", **overrides) -> Path:
        return write_config(tmp_path / name, small_config(tmp_path / "data", **overrides))
    return make


N = 3                                   # prompts in the small end-to-end runs
SECRET_MARKER = "sk-test-MARKER-9f3e1c"  # must never appear in any file a run writes


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """An uninterrupted run: the outputs every other run must reproduce."""
    from pipeline_harness import run
    base = tmp_path_factory.mktemp("reference")
    config = write_config(base / "config.yaml", small_config(base / "data"))
    trace = base / "trace.tsv"
    proc = run(config, N, trace, env={"OPENAI_API_KEY": SECRET_MARKER})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return base, config, trace, proc


