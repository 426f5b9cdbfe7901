"""Stage 5: check every file, compute statistics and OPE diagnostics, write the report and exports.

Nothing is written unless every check passes. A check that fails is a problem listed on its own
line, and all problems go out together in one ValidationFailed (exit code 1), so one run shows
everything that is wrong. The checks: the records of each file (ope_prep/validate.py) and the
propensity rules (ope_prep/propensity_checks.py: the clone's weight, the scored event, teacher
forcing against sampling on the base policy and on every policy's own responses, zeros). The
figures: ope_prep/diagnostics.py. Suspicious but legal values (a per-token log-probability below
``validation.suspicious_per_token_logprob``) are listed in the report.

The base policy's log-probability used everywhere here (weights, export) is its teacher-forced
one from logprobs.jsonl, computed by the same code path as every target's, so a shared error
cancels in the weight; its sampling log-probability is kept in the export's metadata.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .. import diagnostics as dx
from ..config import Config
from ..dataset import Dataset
from ..errors import ValidationFailed
from ..export import cje_readiness
from ..files import (CALIBRATION, CJE_DIR, DATASET_INFO, P0_DET, P0_UNC, PLOTS_DIR, REPORT, TARGETS_DET,
                     TARGETS_UNC, VALIDATION, usage_file)
from ..fingerprint import flatten
from ..store import write_json
from ..validate import answering_models, load_and_check, mixed_models
from . import UNIT_STAGES
from .units import low_overlap_targets, run_identity, upstream_digests

UPSTREAM = ["prepare", "generate", "logprobs", "judge", "oracle"]

# Fixed files, plus the folders that hold per-policy files (cje/responses/<policy>_responses.jsonl,
# plots/log_weights_<policy>.png): `--force` moves all of them aside. The exact files a run wrote
# are the keys of the manifest that run() returns.
OUTPUTS = [REPORT, DATASET_INFO, CJE_DIR, PLOTS_DIR, P0_DET, P0_UNC, TARGETS_DET, TARGETS_UNC, CALIBRATION,
           VALIDATION]

def fingerprint(config: Config, args, ck: dict) -> dict:
    fp: dict[str, object] = run_identity(ck)
    # Which policy is the base and which is the clone changes the checks and the export.
    fp["base_policy"] = config.base_policy
    fp["clone_policy"] = config.clone_policy
    fp.update(flatten(config.validation.model_dump(), "validation."))
    return fp


def inputs(config: Config, args, ck: dict) -> dict:
    # Usage counts describe one run of a stage, not its data: a judge stage redone for one torn
    # unit writes the same scores and other counts, and must not make the summary look out of date.
    return upstream_digests(ck, UPSTREAM)


# ---- loading and checking ------------------------------------------------------------------------


def dataset_info(config: Config, data: Dataset, checks: dict) -> dict:
    """Every number of the report, as plain data (dataset_info.json)."""
    base = config.base_policy
    pids = [p.prompt_id for p in data.prompts]
    n = len(pids)
    policies: dict[str, dict] = {}
    for pol in config.policies:
        name = pol.name
        resp = [data.responses[(pid, name)] for pid in pids]
        scores = np.array([data.judge[(pid, name)].score for pid in pids], dtype=float)
        jmeans = np.array([data.judge[(pid, name)].mean for pid in pids], dtype=float)
        jvars = np.array([data.judge[(pid, name)].variance for pid in pids], dtype=float)
        labeled = [pid for pid in pids if (pid, name) in data.oracle]
        lab = np.array([data.oracle[(pid, name)].label for pid in labeled], dtype=float)
        lab_judge = np.array([data.judge[(pid, name)].score for pid in labeled], dtype=float)
        mean, se = dx.mean_se(scores)
        policies[name] = {
            "model": pol.model, "temperature": pol.temperature,
            "role": "base" if name == base else ("clone" if name == config.clone_policy else "target"),
            "n": n,
            "mean_tokens": float(np.mean([r.n_tokens for r in resp])),
            "fraction_truncated": sum(r.finish_reason == "length" for r in resp) / n,
            "judge": {"n": len(scores), "coverage": len(scores) / n, "mean": mean, "se": se,
                      "uncertainty_mean": float(np.mean(jmeans)), "mean_variance": float(np.mean(jvars))},
            "oracle": {"split": "calibration" if name == base else "validation", "n": len(labeled),
                       "coverage": len(labeled) / n,
                       "mean_label": float(np.mean(lab)) if len(lab) else None,
                       "pearson_r": dx.pearson(lab_judge, lab),
                       "mean_abs_diff": float(np.mean(np.abs(lab_judge - lab))) if len(lab) else None},
        }
    judge_base = np.array([data.judge[(pid, base)].score for pid in pids], dtype=float)
    targets = {}
    for t in config.target_policies:
        tf = [data.logprobs[(pid, t)] for pid in pids]
        lp_den = np.array([data.denominator(pid, t, base).logprob for pid in pids], dtype=float)
        targets[t] = {**dx.overlap(data.teacher_forced(t), lp_den, np.array([r.n_tokens for r in tf]), judge_base),
                      "on_policy_judge_mean": policies[t]["judge"]["mean"]}
    notes = low_overlap_targets(config, targets)
    if policies[base]["oracle"]["n"] < 2:
        notes.append(f"{base}: {policies[base]['oracle']['n']} calibration labels; the judge cannot "
                     "be calibrated")
    low = checks["suspicious"]["low_per_token_logprob"]
    if low["count"]:
        notes.append(f"{low['count']} per-token log-probabilities below {low['threshold']:g} "
                     "(see Suspicious values)")
    answered = {"judge": answering_models(data.judge), "oracle": answering_models(data.oracle)}
    notes += [why for stage, models in answered.items() if (why := mixed_models(stage, models))]
    return {
        "format": "ope_prep/dataset_info/1",
        "run": {"n_prompts": n, "samples": data.run.get("samples"), "seed": data.run["seed"],
                "excluded_prompts": {pid: [{"stage": q.stage, "key": q.key, "error": q.error, "tries": q.tries}
                                           for q in qs] for pid, qs in sorted(data.excluded.items())},
                "excluded_profile": dx.exclusion_profile(data.prompts, data.left_out, data.excluded),
                "oracle_seed": data.run["seed"], "skipped": data.run.get("skipped"),
                "base_policy": base, "clone_policy": config.clone_policy,
                "target_policies": config.target_policies,
                "oracle_fractions": {"calibration": config.oracle.calibration_fraction,
                                     "validation": config.oracle.validation_fraction}},
        "checks": {"passed": True, **checks, "notes": notes},
        "answered_by": answered,       # model name (as the replies gave it) -> records, per stage
        "policies": policies,
        "targets": targets,
        "discrimination": dx.discrimination(config, data),
        "cje": cje_readiness(config, data),
    }


def numeric_path(config: Config) -> dict:
    """How the log-probabilities were computed: llama.cpp's build and kernel settings, threads
    and batch size in process, and where each policy model ran (in process or its engine)."""
    from ..backends.llama import numeric_identity
    from ..backends.llama.engine import BATCH_TOKENS
    models = dict.fromkeys(p.model for p in config.policies)
    return {"in_process": {**numeric_identity(), "n_threads": config.generation.n_threads,
                           "batch_tokens": BATCH_TOKENS},
            "policy_models": {key: config.models[key].endpoint.engine if config.models[key].endpoint else "in process"
                              for key in models}}


def usage_rows(config: Config, data_dir: Path) -> list[dict]:
    """What each stage's last run spent, per model: requests, tokens, dollars (from the price
    tables in the config). Stages 2 and 2b write one entry per model, judge and oracle one."""
    rows = []
    for stage in UNIT_STAGES:
        try:
            usage = json.loads((data_dir / usage_file(stage)).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if stage in ("judge", "oracle"):
            usage = {getattr(config, stage).model: usage}
        for model, u in usage.items():
            rows.append({"stage": stage, "model": model, **{k: u.get(k) for k in
                         ("calls", "cached", "input_tokens", "output_tokens", "usd", "notes")}})
    return rows


def clean_json(obj):
    """NaN and infinities become null: dataset_info.json is strict JSON."""
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, np.generic):
        return clean_json(obj.item())
    return obj


# Folders written whole: a file another policy list left there (cje/responses/<policy>_responses.jsonl,
# plots/log_weights_<policy>.png) would be read by `cje analyze` or a reader beside this run's.
WHOLE_FOLDERS = [CJE_DIR, PLOTS_DIR]


def remove_leftovers(data_dir: Path, written: dict[str, dict]) -> list[str]:
    """Delete every file under WHOLE_FOLDERS that this run did not write (``written``: its
    manifests by relative path), and the folders left empty; returns what was removed. Done after
    the new files are in place and before the stage is marked complete: a kill in between leaves
    the stage to be redone, which removes them then. Snapshots hold hard links, and keep theirs."""
    removed = []
    for folder in WHOLE_FOLDERS:
        root = data_dir / folder
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*"), reverse=True):       # files before their folders
            rel = path.relative_to(data_dir).as_posix()
            if path.is_dir() and not path.is_symlink():
                if not any(path.iterdir()):
                    path.rmdir()
            elif rel not in written:
                path.unlink()
                removed.append(rel)
    return sorted(removed)


# ---- the stage ---------------------------------------------------------------------------------------

def unit_count(config: Config, n_prompts: int) -> int:
    return 0


def disk_estimate(config: Config, n_prompts: int) -> int:
    """Exports and reports about as large as everything before them."""
    return 2 * sum(p.stat().st_size for p in config.data_dir.glob("*.jsonl"))


def run(config: Config, args, fp: dict) -> dict:
    from .. import export, report

    data_dir = config.data_dir
    data, checks, problems = load_and_check(config)
    if problems:
        print(f"[summarize] validation failed: {len(problems)} problem(s):")
        for p in problems:
            print(f"[summarize]   - {p}")
        raise ValidationFailed(f"validation of {data_dir} failed; nothing was written. "
                               f"{len(problems)} problem(s):\n"
                               + "\n".join(f"  - {p}" for p in problems))
    info = clean_json(dataset_info(config, data, checks))
    info["cost"] = usage_rows(config, data_dir)
    info["numeric_path"] = numeric_path(config)
    outputs: dict[str, dict] = {}
    outputs.update(export.write_all(config, data))
    outputs.update(report.write_plots(config, data, info))
    info["outputs"] = {rel: m["records"] for rel, m in sorted(outputs.items())}
    outputs[REPORT] = report.write_report(data_dir / REPORT, config, info)
    outputs[DATASET_INFO] = write_json(data_dir / DATASET_INFO, info)
    removed = remove_leftovers(data_dir, outputs)
    if removed:
        print(f"[summarize] removed {len(removed)} file(s) an earlier run left in {' and '.join(WHOLE_FOLDERS)} "
              f"(not of this run's policies): {', '.join(removed[:5])}{' ...' if len(removed) > 5 else ''}")
    print(report.terminal_summary(config, info))
    return outputs
