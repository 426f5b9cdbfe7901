"""Policies, judge and oracle on OpenAI-compatible inference engines (models.<key>.endpoint).

The real llama_cpp.server on 127.0.0.1 serves both default models, reached through the real
openai client (via counting proxies: two replicas of one server); vLLM's response shape is served
by tests/vllm_shape_server.py, computed by the real model in process.
"""

from __future__ import annotations

import json
import math
import subprocess

import pytest

from conftest import run_script, small_config, write_config

N = 2


def engine_config(data_dir, urls: dict, engine: str = "llama_cpp", **overrides) -> dict:
    """Every policy on an engine (temperature 1.0: engines give raw log-probabilities)."""
    cfg = small_config(data_dir, **overrides)
    for key, m in cfg["models"].items():
        first, *more = urls[key]
        m["endpoint"] = {"engine": engine, "model": key, "base_url": first, "more_base_urls": more,
                         "api_key_env": None, "check_prompts": 2}
    for p in cfg["policies"]:
        p["temperature"] = 1.0
    return cfg


@pytest.fixture(scope="module")
def llama_servers(tmp_path_factory):
    """llama_cpp.server for each default model, as the pipeline manages it (one numeric path);
    one server per model, since a server with several loads one model at a time."""
    from ope_prep.backends.providers import managed_server
    from ope_prep.config import load_config
    base = tmp_path_factory.mktemp("engine_server")
    config = load_config(write_config(base / "config.yaml", small_config(base / "data")))
    servers = {key: managed_server(config, [key], f"engine_test_{key}") for key in config.models}
    try:
        yield {key: server.start() for key, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()


def in_process(model_key: str, n_seq: int = 2):
    from ope_prep.backends.providers import local_model
    from ope_prep.config import load_config
    return local_model(load_config(), model_key, n_seq)


def stop_set(model, record: dict, base: dict | None = None):
    """The end-of-generation set when record (a response, or a teacher-forced record of `base`'s
    response) ends in the stop: that value is the stop event's (ope_prep/events.py)."""
    stops = (base or record)["finish_reason"] == "stop" and (base is None or record["complete"])
    return model.chat.end_of_generation_tokens() if stops else None


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_stage_on_engines_agrees_with_in_process_and_a_rerun_asks_only_the_check(llama_servers, tmp_path):
    """SmolLM2 on two replicas (counting proxies in front of one server), Gemma on its own server
    with teacher forcing in process (llama-cpp-python's echo sorts Gemma's 262k-token vocabulary
    in Python for every listed token: minutes per run here); judge and oracle on the servers."""
    from fault_proxy import FaultProxy
    smol, gemma = llama_servers["smollm2_135m"].base_url, llama_servers["gemma3_270m"].base_url
    with FaultProxy(smol[:-len("/v1")], fail_rate=0) as a, FaultProxy(smol[:-len("/v1")], fail_rate=0) as b, \
            FaultProxy(gemma[:-len("/v1")], fail_rate=0) as g:
        urls = {"smollm2_135m": [a.url + "/v1", b.url + "/v1"], "gemma3_270m": [g.url + "/v1"]}
        cfg = engine_config(tmp_path / "data", urls)
        cfg["models"]["gemma3_270m"]["endpoint"]["teacher_force"] = False
        cfg["judge"].update(provider="openai", base_url=a.url + "/v1", api_key_env=None, grammar=True)
        cfg["oracle"].update(provider="openai", base_url=g.url + "/v1", api_key_env=None, grammar=True)
        # A text engine cannot return a sampled token sequence that is not its text's canonical
        # tokenization: such a unit is quarantined, and its prompt left out (asserted below).
        cfg["validation"]["max_excluded_fraction"] = 0.5
        cfg["run"]["retry_wait_s"] = 1
        config = write_config(tmp_path / "config.yaml", cfg)
        proc = run_script("run_pipeline.py", str(N), "--config", str(config), timeout=1500)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out = proc.stdout + proc.stderr
        assert out.count("engine check: models.") >= 4 and "REFUSED" not in out
        def posted() -> int:      # requests (not the GETs of the engines' fingerprints)
            return len(a.requests_log) + len(b.requests_log) + len(g.requests_log)
        sent = posted()
        # requests were spread over both replicas, and were in flight together
        assert a.counts["forwarded"] > 0 and b.counts["forwarded"] > 0
        assert max(a.max_inflight, b.max_inflight) >= 2, (a.max_inflight, b.max_inflight)

        data = tmp_path / "data"
        prompts = {p["prompt_id"]: p["prompt"] for p in read(data / "prompts.jsonl")}
        responses = read(data / "responses.jsonl")
        records = read(data / "logprobs.jsonl")
        by_key = {(r["prompt_id"], r["policy"]): r for r in responses}
        policies = {p["name"]: p for p in cfg["policies"]}
        info = json.loads((data / "dataset_info.json").read_text())
        excluded = info["run"]["excluded_prompts"]
        assert len(excluded) < N      # at least one prompt went all the way
        for units in excluded.values():
            assert all("not the local tokenizer's tokens of the text" in u["error"] for u in units), units
        assert len(responses) >= (N - len(excluded)) * len(policies)
        for model_key in ("smollm2_135m", "gemma3_270m"):
            model = in_process(model_key)
            try:
                # the engine's sampling log-probabilities are the in-process model's
                for r in (r for r in responses if policies[r["policy"]]["model"] == model_key):
                    pol = policies[r["policy"]]
                    prompt = model.chat.prompt_tokens(pol["system_prompt"], prompts[r["prompt_id"]])
                    local = model.teacher_force(prompt, r["token_ids"], 1.0, stop_set(model, r))
                    assert max(abs(x - y) for x, y in zip(local, r["token_logprobs"])) < 1e-3, r["prompt_id"]
                # and so are its teacher-forced ones
                for t in (t for t in records if policies[t["policy"]]["model"] == model_key):
                    pol = policies[t["policy"]]
                    prompt = model.chat.prompt_tokens(pol["system_prompt"], prompts[t["prompt_id"]])
                    local = model.teacher_force(prompt, t["token_ids"], 1.0,
                                                stop_set(model, t, by_key[(t["prompt_id"], "p0")]))
                    assert math.isclose(math.fsum(local), t["logprob"], abs_tol=1e-3 * len(local))
            finally:
                model.close()
        assert info["checks"]["passed"]
        cost = {(r["stage"], r["model"]): r for r in info["cost"]}
        # the usage of the stage's last attempt: after a quarantine retry, its replies came from the cache
        generate = cost[("generate", "smollm2_135m")]
        assert generate["calls"] + generate["cached"] > 0
        assert "## Cost" in (data / "report.md").read_text()

        # Stage 2 again from nothing but its request caches (its work lost; not --force-step,
        # which supersedes the caches too and asks again): every request is answered from them.
        # Only the engine check is asked again (it never answers from the cache): its requests are
        # the lines its cache files gained.
        from ope_prep import checkpoint

        def check_lines() -> int:
            return sum(len(p.read_text().splitlines()) for p in (data / "cache").glob("*_check_api_cache.jsonl"))
        before, checks_before = (data / "responses.jsonl").read_bytes(), check_lines()
        (data / "work" / "generate.jsonl").unlink()
        checkpoint.forget(data, ["generate"])
        proc = run_script("run_pipeline.py", str(N), "--config", str(config), timeout=1500)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        asked = posted() - sent
        assert 0 < asked == check_lines() - checks_before
        assert (data / "responses.jsonl").read_bytes() == before


SHIFTING_TEMPLATE = (   # ChatML without <|im_start|>: starts with text, not SmolLM2's BOS token
    "{% for m in messages %}{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}assistant\n{% endif %}")


def test_an_engine_whose_echo_is_misaligned_is_refused(llama_servers, tmp_path):
    """llama-cpp-python's echo reads each token's value from the logits after it when the prompt
    does not start with BOS: the check sees it and refuses the engine for teacher forcing."""
    urls = {k: [server.base_url] for k, server in llama_servers.items()}
    cfg = engine_config(tmp_path / "data", urls)
    cfg["models"]["smollm2_135m"]["chat_template"] = SHIFTING_TEMPLATE
    cfg["policies"] = [p for p in cfg["policies"] if p["name"] in ("p0", "pi_clone")]
    config = write_config(tmp_path / "config.yaml", cfg)
    proc = run_script("run_pipeline.py", "--check-providers", "--config", str(config))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "models.smollm2_135m.endpoint: REFUSED" in proc.stdout
    assert "echo is misaligned" in proc.stdout and "teacher_force: false" in proc.stdout

    run_script("01_prepare_data.py", "--config", str(config), "--samples", "1", check=True)
    proc = run_script("02_generate_responses.py", "--config", str(config))
    assert proc.returncode == 2 and "echo is misaligned" in proc.stderr, proc.stdout + proc.stderr
    assert not (tmp_path / "data" / "responses.jsonl").exists()

    # Teacher forcing in process instead: the engine's generation agrees with it. A judge behind an
    # endpoint is probed with one unit: read with a distribution, or refused.
    cfg["models"]["smollm2_135m"]["endpoint"]["teacher_force"] = False
    cfg["judge"].update(provider="openai", base_url=urls["smollm2_135m"][0], api_key_env=None, grammar=True)
    write_config(config, cfg)
    proc = run_script("run_pipeline.py", "--check-providers", "--config", str(config))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "models.smollm2_135m.endpoint: ok" in proc.stdout and "(in process)" in proc.stdout
    assert "judge (openai smollm2_135m): ok: answered" in proc.stdout

    from fault_proxy import ScriptedChatServer
    with ScriptedChatServer(lambda body: "I would rather not rate this.") as stub:
        cfg["oracle"].update(provider="openai", base_url=stub.url + "/v1", model="scripted", api_key_env=None)
        write_config(config, cfg)
        proc = run_script("run_pipeline.py", "--check-providers", "--config", str(config))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "oracle (openai scripted): REFUSED: unparsable" in proc.stdout, proc.stdout


@pytest.fixture(scope="module")
def vllm_server():
    from vllm_shape_server import VllmShapeServer
    models = {k: in_process(k, n_seq=1) for k in ("smollm2_135m", "gemma3_270m")}
    with VllmShapeServer(models) as server:
        yield server
    for m in models.values():
        m.close()


def test_vllm_prompt_logprobs_and_token_ids_give_the_in_process_values(vllm_server, tmp_path):
    urls = {k: [vllm_server.url + "/v1"] for k in ("smollm2_135m", "gemma3_270m")}
    cfg = engine_config(tmp_path / "data", urls, engine="vllm")
    config = write_config(tmp_path / "config.yaml", cfg)
    for script, extra in (("01_prepare_data.py", ["--samples", str(N)]), ("02_generate_responses.py", []),
                          ("02b_compute_logprobs.py", [])):
        run_script(script, "--config", str(config), *extra, check=True)
    data = tmp_path / "data"
    prompts = {p["prompt_id"]: p["prompt"] for p in read(data / "prompts.jsonl")}
    policies = {p["name"]: p for p in cfg["policies"]}
    responses = {(r["prompt_id"], r["policy"]): r for r in read(data / "responses.jsonl")}
    for t in read(data / "logprobs.jsonl"):
        pol = policies[t["policy"]]
        model = vllm_server.models[pol["model"]]
        prompt = model.chat.prompt_tokens(pol["system_prompt"], prompts[t["prompt_id"]])
        stops = stop_set(model, t, responses[(t["prompt_id"], "p0")])
        assert t["token_logprobs"] == pytest.approx(model.teacher_force(prompt, t["token_ids"], 1.0, stops), abs=1e-9)
    for (pid, name), r in responses.items():
        model = vllm_server.models[policies[name]["model"]]
        prompt = model.chat.prompt_tokens(policies[name]["system_prompt"], prompts[pid])
        assert r["token_logprobs"] == pytest.approx(model.teacher_force(prompt, r["token_ids"], 1.0,
                                                                        stop_set(model, r)), abs=1e-9)
    sent = vllm_server.requests_log
    assert all(isinstance(q["prompt"], list) for q in sent)          # token ids, never text
    tf = [q for q in sent if "prompt_logprobs" in q]
    assert tf and all(q["max_tokens"] == 1 for q in tf)              # 0 is refused by vLLM


def test_the_budget_cap_stops_generation_cleanly_and_a_rerun_does_only_the_rest(vllm_server, tmp_path):
    urls = {k: [vllm_server.url + "/v1"] for k in ("smollm2_135m", "gemma3_270m")}
    cfg = engine_config(tmp_path / "data", urls, engine="vllm")
    for m in cfg["models"].values():
        m["endpoint"].update(usd_per_1k_input_tokens=1.0, usd_per_1k_output_tokens=1.0, budget_usd=0.5,
                             concurrency=1)
    config = write_config(tmp_path / "config.yaml", cfg)
    run_script("01_prepare_data.py", "--config", str(config), "--samples", "3", check=True)
    proc = run_script("02_generate_responses.py", "--config", str(config))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "models.smollm2_135m.endpoint.budget_usd" in proc.stderr and "are done and saved" in proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "data" / "work" / "generate.jsonl").read_text().splitlines()[1:]]
    done = {r["key"] for r in rows if r["status"] == "ok"}
    assert 0 < len(done) < 3 * len(cfg["policies"]), len(done)

    for m in cfg["models"].values():
        m["endpoint"]["budget_usd"] = 100.0
    write_config(config, cfg)
    asked = len(vllm_server.requests_log)
    run_script("02_generate_responses.py", "--config", str(config), check=True)
    new = vllm_server.requests_log[asked:]
    check_seeds = {42, 43}     # run.seed + i: the engine check's (gemma's runs now for the first time)
    generated = [q for q in new if "prompt_logprobs" not in q and q["seed"] not in check_seeds]
    # only the units not done are asked (fewer when a reply paid before the stop is in the cache)
    assert 0 < len(generated) <= 3 * len(cfg["policies"]) - len(done)
    rows = [json.loads(line) for line in (tmp_path / "data" / "work" / "generate.jsonl").read_text().splitlines()[1:]]
    assert len({r["key"] for r in rows if r["status"] == "ok"}) == 3 * len(cfg["policies"])


