"""Stage 5 (validate and summarize) on synthetic runs: diagnostics, exports, every failure rule, the CLI."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_run import BASE, CLONE, POLICIES, PROJECT_DIR, TARGETS, make_run, write_config  # noqa: E402

from ope_prep import checkpoint  # noqa: E402
from ope_prep import diagnostics as dx  # noqa: E402
from ope_prep.config import load_config  # noqa: E402
from ope_prep.errors import ValidationFailed  # noqa: E402
from ope_prep.records import scored_digest  # noqa: E402
from ope_prep.runner import verify_outputs  # noqa: E402
from ope_prep.stages import summarize  # noqa: E402
from ope_prep.store import file_manifest  # noqa: E402

SCRIPT = PROJECT_DIR / "05_validate_and_summarize.py"
N = 40


def run_stage(run):
    config = load_config(run.config_path)
    return summarize.run(config, argparse.Namespace(config=str(run.config_path), force=False), {})


def strict_json(path: Path):
    def no_constants(name):
        raise AssertionError(f"{path} holds {name}")
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=no_constants)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("good"), n=N, seed=1)
    outputs = run_stage(run)
    info = strict_json(run.data_dir / "dataset_info.json")
    return run, outputs, info


# ---- diagnostics, each against a direct computation ---------------------------------------------

def by_key(rows):
    return {(r["prompt_id"], r["policy"]): r for r in rows}


def pearson(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    xc, yc = x - x.mean(), y - y.mean()
    return float((xc * yc).sum() / math.sqrt((xc ** 2).sum() * (yc ** 2).sum()))


def test_weight_diagnostics_match_direct_computation(good):
    run, _, info = good
    pids = [p["prompt_id"] for p in run.rows["prompts.jsonl"]]
    tf, judge = by_key(run.rows["logprobs.jsonl"]), by_key(run.rows["judge_scores.jsonl"])
    s0 = np.array([judge[(p, BASE)]["score"] for p in pids])
    assert set(info["targets"]) == set(TARGETS)
    for t in TARGETS:
        lw = np.array([tf[(p, t)]["logprob"] - tf[(p, BASE)]["logprob"] for p in pids])
        w = np.exp(lw)                 # small enough here to compute naively
        d = info["targets"][t]
        assert d["n"] == N
        assert d["ess_fraction"] == pytest.approx(w.sum() ** 2 / (w ** 2).sum() / N, rel=1e-9)
        assert d["ess"] == pytest.approx(w.sum() ** 2 / (w ** 2).sum(), rel=1e-9)
        assert d["max_weight_share"] == pytest.approx(w.max() / w.sum(), rel=1e-9)
        q50, q90, q99 = np.quantile(lw, [0.5, 0.9, 0.99])
        assert d["log_weight"]["q50"] == pytest.approx(q50, abs=1e-12)
        assert d["log_weight"]["q90"] == pytest.approx(q90, abs=1e-12)
        assert d["log_weight"]["q99"] == pytest.approx(q99, abs=1e-12)
        assert d["log_weight"]["max"] == pytest.approx(lw.max(), abs=1e-12)
        assert d["snips_judge_estimate"] == pytest.approx((w * s0).sum() / w.sum(), rel=1e-9)
    assert info["targets"][CLONE]["ess_fraction"] == pytest.approx(1.0, abs=1e-9)
    assert info["targets"]["pi_bad"]["ess_fraction"] < 0.5


def test_log_space_survives_huge_log_weights():
    lw = np.array([-5000.0, -5001.0, -5003.0])       # exp() underflows to 0 for all of them
    d = dx.weight_diagnostics(lw, np.array([1.0, 0.0, 0.0]))
    w = np.exp(lw - lw.max())
    assert d["ess_fraction"] == pytest.approx(w.sum() ** 2 / (w ** 2).sum() / 3, rel=1e-12)
    assert d["max_weight_share"] == pytest.approx(w.max() / w.sum(), rel=1e-12)
    assert d["snips_judge_estimate"] == pytest.approx(w[0] / w.sum(), rel=1e-12)


def test_pearson_is_undefined_for_a_constant_side():
    # A 20-prompt default run: the oracle answered "1" every time (1/9), the judge's scores varied.
    labels = np.full(5, 1 / 9)
    assert np.std(labels) != 0                        # why the check is not on np.std
    assert dx.pearson(np.array([0.3, 0.1, 0.2, 0.5, 0.4]), labels) is None
    x, y = np.array([0.1, 0.4, 0.2, 0.9]), np.array([0.2, 0.3, 0.1, 0.8])
    assert dx.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])


def test_policy_statistics_match_direct_computation(good):
    run, _, info = good
    pids = [p["prompt_id"] for p in run.rows["prompts.jsonl"]]
    judge, resp = by_key(run.rows["judge_scores.jsonl"]), by_key(run.rows["responses.jsonl"])
    oracle = by_key(run.rows["oracle_labels.jsonl"])
    for pol in POLICIES:
        p = info["policies"][pol]
        s = np.array([judge[(q, pol)]["score"] for q in pids])
        assert p["judge"]["mean"] == pytest.approx(s.mean(), rel=1e-12)
        assert p["judge"]["se"] == pytest.approx(s.std(ddof=1) / math.sqrt(N), rel=1e-9)
        assert p["judge"]["coverage"] == 1.0
        assert p["mean_tokens"] == pytest.approx(np.mean([resp[(q, pol)]["n_tokens"] for q in pids]))
        assert p["fraction_truncated"] == pytest.approx(
            np.mean([resp[(q, pol)]["finish_reason"] == "length" for q in pids]))
        labeled = [q for q in pids if (q, pol) in oracle]
        assert labeled, "the synthetic run labels some of every policy"
        x = [judge[(q, pol)]["score"] for q in labeled]
        y = [oracle[(q, pol)]["label"] for q in labeled]
        o = p["oracle"]
        assert o["split"] == ("calibration" if pol == BASE else "validation")
        assert o["n"] == len(labeled) and o["coverage"] == pytest.approx(len(labeled) / N)
        assert o["pearson_r"] == pytest.approx(pearson(x, y), rel=1e-9)
        assert o["mean_abs_diff"] == pytest.approx(np.mean(np.abs(np.subtract(x, y))), rel=1e-12)
        assert o["mean_label"] == pytest.approx(np.mean(y), rel=1e-12)


def test_checks_section_matches_direct_computation(good):
    run, _, info = good
    pids = [p["prompt_id"] for p in run.rows["prompts.jsonl"]]
    tf, resp = by_key(run.rows["logprobs.jsonl"]), by_key(run.rows["responses.jsonl"])
    worst = lambda a, b: max(abs(x - y) for x, y in zip(a, b))   # noqa: E731 - each record's worst token
    d = np.array([worst(tf[(p, BASE)]["token_logprobs"], resp[(p, BASE)]["token_logprobs"]) for p in pids])
    t = info["checks"]["tf_vs_sampling"]
    assert t["n"] == N and t["n_over"] == 0 and t["token_count_mismatches"] == 0
    assert t["max"] == pytest.approx(d.max(), rel=1e-12) and t["q99"] == pytest.approx(np.quantile(d, 0.99))
    sc = by_key(run.rows["self_consistency.jsonl"])
    for pol in POLICIES:
        ds = np.array([worst(sc[(p, pol)]["token_logprobs"], resp[(p, pol)]["token_logprobs"]) for p in pids])
        got = info["checks"]["self_consistency"][pol]
        assert got["n"] == N and got["max"] == pytest.approx(ds.max(), rel=1e-12)
        assert got["q99"] == pytest.approx(np.quantile(ds, 0.99))
    clone = max(abs(tf[(p, CLONE)]["logprob"] - tf[(p, BASE)]["logprob"]) for p in pids)
    assert info["checks"]["clone"]["max_abs_log_weight"] == pytest.approx(clone, rel=1e-9)
    assert info["checks"]["passed"] is True
    assert info["run"]["seed"] == run.run_json["seed"] == info["run"]["oracle_seed"]
    assert info["run"]["n_prompts"] == N


# ---- outputs -----------------------------------------------------------------------------------------

def test_every_output_has_a_manifest_that_verifies(good):
    run, outputs, _ = good
    for rel in ["report.md", "dataset_info.json", "cje/logged_data.jsonl", "plots/judge_scores.png",
                "plots/judge_vs_oracle_calibration.png", "labeling/oracle_labels_validation_detailed.jsonl",
                *(f"cje/responses/{t}_responses.jsonl" for t in TARGETS),
                *(f"plots/log_weights_{t}.png" for t in TARGETS)]:
        assert rel in outputs
    for rel, manifest in outputs.items():
        assert file_manifest(run.data_dir / rel) == manifest, rel
        if rel.endswith(".png"):
            assert (run.data_dir / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert verify_outputs(run.data_dir, outputs) is None
    # Every file the stage wrote is in the manifest (nothing unrecorded is left behind).
    mine = {"cje", "plots", "labeling", "report.md", "dataset_info.json"} | {
        f for f in summarize.OUTPUTS if "/" not in f}
    written = {str(p.relative_to(run.data_dir)) for p in run.data_dir.rglob("*")
               if p.is_file() and str(p.relative_to(run.data_dir)).split("/")[0] in mine}
    assert written == set(outputs)


def test_cje_logged_data_shape(good):
    run, _, _ = good
    rows = read_jsonl(run.data_dir / "cje/logged_data.jsonl")
    config = load_config(run.config_path)
    prompts = run.rows["prompts.jsonl"]
    tf, judge = by_key(run.rows["logprobs.jsonl"]), by_key(run.rows["judge_scores.jsonl"])
    resp, oracle = by_key(run.rows["responses.jsonl"]), by_key(run.rows["oracle_labels.jsonl"])
    assert [r["prompt_id"] for r in rows] == [p["prompt_id"] for p in prompts]
    for r, p in zip(rows, prompts):
        pid = p["prompt_id"]
        assert r["prompt"] == p["prompt"]
        assert r["response"] == resp[(pid, BASE)]["response"]
        assert r["base_policy_logprob"] == tf[(pid, BASE)]["logprob"]
        assert r["target_policy_logprobs"] == {t: tf[(pid, t)]["logprob"] for t in TARGETS}
        assert r["judge_score"] == judge[(pid, BASE)]["score"]
        if (pid, BASE) in oracle:
            assert r["oracle_label"] == oracle[(pid, BASE)]["label"] == r["metadata"]["oracle_label"]
        else:
            assert "oracle_label" not in r and "oracle_label" not in r["metadata"]
        assert r["metadata"]["prompt_id"] == pid
        assert r["metadata"]["judge_mean"] == judge[(pid, BASE)]["mean"]
        assert r["metadata"]["base_policy_sampling_logprob"] == resp[(pid, BASE)]["sampling_logprob"]
        # CJE's per-token TTC reads the tokens the log-probabilities cover; the sampling design
        # (every base response labeled with this probability) is on every record, labeled or not.
        assert r["metadata"]["response_token_count"] == tf[(pid, BASE)]["n_tokens"]
        assert r["metadata"]["oracle_inclusion_probability"] == config.oracle.calibration_fraction
    assert sum("oracle_label" in r for r in rows) == sum(1 for k in oracle if k[1] == BASE)


def test_fresh_draws_and_phase2_files(good):
    run, _, _ = good
    d = run.data_dir
    judge, resp = by_key(run.rows["judge_scores.jsonl"]), by_key(run.rows["responses.jsonl"])
    oracle, tf = by_key(run.rows["oracle_labels.jsonl"]), by_key(run.rows["logprobs.jsonl"])
    for pol in POLICIES:
        rows = read_jsonl(d / f"cje/responses/{pol}_responses.jsonl")
        assert len(rows) == N
        for r in rows:
            k = (r["prompt_id"], pol)
            assert r["policy"] == pol and r["draw_idx"] == 0 and r["observation_id"] == f"{k[0]}/{pol}"
            assert r["response"] == resp[k]["response"] and r["judge_score"] == judge[k]["score"]
    det, unc = read_jsonl(d / "p0_scored_deterministic.jsonl"), read_jsonl(d / "p0_scored_uncertainty.jsonl")
    assert len(det) == len(unc) == N
    for a, b in zip(det, unc):
        k = (a["prompt_id"], BASE)
        assert a["policy"] == BASE and a["judge_score"] == judge[k]["score"]
        assert b["judge_score"] == judge[k]["mean"] and b["judge_score_variance"] == judge[k]["variance"]
        assert a["base_policy_logprob"] == tf[k]["logprob"]
        assert a["target_policy_logprobs"] == {t: tf[(a["prompt_id"], t)]["logprob"] for t in TARGETS}
    tdet, tunc = read_jsonl(d / "targets_scored_deterministic.jsonl"), read_jsonl(d / "targets_scored_uncertainty.jsonl")
    assert len(tdet) == len(tunc) == N * len(TARGETS)
    for a, b in zip(tdet, tunc):
        k = (a["prompt_id"], a["policy"])
        assert a["judge_score"] == judge[k]["score"] and b["judge_score"] == judge[k]["mean"]
        assert a["sampling_logprob"] == resp[k]["sampling_logprob"]
    cal = read_jsonl(d / "labeling/oracle_labels_calibration_detailed.jsonl")
    val = read_jsonl(d / "labeling/oracle_labels_validation_detailed.jsonl")
    assert len(cal) + len(val) == len(oracle)
    assert {r["policy"] for r in cal} == {BASE} and {r["split"] for r in val} == {"validation"}
    for r in cal + val:
        k = (r["prompt_id"], r["policy"])
        assert r["oracle_label"] == oracle[k]["label"] and r["judge_score"] == judge[k]["score"]
        assert r["response"] == resp[k]["response"]


def test_held_out_labels_are_only_in_the_validation_files(good):
    """CJE fits on any oracle_label in logged data or fresh draws (0.3 reads metadata.oracle_label
    too; 0.9 pools fresh-draw labels with --calibration-data): the targets' labels must be in
    neither, and the base policy's only once, in logged_data.jsonl."""
    run, _, _ = good
    d = run.data_dir
    oracle, judge = by_key(run.rows["oracle_labels.jsonl"]), by_key(run.rows["judge_scores.jsonl"])
    fresh = [r for pol in POLICIES for r in read_jsonl(d / f"cje/responses/{pol}_responses.jsonl")]
    assert not [r for r in fresh if "oracle_label" in r or "oracle_label" in r["metadata"]]
    for t in TARGETS:
        rows = read_jsonl(d / f"cje/validation/{t}.jsonl")
        want = [k for k in oracle if k[1] == t]
        assert [(r["prompt_id"], r["policy"]) for r in rows] == sorted(want)
        for r in rows:
            k = (r["prompt_id"], t)
            assert r["oracle_label"] == oracle[k]["label"] and r["judge_score"] == judge[k]["score"]
            assert r["observation_id"] == f"{k[0]}/{t}" and r["split"] == "validation"
            assert r["inclusion_probability"] == load_config(run.config_path).oracle.validation_fraction
    logged = read_jsonl(d / "cje/logged_data.jsonl")
    assert sum("oracle_label" in r for r in logged) == sum(k[1] == BASE for k in oracle)
    assert all(r["observation_id"] == f"{r['prompt_id']}/{BASE}" for r in logged)


