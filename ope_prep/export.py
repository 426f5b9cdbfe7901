"""The data consumers read as is: the CJE export (0.3 and 0.9) and the older phase-2 layout.

Everything here is written by stage 5 after every check passed, so each value is present and
legal. The base policy's log-probability is its teacher-forced one (logprobs.jsonl), computed by
the same code path as every target's; its sampling log-probability rides along as metadata.
Records are in prompts.jsonl order; targets are in config order.

Both CJE lines read the same export (``<data_dir>/cje/``):

* CJE 0.3 (``cje-eval==0.3.0``, off-policy: calibrated IPS, DR; its own venv, scripts/cje_env.py):
  ``cje.analyze_dataset(logged_data_path="<data_dir>/cje/logged_data.jsonl",
  fresh_draws_dir="<data_dir>/cje/responses", estimator="dr-cpo")``; scripts/cje_roundtrip.py.
* CJE 0.9 (``cje-eval==0.9.3``, pyproject.toml's cje extra; Direct mode, each policy's fresh draws
  calibrated on labeled data): ``cje analyze <data_dir>/cje/responses --calibration-data
  <data_dir>/cje/logged_data.jsonl``.

``cje/logged_data.jsonl``, one record per prompt, the base policy's response::

    {"prompt_id": "q0001", "observation_id": "q0001/p0", "prompt": "...", "response": "...",
     "base_policy_logprob": -42.1,                      # teacher-forced under the base policy
     "target_policy_logprobs": {"pi_clone": -42.1, "pi_bad": -57.3, ...},   # every target policy
     "judge_score": 0.7,                                # deterministic judge score, [0, 1]
     "oracle_label": 0.8,                               # only where the calibration set labeled it
     "metadata": {"prompt_id": "q0001", "base_policy": "p0",
                  "judge_score": 0.7, "oracle_label": 0.8,   # (also here, for readers of CJE 0.2;
                                                             # always equal: 0.9 rejects a mismatch)
                  "judge_mean": 0.68, "judge_variance": 0.02,
                  "base_policy_sampling_logprob": -42.1, "n_tokens": 37, "finish_reason": "stop",
                  "response_token_count": 37,        # tokens the log-probabilities cover
                  "oracle_inclusion_probability": 0.25}}  # oracle.calibration_fraction

``cje/responses/<policy>_responses.jsonl``, the fresh draws, one file per policy (every target,
and the base policy for CJE 0.9's comparisons against it; CJE 0.3's IPS and DR read the targets'
only), one record per prompt; CJE infers the policy from the file name::

    {"prompt_id": "q0001", "observation_id": "q0001/pi_bad", "prompt": "...", "response": "...",
     "policy": "pi_bad", "judge_score": 0.2, "draw_idx": 0,
     "metadata": {"judge_mean": 0.22, "judge_variance": 0.03, "sampling_logprob": -51.0,
                  "n_tokens": 40, "response_token_count": 40, "finish_reason": "length"}}

Fresh draws carry no ``oracle_label``, at the top level or in metadata. CJE reads one from
either place and fits on it: 0.3's IPS and DR with logged data calibrate on the logged data's
labels only, but its Direct mode calibrates on the fresh draws' labels, and with a
``calibration_data_path`` it pools them in (``combine_oracle_sources=True``, the default); 0.9
always pools them with ``--calibration-data`` and corrects each policy's estimate with its own.
So:

* the base policy's calibration labels are in ``logged_data.jsonl`` only (a copy in
  ``p0_responses.jsonl`` would count each twice in 0.9's pool);
* **the targets' held-out validation labels are in ``cje/validation/<policy>.jsonl``, field
  ``oracle_label``**, one file per target policy, one record per label, in prompt order::

    {"prompt_id": "q0004", "observation_id": "q0004/pi_bad", "policy": "pi_bad",
     "split": "validation", "judge_score": 0.0, "oracle_label": 0.18,
     "inclusion_probability": 0.25}        # oracle.validation_fraction

  No CJE loader looks in that folder unless told to. CJE 0.9 takes each file as a held-out
  transport probe (``--transport-probe pi_bad=<data_dir>/cje/validation/pi_bad.jsonl
  --transport-margin pi_bad=0.1``): it checks whether the base policy's calibration carries over
  to that target, and with ``observation_id`` it refuses a probe that was also used to fit.

``observation_id`` is ``<prompt_id>/<policy>``, the judged response's identity, the same in every
file that carries that response.

How many calibration labels CJE needs is in CJE_FULL_LABELS and CJE_MIN_LABELS below;
stage 5 reports it for each run (cje_readiness).

Phase-2 layout (the older experiment scripts' file names, in ``<data_dir>``):

* ``p0_scored_deterministic.jsonl``: one per prompt, the base policy's response:
  ``prompt_id, prompt, response, policy, model, temperature, judge_score`` (deterministic),
  ``base_policy_logprob`` (teacher-forced), ``sampling_logprob``, ``target_policy_logprobs``
  {every target: teacher-forced logprob of this response}, ``n_tokens, finish_reason``.
* ``p0_scored_uncertainty.jsonl``: the same, but ``judge_score`` is the judge distribution's mean
  and ``judge_score_variance`` its variance.
* ``targets_scored_deterministic.jsonl`` / ``targets_scored_uncertainty.jsonl``: one per
  (prompt, target policy), each target's own response: ``prompt_id, prompt, response, policy,
  model, temperature, judge_score`` (deterministic, resp. mean + ``judge_score_variance``),
  ``sampling_logprob`` (under the policy that sampled it), ``n_tokens, finish_reason``.
* ``labeling/oracle_labels_calibration_detailed.jsonl`` / ``..._validation_detailed.jsonl``: one per
  oracle label (calibration: base policy; validation: targets), in prompt then policy order:
  ``prompt_id, prompt, response, policy, split, oracle_label, oracle_raw, judge_score,
  judge_mean, judge_variance``.

The name "p0" in the phase-2 file names is fixed (that is the layout's name for the base policy);
the ``policy`` field holds the configured base policy's name.
"""