def test_a_policy_on_an_engine_must_have_temperature_1(tmp_path):
    cfg = engine_config(tmp_path / "data", {k: ["http://127.0.0.1:9/v1"] for k in ("smollm2_135m", "gemma3_270m")})
    cfg["policies"][2]["temperature"] = 0.7
    config = write_config(tmp_path / "config.yaml", cfg)
    proc = run_script("01_prepare_data.py", "--config", str(config), "--samples", "1")
    assert proc.returncode == 2
    assert "policies.2.temperature" in proc.stderr and "temperature 1" in proc.stderr, proc.stderr
    assert not (tmp_path / "data").exists()


def test_the_engine_check_asks_every_replica_every_time_and_refuses_one_that_is_down_or_truncates(
        llama_servers, tmp_path):
    """Before: the check's requests were answered from the request cache (it passed with the
    server shut down), replicas were never checked one by one, and a server that truncated
    sampling despite the request passed. Two replicas of SmolLM2 (proxies in front of the real
    llama_cpp.server): each is asked by itself, on every run; a replica whose requests reach the
    server with top_k 10 or a stop string, or one that is down, refuses the engine, naming it.
    (A stop that is not the model's, on an engine that hides it: see the vLLM test below.)"""
    from fault_proxy import FaultProxy, RewritingProxy
    smol = llama_servers["smollm2_135m"].base_url[:-len("/v1")]
    with FaultProxy(smol, fail_rate=0) as a, FaultProxy(smol, fail_rate=0) as b, \
            RewritingProxy(smol, {"top_k": 10}) as t, RewritingProxy(smol, {"stop": ["."]}) as s:
        def check(*replicas) -> tuple[int, str]:
            urls = {"smollm2_135m": [r.url + "/v1" for r in replicas], "gemma3_270m": ["http://127.0.0.1:9/v1"]}
            cfg = engine_config(tmp_path / "data", urls, **{"generation.max_tokens": 48})
            cfg["policies"] = [p for p in cfg["policies"] if p["name"] in ("p0", "pi_clone")]
            cfg["models"]["smollm2_135m"]["endpoint"].update(check_prompts=5, max_attempts=1)
            config = write_config(tmp_path / "config.yaml", cfg)
            proc = run_script("run_pipeline.py", "--check-providers", "--config", str(config))
            return proc.returncode, proc.stdout + proc.stderr

        code, out = check(a, b)
        assert code == 0, out
        assert "models.smollm2_135m.endpoint: ok: each replica by itself" in out
        assert out.count("sampling from the whole distribution") == 2 and "outside the top 20" in out
        first = (a.counts["forwarded"], b.counts["forwarded"])
        assert min(first) >= 5                       # 5 check prompts, on each replica

        # the check comes first (the honest replica after it is not asked once one is refused)
        code, out = check(t, a)
        assert code == 2, out
        assert f"models.smollm2_135m.endpoint: REFUSED: each replica by itself: {t.url}/v1: " in out, out
        assert "truncates sampling despite the request" in out and t.counts["forwarded"] > 0
        code, out = check(s, a)      # llama-cpp-python lists the token that ends the stop string
        assert code == 2 and f"{s.url}/v1: a check request failed: the returned tokens" in out, out

        b.close()                # down: the same check again is asked anew, not answered from the cache
        code, out = check(b, a)
        assert code == 2 and "REFUSED" in out and f"{b.url}/v1: a check request failed" in out, out
        assert a.counts["forwarded"] == first[0]