def test_no_field_disagrees_with_its_metadata_copy(good):
    """CJE 0.9 reads a field from the top level or from metadata and rejects a record whose two
    copies differ."""
    run, _, _ = good
    d = run.data_dir
    files = [d / "cje/logged_data.jsonl", *sorted((d / "cje/responses").glob("*.jsonl"))]
    for path in files:
        for r in read_jsonl(path):
            shared = set(r) & set(r["metadata"])
            assert all(r[k] == r["metadata"][k] for k in shared), (path.name, r["prompt_id"], shared)


def test_discrimination_matches_direct_computation(good):
    run, _, info = good
    pids = [p["prompt_id"] for p in run.rows["prompts.jsonl"]]
    judge, oracle = by_key(run.rows["judge_scores.jsonl"]), by_key(run.rows["oracle_labels.jsonl"])
    d = info["discrimination"]
    scores = [judge[(p, pol)]["score"] for pol in POLICIES for p in pids]
    assert d["spread"]["score"]["n"] == N * len(POLICIES)
    assert d["spread"]["score"]["n_distinct"] == len(set(scores))
    assert d["spread"]["score"]["std"] == pytest.approx(np.std(scores, ddof=1), rel=1e-12)

    def ranks(v):                       # average ranks of ties, by hand
        v = np.asarray(v, float)
        return np.array([(v < x).sum() + ((v == x).sum() + 1) / 2 for x in v])

    keys = [(p, pol) for pol in POLICIES for p in pids if (p, pol) in oracle]
    x, y = [judge[k]["score"] for k in keys], [oracle[k]["label"] for k in keys]
    assert d["judge_vs_oracle"]["all"]["n"] == len(keys)
    assert d["judge_vs_oracle"]["all"]["score"]["spearman"] == pytest.approx(pearson(ranks(x), ranks(y)), rel=1e-9)
    for t in TARGETS:
        diff = np.array([judge[(p, BASE)]["score"] - judge[(p, t)]["score"] for p in pids])
        g = d["base_minus_target"][t]["score"]
        assert g["gap"] == pytest.approx(diff.mean(), abs=1e-12)
        assert g["z"] == pytest.approx(diff.mean() / (diff.std(ddof=1) / math.sqrt(N)), rel=1e-9)
    # The synthetic pi_bad is 0.35 worse on average: far below the base policy, in standard errors.
    assert d["base_minus_target"]["pi_bad"]["score"]["z"] > 5
    assert d["notes"] == []