from __future__ import annotations

import math
from pathlib import Path

from .config import Config
from .files import (CALIBRATION, FRESH_DIR, LOGGED_DATA, P0_DET, P0_UNC, TARGETS_DET, TARGETS_UNC, VALIDATION,
                    VALIDATION_DIR)
from .store import write_jsonl


# How many oracle labels CJE needs to calibrate the judge (read in cje-eval's source). 0.3's
# analyze_dataset cross-fits the calibration on the logged data's labels in 5 folds of at least 2
# and stops below 10 ("Too few oracle samples"). From 4 labels, 0.3's Direct mode and 0.9's
# `cje analyze` cut the folds to max(2, labels // 2), and scripts/cje_roundtrip.py does the same
# for 0.3's IPS and DR; below 4 nothing calibrates and only raw judge scores are left.
CJE_FULL_LABELS = 10
CJE_MIN_LABELS = 4


def cje_readiness(config: Config, data) -> dict:
    """What CJE can do with this run's calibration labels, and what to do when it is not enough."""
    base, fraction = config.base_policy, config.oracle.calibration_fraction
    n = sum(1 for (_, pol) in data.oracle if pol == base)
    # Labels are a seeded hash-threshold sample, so a count is fraction x prompts only on average.
    prompts = {k: math.ceil(labels / fraction) for k, labels in
               (("full", CJE_FULL_LABELS), ("reduced", CJE_MIN_LABELS))}
    need = (f"CJE 0.3's analyze_dataset (calibrated IPS, DR) needs {CJE_FULL_LABELS} calibration labels "
            f"({base} responses with an oracle label; about {prompts['full']} prompts at calibration_fraction "
            f"{fraction:g}); from {CJE_MIN_LABELS} labels (about {prompts['reduced']} prompts) "
            "scripts/cje_roundtrip.py and CJE 0.9's `cje analyze` calibrate with fewer folds")
    if n >= CJE_FULL_LABELS:
        regime, todo = "full", "every CJE path calibrates as documented"
    elif n >= CJE_MIN_LABELS:
        regime = "reduced_folds"
        todo = (f"analyze_dataset stops here; use scripts/cje_roundtrip.py ({max(2, n // 2)} folds) or "
                f"`cje analyze`, or run about {prompts['full']} prompts or raise oracle.calibration_fraction")
    else:
        regime = "uncalibrated"
        todo = ("no CJE version can calibrate the judge: scripts/cje_roundtrip.py estimates with raw judge "
                "scores as rewards and `cje analyze` reports UNCALIBRATED judge means; for calibrated "
                f"estimates run at least about {prompts['reduced']} prompts or raise oracle.calibration_fraction")
    return {"calibration_labels": n, "validation_labels": {t: sum(1 for (_, pol) in data.oracle if pol == t)
                                                           for t in config.target_policies},
            "full_from_labels": CJE_FULL_LABELS, "reduced_from_labels": CJE_MIN_LABELS,
            "full_from_prompts_about": prompts["full"], "reduced_from_prompts_about": prompts["reduced"],
            "regime": regime, "advice": todo, "thresholds": need}