def test_the_engine_check_refuses_an_engine_that_stops_where_the_model_does_not(vllm_server, tmp_path):
    """An engine with stop tokens of its own (vLLM's stop_token_ids " the" and " of", set on the
    way by a proxy): every token's value is right, but responses end where the model would not
    end. Before, the stop's value was compared with itself and such an engine passed."""
    from fault_proxy import RewritingProxy
    chat = vllm_server.models["smollm2_135m"].chat
    ids = [chat.tokenize_text(w)[0] for w in (" the", " of")]
    urls = {k: [vllm_server.url + "/v1"] for k in ("smollm2_135m", "gemma3_270m")}
    cfg = engine_config(tmp_path / "data", urls, engine="vllm", **{"generation.max_tokens": 64})
    cfg["policies"] = [p for p in cfg["policies"] if p["name"] in ("p0", "pi_clone")]
    cfg["models"]["smollm2_135m"]["endpoint"]["check_prompts"] = 5
    config = write_config(tmp_path / "config.yaml", cfg)
    proc = run_script("run_pipeline.py", "--check-providers", "--config", str(config))
    assert proc.returncode == 0 and "ends where the model ends" in proc.stdout, proc.stdout + proc.stderr
    assert "sampling from the whole distribution" in proc.stdout
    with RewritingProxy(vllm_server.url, {"stop_token_ids": ids}) as s:
        cfg["models"]["smollm2_135m"]["endpoint"]["base_url"] = s.url + "/v1"
        write_config(config, cfg)
        proc = run_script("run_pipeline.py", "--check-providers", "--config", str(config))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"REFUSED: {s.url}/v1: the engine ends responses where the model does not" in proc.stdout, proc.stdout