def test_report_says_when_the_judge_has_no_spread(tmp_path):
    run = make_run(tmp_path, n=12, seed=2, write=False)
    for j in run.rows["judge_scores.jsonl"]:
        j["score"] = 1 / 9             # one digit, every time (the default run)
    run.write()
    run_stage(run)
    info = strict_json(run.data_dir / "dataset_info.json")
    d = info["discrimination"]
    assert d["spread"]["score"]["n_distinct"] == 1
    assert d["judge_vs_oracle"]["all"]["score"]["spearman"] is None
    assert d["base_minus_target"]["pi_bad"]["score"]["z"] is None
    text = (run.data_dir / "report.md").read_text(encoding="utf-8")
    assert "**The judge's scores have no spread: all 48 deterministic scores are 0.111" in text
    assert "Spearman correlation undefined (every judge score is 0.111)" in text


def check_cje_readiness(run, regime: str) -> str:
    """dataset_info.json and report.md say how many calibration labels the run has, what CJE does
    with them and from how many it calibrates; returns the line the terminal must show too."""
    info = strict_json(run.data_dir / "dataset_info.json")
    labels = sum(o["policy"] == BASE for o in run.rows["oracle_labels.jsonl"])
    cje = info["cje"]
    assert (cje["calibration_labels"], cje["regime"]) == (labels, regime)
    assert cje["validation_labels"] == {t: sum(o["policy"] == t for o in run.rows["oracle_labels.jsonl"])
                                        for t in TARGETS}
    # 10 labels for 5 folds, 4 for fewer; about 40 and 16 prompts at calibration_fraction 0.25.
    for needle in ("needs 10 calibration labels", "about 40 prompts at calibration_fraction 0.25",
                   "from 4 labels (about 16 prompts)"):
        assert needle in cje["thresholds"]
    line = f"calibration labels: {labels} ({regime.replace('_', ' ')})"
    assert line in (run.data_dir / "report.md").read_text(encoding="utf-8")
    return line