def fresh_draws_path(policy: str) -> str:
    return f"{FRESH_DIR}/{policy}_responses.jsonl"


def validation_path(policy: str) -> str:
    return f"{VALIDATION_DIR}/{policy}.jsonl"


def logged_records(config: Config, data) -> list[dict]:
    base, targets = config.base_policy, config.target_policies
    out = []
    for p in data.prompts:
        pid = p.prompt_id
        r, j = data.responses[(pid, base)], data.judge[(pid, base)]
        o = data.oracle.get((pid, base))
        rec = {"prompt_id": pid, "observation_id": observation_id(pid, base), "prompt": p.prompt,
               "response": r.response, "base_policy_logprob": data.logprobs[(pid, base)].logprob,
               "target_policy_logprobs": {t: data.exported_logprob(pid, t, base) for t in targets},
               "judge_score": j.score}
        meta = {"prompt_id": pid, "base_policy": base, "judge_score": j.score}
        if o is not None:
            rec["oracle_label"] = o.label
            meta["oracle_label"] = o.label
        meta.update({"judge_mean": j.mean, "judge_variance": j.variance,
                     "base_policy_sampling_logprob": r.sampling_logprob,
                     "n_tokens": r.n_tokens, "finish_reason": r.finish_reason,
                     # The tokens the log-probabilities cover (CJE's per-token TTC reads it, and
                     # falls back to characters without it).
                     "response_token_count": data.logprobs[(pid, base)].n_tokens,
                     # The oracle's sampling design: every base response is labeled with this
                     # probability, independently (stages/oracle.py), labeled or not.
                     "oracle_inclusion_probability": config.oracle.calibration_fraction,
                     # How much of the response the log-probabilities score (see stages/logprobs.py).
                     "scored_bytes": data.logprobs[(pid, base)].scored_bytes,
                     "scored_complete": data.logprobs[(pid, base)].complete})
        texts = {t: {"target_logprob": data.logprobs[(pid, t)].logprob,
                     "base_logprob": data.base_text[(pid, base)].logprob}
                 for t in targets if data.logprobs[(pid, t)].event == "text"}
        if texts:
            # Targets with another tokenizer score the response's text (ope_prep/events.py):
            # target_policy_logprobs holds base_policy_logprob plus that weight.
            meta["text_event"] = texts
        rec["metadata"] = meta
        out.append(rec)
    return out


def observation_id(prompt_id: str, policy: str) -> str:
    """The judged response's identity, the same in every file that carries it (CJE 0.9 reads it
    to tell one response labeled twice from two responses)."""
    return f"{prompt_id}/{policy}"


def fresh_draw_records(config: Config, data, policy: str) -> list[dict]:
    """One policy's responses as CJE fresh draws, with no oracle label: the base policy's labels
    reach CJE through logged_data.jsonl (a second copy here would count them twice when CJE 0.9
    pools --calibration-data with the fresh draws), and the targets' are held out
    (validation_records)."""
    out = []
    for p in data.prompts:
        pid = p.prompt_id
        r, j = data.responses[(pid, policy)], data.judge[(pid, policy)]
        out.append({"prompt_id": pid, "observation_id": observation_id(pid, policy), "prompt": p.prompt,
                    "response": r.response, "policy": policy, "judge_score": j.score, "draw_idx": 0,
                    "metadata": {"judge_mean": j.mean, "judge_variance": j.variance,
                                 "sampling_logprob": r.sampling_logprob, "n_tokens": r.n_tokens,
                                 "response_token_count": r.n_tokens, "finish_reason": r.finish_reason}})
    return out