def smol_on_engine(data_dir, engine: str, base_url: str, **endpoint) -> dict:
    """The small default with SmolLM2 (p0, pi_clone, pi_bad) on an engine, Gemma in process."""
    cfg = small_config(data_dir)
    cfg["models"]["smollm2_135m"]["endpoint"] = {"engine": engine, "model": "smollm2_135m", "base_url": base_url,
                                                 "api_key_env": None, "check_prompts": 2, **endpoint}
    return cfg


def assert_values_are_the_models(data, cfg: dict, models: dict, tolerance: float) -> int:
    """Every response's and teacher-forced record's values on models (the engine's) are the in-
    process model's at the policy's temperature; returns the records compared."""
    prompts = {p["prompt_id"]: p["prompt"] for p in read(data / "prompts.jsonl")}
    policies = {p["name"]: p for p in cfg["policies"]}
    responses = {(r["prompt_id"], r["policy"]): r for r in read(data / "responses.jsonl")}
    compared = 0
    for r, base in [(r, None) for r in responses.values()] + [
            (t, responses[(t["prompt_id"], cfg["base_policy"])]) for t in read(data / "logprobs.jsonl")]:
        pol = policies[r["policy"]]
        if pol["model"] not in models:
            continue
        model = models[pol["model"]]
        prompt = model.chat.prompt_tokens(pol["system_prompt"], prompts[r["prompt_id"]])
        local = model.teacher_force(prompt, r["token_ids"], pol["temperature"], stop_set(model, r, base))
        assert r["token_logprobs"] == pytest.approx(local, abs=tolerance), (r["prompt_id"], r["policy"])
        compared += 1
    return compared