def test_a_full_run_says_cje_calibrates_as_documented(good):
    run, _, _ = good
    check_cje_readiness(run, "full")


@pytest.mark.parametrize("n, regime", [(5, "uncalibrated"), (24, "reduced_folds")])
def test_a_small_run_says_from_how_many_labels_cje_calibrates(tmp_path, capsys, n, regime):
    run = make_run(tmp_path, n=n, seed=1)
    run_stage(run)
    line = check_cje_readiness(run, regime)
    assert f"CJE: {line}" in capsys.readouterr().out


def test_report_reads_well(good):
    run, _, info = good
    text = (run.data_dir / "report.md").read_text(encoding="utf-8")
    for needle in ["# OPE dataset report", f"run seed **{run.run_json['seed']}**", "## Checks",
                   "## Policies", "## OPE diagnostics", "## Suspicious values", "plots/judge_scores.png",
                   "plots/log_weights_pi_bad.png", "cje/logged_data.jsonl"]:
        assert needle in text
    ess = info["targets"]["pi_big"]["ess_fraction"]
    assert f"| pi_big | {ess:.1%} |" in text


def test_no_nan_in_dataset_info(tmp_path):
    run = make_run(tmp_path, n=12, seed=2, write=False)
    for j in run.rows["judge_scores.jsonl"]:
        if j["policy"] == "pi_bad":
            j["score"] = 0.0            # constant: no correlation can be computed
    run.write()
    run_stage(run)
    info = strict_json(run.data_dir / "dataset_info.json")
    assert info["policies"]["pi_bad"]["oracle"]["pearson_r"] is None


# ---- failure rules, each with a deliberately broken file ---------------------------------------------

def set_value(name, pid, pol, field, value):
    def mutate(run):
        run.find(name, pid, pol)[field] = value
    return mutate


def drop(name, pid, pol):
    def mutate(run):
        run.rows[name].remove(run.find(name, pid, pol))
    return mutate


def duplicate(name, pid, pol):
    def mutate(run):
        run.rows[name].append(dict(run.find(name, pid, pol)))
    return mutate


def shift_token(name, pid, pol, delta, field="logprob"):
    """Move one token's log-probability and the record's sum with it (a consistent record)."""
    def mutate(run):
        r = run.find(name, pid, pol)
        r["token_logprobs"] = list(r["token_logprobs"])
        r["token_logprobs"][0] += delta
        if field:
            r[field] = math.fsum(r["token_logprobs"])
    return mutate


shift_clone = shift_token("logprobs.jsonl", "q0009", CLONE, -1e-3)


def tf_disagrees(run):              # one token 1e-5 nats off: 10x the tolerance
    shift_token("logprobs.jsonl", "q0010", BASE, -1e-5)(run)


def zero_logprob(run):
    r = run.find("responses.jsonl", "q0012", "pi_bad")
    r["token_logprobs"] = [0.0] * r["n_tokens"]
    r["sampling_logprob"] = 0.0
    run.find("self_consistency.jsonl", "q0012", "pi_bad")["token_logprobs"] = r["token_logprobs"]


def tf_other_tokens(run):
    for pol in (BASE, CLONE):       # the clone alike, so that only this rule speaks
        r = run.find("logprobs.jsonl", "q0014", pol)
        r["token_ids"] = [t + 1 for t in r["token_ids"]]