def validation_records(config: Config, data, policy: str) -> list[dict]:
    """A target policy's held-out oracle labels, in a file no CJE loader reads unless told to;
    each with the probability that its response was chosen for a label (the sampling design)."""
    out = []
    for p in data.prompts:
        o = data.oracle.get((p.prompt_id, policy))
        if o is not None:
            out.append({"prompt_id": p.prompt_id, "observation_id": observation_id(p.prompt_id, policy),
                        "policy": policy, "split": o.split, "judge_score": data.judge[(p.prompt_id, policy)].score,
                        "oracle_label": o.label, "inclusion_probability": config.oracle.validation_fraction})
    return out


def _scored(config: Config, data, pid: str, prompt: str, policy: str, uncertainty: bool) -> dict:
    r, j = data.responses[(pid, policy)], data.judge[(pid, policy)]
    pol = config.policy(policy)
    rec = {"prompt_id": pid, "prompt": prompt, "response": r.response, "policy": policy,
           "model": pol.model, "temperature": pol.temperature}
    if uncertainty:
        rec["judge_score"] = j.mean
        rec["judge_score_variance"] = j.variance
    else:
        rec["judge_score"] = j.score
    if policy == config.base_policy:
        rec["base_policy_logprob"] = data.logprobs[(pid, policy)].logprob
        rec["sampling_logprob"] = r.sampling_logprob
        rec["target_policy_logprobs"] = {t: data.exported_logprob(pid, t, policy) for t in config.target_policies}
    else:
        rec["sampling_logprob"] = r.sampling_logprob
    rec["n_tokens"] = r.n_tokens
    rec["finish_reason"] = r.finish_reason
    return rec


def _labels(config: Config, data, policies: list[str]) -> list[dict]:
    out = []
    for p in data.prompts:
        for pol in policies:
            o = data.oracle.get((p.prompt_id, pol))
            if o is None:
                continue
            j = data.judge[(p.prompt_id, pol)]
            out.append({"prompt_id": p.prompt_id, "prompt": p.prompt,
                        "response": data.responses[(p.prompt_id, pol)].response, "policy": pol,
                        "split": o.split, "oracle_label": o.label, "oracle_raw": o.raw,
                        "judge_score": j.score, "judge_mean": j.mean, "judge_variance": j.variance})
    return out


def write_all(config: Config, data) -> dict[str, dict]:
    """Write the CJE export and the phase-2 files; returns {relpath: manifest}."""
    d: Path = config.data_dir
    base, targets = config.base_policy, config.target_policies
    out = {LOGGED_DATA: write_jsonl(d / LOGGED_DATA, logged_records(config, data))}
    for pol in (base, *targets):
        out[fresh_draws_path(pol)] = write_jsonl(d / fresh_draws_path(pol), fresh_draw_records(config, data, pol))
    for t in targets:
        out[validation_path(t)] = write_jsonl(d / validation_path(t), validation_records(config, data, t))
    for rel, unc in ((P0_DET, False), (P0_UNC, True)):
        out[rel] = write_jsonl(d / rel, (_scored(config, data, p.prompt_id, p.prompt, base, unc)
                                         for p in data.prompts))
    for rel, unc in ((TARGETS_DET, False), (TARGETS_UNC, True)):
        out[rel] = write_jsonl(d / rel, (_scored(config, data, p.prompt_id, p.prompt, t, unc)
                                         for p in data.prompts for t in targets))
    out[CALIBRATION] = write_jsonl(d / CALIBRATION, _labels(config, data, [base]))
    out[VALIDATION] = write_jsonl(d / VALIDATION, _labels(config, data, targets))
    return out