def test_a_policy_at_temperature_0_7_on_vllm_needs_processed_logprobs_and_then_passes_stage_5(vllm_server, tmp_path):
    """SmolLM2's three policies at T 0.7 on vLLM, teacher-forced in process. vLLM's default
    --logprobs-mode (raw_logprobs) returns the raw logits' value of a token sampled at 0.7: the
    engine check refuses it; with processed_logprobs every stage passes and the values are the
    model's at 0.7."""
    from vllm_shape_server import VllmShapeServer
    smol = {"smollm2_135m": vllm_server.models["smollm2_135m"]}
    cfg = smol_on_engine(tmp_path / "data", "vllm", vllm_server.url + "/v1", teacher_force=False)
    assert {p["temperature"] for p in cfg["policies"]} == {0.7}
    config = write_config(tmp_path / "config.yaml", cfg)
    proc = run_script("run_pipeline.py", "--check-providers", "--config", str(config))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert ("models.smollm2_135m.endpoint: REFUSED" in proc.stdout and "disagree by up to" in proc.stdout
            and "(in process)" in proc.stdout), proc.stdout
    with VllmShapeServer(smol, logprobs_mode="processed_logprobs") as processed:
        cfg["models"]["smollm2_135m"]["endpoint"]["base_url"] = processed.url + "/v1"
        write_config(config, cfg)
        proc = run_script("run_pipeline.py", str(N), "--config", str(config), timeout=1500)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert all(q["temperature"] == 0.7 for q in processed.requests_log)
    data = tmp_path / "data"
    assert json.loads((data / "dataset_info.json").read_text())["checks"]["passed"]
    assert assert_values_are_the_models(data, cfg, smol, 1e-9) >= N * 3 * 2