def tf_complete_but_short(run):
    for pol in (BASE, CLONE):
        r = run.find("logprobs.jsonl", "q0015", pol)
        for key in ("token_ids", "token_logprobs"):
            r[key] = r[key][:-1]
        r["n_tokens"] -= 1
        r["logprob"] = math.fsum(r["token_logprobs"])


def target_cut_short(run):
    r = run.find("logprobs.jsonl", "q0018", "pi_bad")
    for key in ("token_ids", "token_logprobs"):
        r[key] = r[key][:3]
    r["n_tokens"], r["logprob"] = 3, math.fsum(r["token_logprobs"])


def shift_bytes(pid, pol, delta):
    def mutate(run):
        run.find("logprobs.jsonl", pid, pol)["scored_bytes"] += delta
    return mutate


def target_scores_nothing(run):
    r = run.find("logprobs.jsonl", "q0021", "pi_bad")
    r.update(token_ids=[], token_logprobs=[], n_tokens=0, logprob=0.0)


def stop_without_stop_token(run):
    r = run.find("responses.jsonl", "q0022", BASE)
    r["finish_reason"] = "stop"
    r["token_ids"][-1] = 1000           # a text token


def self_check_short(run):
    r = run.find("self_consistency.jsonl", "q0016", "pi_big")
    r["token_logprobs"] = r["token_logprobs"][:-1]


def unknown_policy(run):
    row = dict(run.find("logprobs.jsonl", "q0001", "pi_bad"), policy="pi_ghost")
    run.rows["logprobs.jsonl"].append(row)


def extra_field(run):
    run.find("judge_scores.jsonl", "q0002", "pi_big")["extra"] = 1


def wrong_split(run):
    label = next(o for o in run.rows["oracle_labels.jsonl"] if o["policy"] == "pi_bad")
    label["split"] = "calibration"


FAILURES = [
    ("positive TF logprob", set_value("logprobs.jsonl", "q0003", "pi_bad", "logprob", 0.5),
     ["logprobs.jsonl: 1 log-probabilities are positive", "q0003/pi_bad: 0.5"]),
    ("positive sampling logprob", set_value("responses.jsonl", "q0004", "pi_big", "sampling_logprob", 1.0),
     ["responses.jsonl: 1 log-probabilities are positive", "q0004/pi_big"]),
    # NaN and Infinity are not JSON: the line is refused when read, and named.
    ("NaN logprob", set_value("logprobs.jsonl", "q0005", "pi_big", "logprob", float("nan")),
     ["logprobs.jsonl: line 24: holds NaN or Infinity"]),
    ("infinite logprob", set_value("logprobs.jsonl", "q0006", "pi_bad", "logprob", float("-inf")),
     ["logprobs.jsonl: line 27: holds NaN or Infinity"]),
    ("non-numeric logprob", set_value("responses.jsonl", "q0006", "pi_bad", "sampling_logprob", "-3.2"),
     ["log-probabilities are not a number", "q0006/pi_bad"]),
    ("missing judge record", drop("judge_scores.jsonl", "q0007", "pi_big"),
     ["judge_scores.jsonl: 1 (prompt, policy) records are missing: q0007/pi_big"]),
    ("missing response", drop("responses.jsonl", "q0001", BASE),
     ["responses.jsonl: 1 (prompt, policy) records are missing: q0001/p0"]),
    ("missing TF record", drop("logprobs.jsonl", "q0002", "pi_bad"),
     ["logprobs.jsonl: 1 (prompt, policy) records are missing: q0002/pi_bad"]),
    ("duplicated response", duplicate("responses.jsonl", "q0008", BASE),
     ["responses.jsonl: 1 (prompt, policy) pairs appear more than once: q0008/p0 x2"]),
    ("duplicated oracle label", lambda run: run.rows["oracle_labels.jsonl"].append(
        dict(run.rows["oracle_labels.jsonl"][0])), ["oracle_labels.jsonl", "more than once"]),
    ("unknown policy", unknown_policy, ["logprobs.jsonl: 1 records for an unknown prompt or policy",
                                        "q0001/pi_ghost"]),
    ("clone scores other tokens", lambda run: run.find("logprobs.jsonl", "q0009", CLONE).__setitem__(
        "token_ids", [t + 1 for t in run.find("logprobs.jsonl", "q0009", CLONE)["token_ids"]]),
     ["records do not score the event of p0's response", "q0009/pi_clone: other token ids"]),
    ("clone off by 1e-3", shift_clone, ["pi_clone log-weights depart from 0", "q0009/pi_clone: log-weight -0.001"]),
    ("TF vs sampling on one token of one record", tf_disagrees,
     ["logprobs.jsonl: 1 p0 records have a token whose teacher-forced log-probability differs",
      "q0010/p0: a token 1e-05 nats off"]),
    ("a policy's own response off on one token", shift_token("self_consistency.jsonl", "q0011", "pi_big", 3e-6, None),
     ["self_consistency.jsonl: 1 responses have a token whose teacher-forced", "q0011/pi_big: a token 3e-06 nats off"]),
    ("self-check missing", drop("self_consistency.jsonl", "q0013", "pi_bad"),
     ["self_consistency.jsonl: 1 (prompt, policy) records are missing: q0013/pi_bad"]),
    ("self-check with a value too few", self_check_short,
     ["self_consistency.jsonl: 1 records do not have one value per token", "q0016/pi_big"]),
    ("exact 0.0 on a non-empty response", zero_logprob,
     ["responses.jsonl: 1 records have a log-probability of exactly 0.0 on a non-empty response",
      "q0012/pi_bad"]),
    ("base TF scores other tokens", tf_other_tokens, ["records do not score the event of p0's response",
                                                      "q0014/p0: other token ids", "q0014/pi_clone"]),
    ("complete base TF record with a token too few", tf_complete_but_short,
     ["records do not score the event", "q0015/p0: ", "tokens scored, the event has"]),
    # A target's record checked against the base response's event, not only the clone's.
    ("a target record cut short, its values still summing", target_cut_short,
     ["records do not score the event of p0's response", "q0018/pi_bad: 3 tokens scored, the event has"]),
    ("a target record with complete flipped", set_value("logprobs.jsonl", "q0019", "pi_big", "complete", False),
     ["records do not score the event", "q0019/pi_big: complete False, the event's True"]),
    ("a target record with scored_bytes +17", shift_bytes("q0020", "pi_big", 17),
     ["records do not score the event", "q0020/pi_big: scored_bytes"]),
    ("a record that scores nothing", target_scores_nothing,
     ["records do not score the event", "q0021/pi_bad: 0 tokens scored"]),
    ("a response that stopped without a stop token", stop_without_stop_token,
     ["responses say they stopped but do not end in a stop token", "q0022/p0"]),
    ("token log-probabilities do not sum to the record's", shift_token("responses.jsonl", "q0017", "pi_bad", -0.5, None),
     ["responses.jsonl: 1 records are malformed", "summing to sampling_logprob", "q0017/pi_bad"]),
    ("judge score above 1", set_value("judge_scores.jsonl", "q0003", "pi_clone", "score", 1.5),
     ["judge_scores.jsonl: 1 judge values are outside [0, 1]", "q0003/pi_clone score=1.5"]),
    ("judge mean NaN", set_value("judge_scores.jsonl", "q0003", BASE, "mean", float("nan")),
     ["judge_scores.jsonl: line 13: holds NaN or Infinity"]),
    ("judge mean not a number", set_value("judge_scores.jsonl", "q0003", BASE, "mean", "0.5"),
     ["judge values are outside", "q0003/p0 mean='0.5'"]),
    ("negative judge variance", set_value("judge_scores.jsonl", "q0003", BASE, "variance", -0.1),
     ["q0003/p0 variance=-0.1"]),
    ("oracle label below 0", lambda run: run.rows["oracle_labels.jsonl"][0].__setitem__("label", -0.2),
     ["oracle_labels.jsonl: 1 oracle labels are outside [0, 1]", "label=-0.2"]),
    ("response n_tokens off by one", set_value("responses.jsonl", "q0005", "pi_bad", "n_tokens", 999),
     ["responses.jsonl: 1 records are malformed (response text, token_ids", "q0005/pi_bad"]),
    ("TF token_ids disagree with n_tokens", set_value("logprobs.jsonl", "q0004", "pi_clone", "n_tokens", 999),
     ["logprobs.jsonl: 1 records are malformed (n_tokens = len(token_ids)", "q0004/pi_clone"]),
    ("oracle label in wrong split", wrong_split, ["oracle labels are in the wrong split", "want 'validation'"]),
    ("record with an unknown field", extra_field, ["judge_scores.jsonl: line", "not a JudgeScore record"]),
    # A score or label of another text than the current response (a response regenerated after
    # it was judged): its digest is not the current (prompt, response)'s.
    ("judge score of another response", set_value("judge_scores.jsonl", "q0003", "pi_bad", "input_digest",
                                                  scored_digest("Question 3: what is 3 + 3? — ünïcode", "old text")),
     ["judge_scores.jsonl: 1 records were not computed from the current prompt and response",
      "q0003/pi_bad", "--force-step judge"]),
    ("oracle label without a digest", lambda run: run.rows["oracle_labels.jsonl"][0].pop("input_digest"),
     ["oracle_labels.jsonl: 1 records were not computed from the current prompt and response",
      "no digest", "--force-step oracle"]),
]