@pytest.mark.parametrize("engine", ["sglang", "tgi"])
def test_sglang_and_tgi_native_routes_give_the_in_process_values(vllm_server, engine, tmp_path):
    """SmolLM2 on a server answering in SGLang's or TGI's documented shape (neither runs on these
    machines), sampling and teacher forcing on the engine: every value recorded is the model's,
    the stop event's included (the engine returns the stop token with its own value)."""
    from vllm_shape_server import SglangShapeServer, TgiShapeServer
    smol = {"smollm2_135m": vllm_server.models["smollm2_135m"]}
    with {"sglang": SglangShapeServer, "tgi": TgiShapeServer}[engine](smol) as server:
        cfg = smol_on_engine(tmp_path / "data", engine, server.url)
        cfg["generation"]["max_tokens"] = 64
        for p in cfg["policies"]:
            p["temperature"] = 1.0 if p["model"] == "smollm2_135m" else p["temperature"]
        cfg["validation"]["max_excluded_fraction"] = 0.5
        config = write_config(tmp_path / "config.yaml", cfg)
        proc = run_script("run_pipeline.py", "--check-providers", "--config", str(config))
        assert proc.returncode == 0 and "models.smollm2_135m.endpoint: ok" in proc.stdout, proc.stdout + proc.stderr
        for script, extra in (("01_prepare_data.py", ["--samples", str(N)]), ("02_generate_responses.py", []),
                              ("02b_compute_logprobs.py", [])):
            run_script(script, "--config", str(config), *extra, check=True)
        sent = list(server.requests_log)
        # stage 2 again from its request cache alone: only the engine check asks the server
        from ope_prep import checkpoint
        data = tmp_path / "data"
        before = (data / "responses.jsonl").read_bytes()
        (data / "work" / "generate.jsonl").unlink()
        checkpoint.forget(data, ["generate"])
        run_script("02_generate_responses.py", "--config", str(config), check=True)
        again = server.requests_log[len(sent):]
        seeds = [q["sampling_params"].get("sampling_seed") if engine == "sglang" else q["parameters"].get("seed")
                 for q in again]
        check_seeds = {42 + i for i in range(2)}     # run.seed + i: the engine check's 2 prompts
        assert again and all(seed in check_seeds or seed is None for seed in seeds), seeds
        assert (data / "responses.jsonl").read_bytes() == before
    assert assert_values_are_the_models(tmp_path / "data", cfg, smol, 1e-6) >= 2 * 3
    responses = read(tmp_path / "data" / "responses.jsonl")
    assert any(r["finish_reason"] == "stop" for r in responses)     # a stop event was computed
    if engine == "sglang":
        assert all(isinstance(q["input_ids"], list) for q in sent)
        assert any(q["sampling_params"]["max_new_tokens"] == 0 for q in sent)     # teacher forcing
    else:
        assert all(isinstance(q["inputs"], str) and q["parameters"]["decoder_input_details"] for q in sent)
        assert all((q["parameters"].get("top_n_tokens") or 0) <= 5 for q in sent)