@pytest.mark.parametrize("mutate,expected", [f[1:] for f in FAILURES], ids=[f[0] for f in FAILURES])
def test_failure_rule(tmp_path, capsys, mutate, expected):
    run = make_run(tmp_path, n=N, seed=5, write=False)
    mutate(run)
    run.write(mark=False)
    with pytest.raises(ValidationFailed) as e:
        run_stage(run)
    msg = str(e.value)
    for needle in expected:
        assert needle in msg
    assert e.value.exit_code != 0
    assert msg.count("\n  - ") == 1, f"one problem expected, got:\n{msg}"
    printed = capsys.readouterr().out
    assert "validation failed" in printed and expected[0] in printed
    assert not (run.data_dir / "report.md").exists() and not (run.data_dir / "cje").exists()


def test_damaged_line_missing_file_and_more_in_one_message(tmp_path, capsys):
    run = make_run(tmp_path, n=N, seed=6, write=False)
    shift_clone(run)
    run.find("logprobs.jsonl", "q0003", "pi_bad")["logprob"] = 0.25
    run.write(mark=False)
    lines = (run.data_dir / "responses.jsonl").read_text().splitlines(keepends=True)
    lines[2] = lines[2][: len(lines[2]) // 2] + "\n"        # a torn line in the middle of the file
    (run.data_dir / "responses.jsonl").write_text("".join(lines))
    (run.data_dir / "judge_scores.jsonl").unlink()
    with pytest.raises(ValidationFailed) as e:
        run_stage(run)
    msg = str(e.value)
    problems = [line for line in msg.splitlines() if line.startswith("  - ")]
    assert len(problems) == 4, msg
    assert any("responses.jsonl: line 3: not valid JSON" in p for p in problems)
    assert any("judge_scores.jsonl: file not found" in p for p in problems)
    assert any("positive" in p and "q0003/pi_bad" in p for p in problems)
    assert any("pi_clone log-weights depart" in p for p in problems)
    printed = capsys.readouterr().out.splitlines()
    for p in problems:      # each problem also printed on its own line
        assert any(line.endswith(p.strip()[2:]) for line in printed)


def test_missing_run_json(tmp_path):
    run = make_run(tmp_path, n=N, seed=7)
    (run.data_dir / "run.json").unlink()
    with pytest.raises(ValidationFailed, match="run.json: file not found"):
        run_stage(run)


# ---- legal but suspicious --------------------------------------------------------------------------

def test_suspicious_values_are_listed_not_fatal(tmp_path):
    run = make_run(tmp_path, n=N, seed=8, write=False)
    low = run.find("logprobs.jsonl", "q0013", "pi_bad")
    low["token_logprobs"] = [-11.0] * low["n_tokens"]
    low["logprob"] = math.fsum(low["token_logprobs"])
    run.write()
    run_stage(run)
    info = strict_json(run.data_dir / "dataset_info.json")
    sus = info["checks"]["suspicious"]
    assert sus["low_per_token_logprob"]["count"] == 1
    item = sus["low_per_token_logprob"]["examples"][0]
    assert (item["prompt_id"], item["policy"]) == ("q0013", "pi_bad")
    assert item["per_token"] == pytest.approx(-11.0)
    report = (run.data_dir / "report.md").read_text()
    assert "| logprobs.jsonl |" in report and "q0013" in report


def test_no_clone_policy_skips_the_clone_rule(tmp_path):
    run = make_run(tmp_path, n=N, seed=10, write=False, clone_policy=None)
    shift_clone(run)
    run.write()
    run_stage(run)
    assert strict_json(run.data_dir / "dataset_info.json")["checks"]["clone"] is None


def test_a_removed_policy_leaves_no_file_in_cje_or_plots(tmp_path):
    """Stage 5 writes cje/ and plots/ whole: after a run without pi_big, nothing of pi_big is left
    where `cje analyze` (or a reader of the plots) would find it."""
    import yaml
    run = make_run(tmp_path, n=12, seed=15)
    run_stage(run)
    data = run.data_dir
    old = ["cje/responses/pi_big_responses.jsonl", "cje/validation/pi_big.jsonl", "plots/log_weights_pi_big.png"]
    assert all((data / rel).is_file() for rel in old)
    cfg = yaml.safe_load(run.config_path.read_text())
    cfg["policies"] = [p for p in cfg["policies"] if p["name"] != "pi_big"]
    run.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    for name, rows in run.rows.items():
        run.rows[name] = [r for r in rows if r.get("policy") != "pi_big"]
    run.write()
    outputs = run_stage(run)
    left = sorted(p.relative_to(data).as_posix() for folder in ("cje", "plots")
                  for p in (data / folder).rglob("*") if p.is_file())
    assert not [rel for rel in left if "pi_big" in rel], left
    assert set(left) <= set(outputs), set(left) - set(outputs)
    assert (data / "cje/responses/pi_bad_responses.jsonl").is_file()


def test_a_run_scored_by_two_judge_models_is_reported_or_refused_as_configured(tmp_path):
    run = make_run(tmp_path, n=12, seed=16, write=False)
    for j in run.rows["judge_scores.jsonl"]:
        j["model"] = "judge-2026-01-15"
    run.rows["judge_scores.jsonl"][5]["model"] = "judge-2026-03-01"
    run.write()
    run_stage(run)
    info = strict_json(run.data_dir / "dataset_info.json")
    assert info["answered_by"]["judge"] == {"judge-2026-01-15": 47, "judge-2026-03-01": 1}
    why = "the judge's records were answered by 2 models (judge-2026-01-15: 47, judge-2026-03-01: 1)"
    assert why in info["checks"]["notes"]
    assert why in (run.data_dir / "report.md").read_text()

    write_config(run.root, run.data_dir, validation={"on_mixed_scorer_models": "stop"})
    with pytest.raises(ValidationFailed) as e:
        run_stage(run)
    assert f"judge_scores.jsonl: {why}, and validation.on_mixed_scorer_models is 'stop'" in str(e.value)
    assert "oracle_labels.jsonl" not in str(e.value)          # one model (unnamed) answered them all


def test_inputs_cover_every_upstream_output_and_fingerprint_the_validation(tmp_path):
    run = make_run(tmp_path, n=8, seed=11)
    config = load_config(run.config_path)
    ck = checkpoint.load(run.data_dir)["stages"]
    fp = summarize.fingerprint(config, argparse.Namespace(), ck)
    inputs = summarize.inputs(config, argparse.Namespace(), ck)
    for stage in summarize.UPSTREAM:
        for rel, m in ck[stage]["outputs"].items():
            if not rel.endswith("_usage.json"):
                assert inputs[f"{stage}.{rel}"] == m["sha256"]
    assert fp["validation.clone_tolerance"] == 1e-4
    assert fp["validation.suspicious_per_token_logprob"] == -10.0
    assert fp["clone_policy"] == CLONE and fp["base_policy"] == BASE


# ---- the numbered script -------------------------------------------------------------------------------

def cli(run, *extra):
    return subprocess.run([sys.executable, str(SCRIPT), "--config", str(run.config_path), *extra],
                          capture_output=True, text=True, cwd=PROJECT_DIR, timeout=300)


def test_cli_good_run_then_already_complete_then_refuses_changed_config(tmp_path):
    run = make_run(tmp_path, n=N, seed=12)
    p = cli(run)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "[summarize] complete" in p.stdout and "all checks passed" in p.stdout
    for pol in POLICIES:
        assert f"  {pol} " in p.stdout           # the terminal summary, a line per policy
    for rel in ["report.md", "dataset_info.json", "cje/logged_data.jsonl", "p0_scored_deterministic.jsonl"]:
        assert (run.data_dir / rel).is_file()
    entry = checkpoint.load(run.data_dir)["stages"]["summarize"]
    assert verify_outputs(run.data_dir, entry["outputs"]) is None

    p = cli(run)
    assert p.returncode == 0 and "already complete" in p.stdout, p.stdout + p.stderr

    (run.data_dir / "report.md").write_text("edited by hand\n")          # a damaged .md output
    p = cli(run)
    assert p.returncode == 0 and "report.md changed since it was written" in p.stdout, p.stdout + p.stderr
    assert "# OPE dataset report" in (run.data_dir / "report.md").read_text()

    write_config(run.root, run.data_dir, validation={"clone_tolerance": 1e-3})
    p = cli(run)
    assert p.returncode != 0 and "validation.clone_tolerance" in p.stderr, p.stdout + p.stderr


def test_cli_exits_nonzero_naming_the_problem(tmp_path):
    run = make_run(tmp_path, n=N, seed=13, write=False)
    shift_clone(run)
    run.write()                       # checkpoint re-marked: stages 1-4 verify, stage 5 must object
    p = cli(run)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "pi_clone log-weights depart from 0" in p.stderr and "q0009" in p.stderr
    assert "pi_clone log-weights depart from 0" in p.stdout
    assert not (run.data_dir / "report.md").exists()
    assert "summarize" not in checkpoint.load(run.data_dir)["stages"]


def test_cli_damaged_or_missing_input_after_its_stage_completed(tmp_path):
    run = make_run(tmp_path, n=N, seed=14)
    path = run.data_dir / "responses.jsonl"
    good_bytes = path.read_bytes()
    path.write_bytes(good_bytes[:-40])                           # cut off mid-line
    p = cli(run)
    assert p.returncode != 0 and "responses.jsonl" in p.stderr, p.stdout + p.stderr
    path.write_bytes(good_bytes)
    (run.data_dir / "oracle_labels.jsonl").unlink()
    p = cli(run)
    assert p.returncode != 0 and "oracle_labels.jsonl is missing" in p.stderr, p.stdout + p.stderr


def test_self_checks_beyond_200_prompts_are_the_samples_first_200(tmp_path):
    from ope_prep.stages.units import SELF_CHECKS_PER_POLICY, self_check_prompts
    ids = [f"q{i:04d}" for i in range(230)]
    chosen = self_check_prompts(ids)
    assert len(chosen) == SELF_CHECKS_PER_POLICY == 200 and chosen == ids[:200]
    assert self_check_prompts(ids[:150]) == ids[:150]          # all of a small run
    assert set(self_check_prompts(ids[:210])) <= set(chosen)   # a grown run keeps the checks it had

    run = make_run(tmp_path, n=230, seed=13, write=False)
    keep = {pol: set(self_check_prompts(ids)) for pol in POLICIES}
    every = run.rows["self_consistency.jsonl"]
    run.rows["self_consistency.jsonl"] = [r for r in every if r["prompt_id"] in keep[r["policy"]]]
    run.write()
    run_stage(run)
    info = strict_json(run.data_dir / "dataset_info.json")
    assert {p: c["n"] for p, c in info["checks"]["self_consistency"].items()} == {p: 200 for p in POLICIES}

    run.rows["self_consistency.jsonl"] = every                           # the other 30 are not expected
    run.write(mark=False)
    with pytest.raises(ValidationFailed, match="self_consistency.jsonl: 120 records for an unknown prompt or policy"):
        run_stage(run)


def test_quarantine_records_that_are_corrupt_or_name_an_unknown_prompt_fail_the_run(tmp_path):
    """Stage 5's quarantine checks can fail: a quarantine line that is no record, and one that
    leaves out a prompt the run does not hold."""
    run = make_run(tmp_path, n=N, seed=21)
    qdir = run.data_dir / "quarantine"
    qdir.mkdir()
    (qdir / "judge.jsonl").write_text('{"stage": "judge", "key": "q0001/p0"}\n')   # fields missing
    with pytest.raises(ValidationFailed, match=r"quarantine/judge.jsonl: line 1: not a Quarantined record"):
        run_stage(run)
    (qdir / "judge.jsonl").write_text(json.dumps(
        {"stage": "judge", "key": "nope/p0", "prompt_id": "nope", "error": "x", "tries": 1}) + "\n")
    with pytest.raises(ValidationFailed, match="quarantined units name a prompt that is not in the run: judge nope/p0"):
        run_stage(run)
    assert not (run.data_dir / "report.md").exists()


def test_typicality_coverage_by_hand_and_at_its_ends():
    # Per-token surprisals 1..4 (one token each); the target's self-normalised weights over the
    # logged responses 0.7, 0.25, 0.04, 0.01: 90% of its mass is reached at surprisal 2, so the
    # typical band holds 2 of the 4 logged responses.
    target_lp = -np.array([1.0, 2.0, 3.0, 4.0])
    base_lp = target_lp - np.log([0.7, 0.25, 0.04, 0.01])
    assert dx.target_typicality_coverage(target_lp, base_lp, np.ones(4)) == 0.5
    # The band is per token: the same totals over 2 tokens each halve every surprisal, not the answer.
    assert dx.target_typicality_coverage(target_lp, base_lp, np.full(4, 2)) == 0.5
    # A target identical to the base: the band holds 90% of the responses.
    rng = np.random.default_rng(0)
    same = -rng.uniform(5, 50, 1000)
    assert abs(dx.target_typicality_coverage(same, same, rng.integers(5, 40, 1000)) - 0.9) < 0.01
    # A target whose mass sits on the few responses it finds least surprising: low coverage, and
    # the overlap check says so by name.
    sharp = same.copy()
    sharp[np.argsort(-same / 20)[:5]] += 60
    f = dx.overlap(sharp, same, np.full(1000, 20))
    assert f["typicality_coverage"] < 0.05 and f["ess_fraction"] < 0.01
    why = dx.low_overlap("pi_sharp", f, 0.1, 0.7)
    assert why.startswith("pi_sharp: effective sample size") and "typicality coverage" in why
    assert dx.low_overlap("pi_same", dx.overlap(same, same, np.full(1000, 20)), 0.1, 0.7) is None