def test_a_replica_down_at_the_start_is_dropped_and_an_outage_is_waited_out(vllm_server, tmp_path):
    """One replica of SmolLM2's engine down at stage 2's start: it is dropped, with a line, and the
    other serves the stage. Every replica of an engine down: checked again with backoff up to
    endpoint.outage_wait_minutes, then the stage stops (exit 3, not 2: nothing is wrong with the
    run), with one line."""
    dead = "http://127.0.0.1:9/v1"
    urls = {"smollm2_135m": [dead, vllm_server.url + "/v1"], "gemma3_270m": [vllm_server.url + "/v1"]}
    cfg = engine_config(tmp_path / "data", urls, engine="vllm")
    for m in cfg["models"].values():
        m["endpoint"].update(max_attempts=1, check_prompts=1)
    config = write_config(tmp_path / "config.yaml", cfg)
    run_script("01_prepare_data.py", "--config", str(config), "--samples", "1", check=True)
    proc = run_script("02_generate_responses.py", "--config", str(config))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"models.smollm2_135m.endpoint: replica {dead} dropped for this stage" in proc.stderr
    assert len(read(tmp_path / "data" / "responses.jsonl")) == len(cfg["policies"])

    cfg["models"]["gemma3_270m"]["endpoint"].update(base_url=dead, outage_wait_minutes=0.02)
    write_config(config, cfg)
    proc = run_script("02_generate_responses.py", "--config", str(config), "--force")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "models.gemma3_270m.endpoint: every replica is down" in proc.stderr
    assert "checking again in 1s" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: models.gemma3_270m.endpoint: every replica stayed down for endpoint.outage_wait_minutes (0.02)")


def smol_at_t1_on(data_dir, engine: str, base_url: str, **endpoint) -> dict:
    """`smol_on_engine` with SmolLM2's policies at temperature 1 (raw values are theirs), one prompt."""
    cfg = smol_on_engine(data_dir, engine, base_url, **endpoint)
    for p in cfg["policies"]:
        p["temperature"] = 1.0 if p["model"] == "smollm2_135m" else p["temperature"]
    return cfg


def test_a_server_that_changed_what_it_serves_since_the_runs_first_check_is_refused(vllm_server, tmp_path):
    """Before: the engine check compared each replica with itself, at each stage's start, so a
    server restarted between stage 2 and 2b with another model under the same served name (another
    weights file, a sharper fine-tune) passed it, and 2b's records came from another model than
    stage 2's. Now stage 2's check keeps the server's fingerprint (vLLM's /v1/models) and its check
    values in <data_dir>/engine_canary/; stage 2b's check refuses, naming the replica and what
    changed, and the unchanged server passes."""
    from vllm_shape_server import Sharpened, VllmShapeServer
    smol = {"smollm2_135m": vllm_server.models["smollm2_135m"]}
    first = VllmShapeServer(smol)
    port, url = first.port, first.url + "/v1"
    cfg = smol_at_t1_on(tmp_path / "data", "vllm", url)
    config = write_config(tmp_path / "config.yaml", cfg)
    data = tmp_path / "data"
    try:
        run_script("01_prepare_data.py", "--config", str(config), "--samples", "1", check=True)
        run_script("02_generate_responses.py", "--config", str(config), check=True)
    finally:
        first.close()

    def stage_2b(model, **about) -> subprocess.CompletedProcess:
        with VllmShapeServer({"smollm2_135m": model}, about=about, port=port):     # restarted
            return run_script("02b_compute_logprobs.py", "--config", str(config))

    proc = stage_2b(smol["smollm2_135m"], root="/models/SmolLM2-135M-Instruct-Q8_0")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    canary = json.loads((data / "engine_canary" / "smollm2_135m.json").read_text())
    assert canary["replica"] == url and canary["identity"]["root"] == "/models/smollm2_135m"
    assert len(canary["samples"]) == 2 and all(s["tokens"] for s in canary["samples"].values())
    assert (f"models.smollm2_135m.endpoint: REFUSED: {url}: says it serves another model or build than this "
            f"run's first engine check ({url}, {canary['checked_at']}): root '/models/smollm2_135m' -> "
            "'/models/SmolLM2-135M-Instruct-Q8_0'") in proc.stderr, proc.stderr
    assert "engine_canary/smollm2_135m.json aside" in proc.stderr
    assert not (data / "logprobs.jsonl").exists()

    proc = stage_2b(Sharpened(smol["smollm2_135m"], 1.3))        # the same name and fingerprint, other weights
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"REFUSED: {url}: " in proc.stderr, proc.stderr
    assert ("gives other log-probabilities for the same tokens than this run's first engine check" in proc.stderr
            or "samples other tokens than this run's first engine check" in proc.stderr), proc.stderr
    assert not (data / "logprobs.jsonl").exists()

    proc = stage_2b(smol["smollm2_135m"])                        # what the first check saw: it passes
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "models.smollm2_135m.endpoint: ok" in proc.stderr and (data / "logprobs.jsonl").exists()
    assert json.loads((data / "engine_canary" / "smollm2_135m.json").read_text()) == canary

    (data / "engine_canary" / "smollm2_135m.json").write_text('{"version": 1, "model_key": "smollm2_135m"}')
    proc = run_script("run_pipeline.py", "--check-providers", "--config", str(config))
    assert proc.returncode == 2 and "engine_canary/smollm2_135m.json: not an engine canary" in proc.stderr, \
        proc.stdout + proc.stderr


def test_replicas_that_serve_different_models_are_refused_without_credentials_shown(
        vllm_server, tmp_path):
    """Before: each replica was compared with itself only, so a list of replicas of which one
    serves another build or other weights under the same name passed. The first replica's check
    is now the others' canary (no stage has run: --check-providers)."""
    from vllm_shape_server import Sharpened, VllmShapeServer
    model = vllm_server.models["smollm2_135m"]
    with VllmShapeServer({"smollm2_135m": model}) as a, VllmShapeServer({"smollm2_135m": model}) as b, \
            VllmShapeServer({"smollm2_135m": Sharpened(model, 1.3)}) as c, \
            VllmShapeServer({"smollm2_135m": model}, about={"max_model_len": 4096}) as d:
        def check(*replicas) -> tuple[int, str]:
            first, *more = [r.url.replace("http://", "http://user:secret@") + "/v1" for r in replicas]
            cfg = smol_at_t1_on(tmp_path / "data", "vllm", first, more_base_urls=more)
            config = write_config(tmp_path / "config.yaml", cfg)
            proc = run_script("run_pipeline.py", "--check-providers", "--config", str(config))
            return proc.returncode, proc.stdout + proc.stderr

        code, out = check(a, b)
        assert code == 0 and "models.smollm2_135m.endpoint: ok: each replica by itself" in out, out
        code, out = check(a, c)
        assert code == 2, out
        assert (f"models.smollm2_135m.endpoint: REFUSED: each replica by itself: {c.url}/v1: gives other "
                f"log-probabilities for the same tokens than this run's first engine check ({a.url}/v1") in out \
            or f"{c.url}/v1: samples other tokens than this run's first engine check ({a.url}/v1" in out, out
        assert "must serve the same model on the same build" in out
        code, out = check(a, d)
        assert code == 2 and f"{d.url}/v1: says it serves another model or build" in out, out
        assert "max_model_len '2048' -> '4096'" in out
        assert "secret" not in out
    assert not (tmp_path / "data" / "engine_canary").exists()     # --check-providers keeps nothing
