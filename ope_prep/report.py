"""The human side of stage 5: report.md, PNG plots beside it, and the terminal summary.

Plots are drawn on matplotlib's Agg canvas through ``matplotlib.figure.Figure`` (no pyplot, no
display, no global state), rendered to bytes and written atomically like every final file.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from .config import Config
from .dataset import Dataset
from .files import PLOTS_DIR
from .store import atomic_write_bytes

JUDGE_PLOT = f"{PLOTS_DIR}/judge_scores.png"
CALIBRATION_PLOT = f"{PLOTS_DIR}/judge_vs_oracle_calibration.png"
VALIDATION_PLOT = f"{PLOTS_DIR}/judge_vs_oracle_validation.png"
MAX_REPORT_ROWS = 20


def log_weight_plot(policy: str) -> str:
    return f"{PLOTS_DIR}/log_weights_{policy}.png"


def write_bytes(path: Path, data: bytes) -> dict:
    atomic_write_bytes(path, data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "records": 1}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    # No "Software" tag: the bytes then depend only on the data and the matplotlib version.
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def _figure(w: float = 6.4, h: float = 4.0):
    from matplotlib.figure import Figure
    return Figure(figsize=(w, h), layout="constrained")


# ---- plots ------------------------------------------------------------------------------------------

def write_plots(config: Config, data: Dataset, info: dict) -> dict[str, dict]:
    d = config.data_dir
    base = config.base_policy
    pids = [p.prompt_id for p in data.prompts]
    out: dict[str, dict] = {}
    for t in config.target_policies:
        lw = data.log_weights(t, base)
        tinfo = info["targets"][t]
        fig = _figure()
        ax = fig.add_subplot()
        span = float(np.max(lw) - np.min(lw))
        if span == 0:
            ax.hist(lw, bins=1, range=(lw[0] - 0.5, lw[0] + 0.5), color="tab:blue")
        else:
            ax.hist(lw, bins=min(60, max(10, len(lw) // 10)), color="tab:blue")
        ax.axvline(0.0, color="black", lw=1, ls="--", label="log w = 0 (same as base)")
        ax.set_xlabel(f"log w = log p_{t} - log p_{base}  (per prompt, {base}'s response)")
        ax.set_ylabel("prompts")
        ax.set_title(f"{t}: log importance weights (n={tinfo['n']}, ESS {tinfo['ess_fraction']:.1%}, "
                     f"max share {tinfo['max_weight_share']:.1%})", fontsize=10)
        ax.legend(fontsize=8)
        out[log_weight_plot(t)] = write_bytes(d / log_weight_plot(t), _png(fig))

    names = [p.name for p in config.policies]
    cols = min(2, len(names))
    rows = (len(names) + cols - 1) // cols
    fig = _figure(4.0 * cols, 2.6 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, squeeze=False)).ravel()
    bins = np.linspace(0, 1, 21)
    for ax, name in zip(axes, names):
        s = np.array([data.judge[(pid, name)].score for pid in pids], dtype=float)
        pinfo = info["policies"][name]["judge"]
        ax.hist(s, bins=bins, color="tab:green" if name != base else "tab:gray")
        ax.set_title(f"{name}: mean {pinfo['mean']:.3f}" + (f" ± {pinfo['se']:.3f}" if pinfo["se"] is not None else ""),
                     fontsize=10)
        ax.set_xlim(0, 1)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.supxlabel("judge score (deterministic)")
    fig.supylabel("responses")
    out[JUDGE_PLOT] = write_bytes(d / JUDGE_PLOT, _png(fig))

    def scatter(rel: str, policies: list[str], split: str) -> None:
        fig = _figure(5.0, 5.0)
        ax = fig.add_subplot()
        total = 0
        for name in policies:
            labeled = [pid for pid in pids if (pid, name) in data.oracle]
            x = [data.judge[(pid, name)].score for pid in labeled]
            y = [data.oracle[(pid, name)].label for pid in labeled]
            total += len(x)
            o = info["policies"][name]["oracle"]
            r = f"r={o['pearson_r']:.2f}" if o["pearson_r"] is not None else "r=n/a"
            ax.scatter(x, y, s=14, alpha=0.5, label=f"{name} (n={len(x)}, {r})")
        ax.plot([0, 1], [0, 1], color="black", lw=1, ls="--")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("judge score")
        ax.set_ylabel("oracle label")
        ax.set_title(f"judge vs oracle, {split} set ({total} labels)", fontsize=10)
        if total:
            ax.legend(fontsize=8, loc="upper left")
        out[rel] = write_bytes(d / rel, _png(fig))

    scatter(CALIBRATION_PLOT, [base], "calibration")
    scatter(VALIDATION_PLOT, config.target_policies, "validation")
    return out


# ---- report.md -----------------------------------------------------------------------------------

def _f(x, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_report(config: Config, info: dict) -> str:
    run, checks, pols, tgts = info["run"], info["checks"], info["policies"], info["targets"]
    base = run["base_policy"]
    out = ["# OPE dataset report", ""]
    out += [f"{run['n_prompts']} prompts; run seed **{run['seed']}** (it drew the prompt sample and "
            f"decided the oracle subsets: {run['oracle_fractions']['calibration']:.0%} of {base}'s "
            f"responses for calibration, {run['oracle_fractions']['validation']:.0%} of each target's "
            "for validation).", ""]
    out += [_table(["policy", "role", "model", "temperature"],
                   [[n, p["role"], p["model"], f"{p['temperature']:g}"] for n, p in pols.items()]), ""]
    out += excluded_section(run.get("excluded_prompts") or {}, run["n_prompts"], run.get("excluded_profile"))
    out += passed_over_section(run.get("skipped") or {})

    out += ["## Checks", "", "All checks that stop bad data passed: every file parses, every "
            "(prompt, policy) has exactly one response, teacher-forced log-probability and judge "
            "score, no log-probability is positive, NaN or infinite, and judge and oracle values "
            "lie in [0, 1].", ""]
    c = checks["clone"]
    if c is not None:
        out += [f"- **{c['policy']}** log-weight: max |log w| = {_f(c['max_abs_log_weight'], '.3g')} over "
                f"{c['n']} prompts (tolerance {c['tolerance']:g}).", ""]
    t = checks["tf_vs_sampling"]
    out += [f"- **{base}** teacher-forced vs sampling log-probability of each token of its own "
            f"responses (logprobs.jsonl): worst token {_f(t['max'], '.3g')} nats over {t['n']} responses "
            f"(tolerance {t['tolerance_per_token']:g}, any token above it fails the run).", ""]
    te = checks["scored_events"]["text_events"]
    if te["n"]:
        out += [f"- **Across tokenizers** ({', '.join(te['tokenizers_differ'])}): a weight scores the response's "
                "text, whose probability is the sum over the token sequences that spell it (the text, then "
                "the stop; for a response cut at max_tokens, \"it begins with these bytes\"), under the target "
                f"and under {base} alike (base_text_logprobs.jsonl). {te['n']} text events, "
                f"{_f(te['mean_paths'], '.2g')} spellings each on average (at most {te['max_paths']}), which add "
                f"up to {_f(te['gain_over_best_path']['max'], '.3g')} nats to the best one's log-probability "
                f"({te['n_gain_over_0.1_nat']} add more than 0.1); the bound on a text's probability left out "
                f"(a loose one: text_probability.py) is at most {_f(te['dropped_bound']['max'], '.2g')}.", ""]
    out += ["**Self-consistency**: each policy's own responses teacher-forced under itself, in a "
            "pass of its own (self_consistency.jsonl), against the log-probabilities the sampler drew "
            "them with; |difference| per token, each response's worst token:", ""]
    out += [_table(["policy", "responses checked", "max", "q99"],
                   [[n, str(c["n"]), _f(c["max"], ".3g"), _f(c["q99"], ".3g")]
                    for n, c in checks["self_consistency"].items()]), ""]

    out += ["## Policies", "", "Judge score: the deterministic score on each policy's own responses "
            "(mean ± standard error). Oracle agreement on the labeled set: the calibration set for "
            f"{base}, the validation set for targets.", ""]
    rows = []
    for n, p in pols.items():
        j, o = p["judge"], p["oracle"]
        rows.append([n, str(p["n"]), _f(p["mean_tokens"], ".1f"), _pct(p["fraction_truncated"]),
                     f"{_f(j['mean'])} ± {_f(j['se'])}", _pct(j["coverage"]), _f(j["mean_variance"], ".4f"),
                     o["split"], str(o["n"]), _pct(o["coverage"]), _f(o["mean_label"]),
                     _f(o["pearson_r"]), _f(o["mean_abs_diff"])])
    out += [_table(["policy", "n", "mean tokens", "truncated", "judge score", "judged",
                    "judge variance", "oracle split", "labels", "labeled", "mean label",
                    "Pearson r", "mean abs diff"], rows), ""]

    out += discrimination_section(info["discrimination"], base)

    out += ["## OPE diagnostics", "",
            f"An importance-weighted estimate reuses {base}'s responses to say how a target would "
            f"score: each response counts with its weight w = exp(log p_target − log p_{base}), how "
            f"much likelier the target is than {base} to have written it. Such an estimate is only as "
            "good as the overlap between the two policies, and these figures say how good that is.", "",
            "- **ESS** (effective sample size, (Σw)² / Σw², as a share of n): how many of the n "
            "prompts the estimate effectively rests on. 100% when every weight is equal (the clone); "
            "below about 10% the estimate is carried by a handful of prompts and its error bars are "
            "not to be trusted.",
            "- **max weight share**: the share of the total weight held by the single heaviest "
            "response. Near 1/n is healthy; tens of percent means one response decides the estimate.",
            "- **log w quantiles**: the spread of the log-weights; a long upper tail is what makes the "
            "two figures above bad.",
            "- **typicality coverage** (target-typicality coverage): the share of "
            f"{base}'s responses that look typical to the target, i.e. fall in the per-token surprisal "
            "band that holds 90% of the target's own probability. About 0.9 for a target identical "
            f"to {base}; below 0.7 (CJE's gate) {base} rarely writes what the target would, and no "
            "reweighting can recover what was never logged.",
            f"- **SNIPS judge**: the self-normalised importance-weighted estimate of the target's mean "
            f"judge score from {base}'s responses alone, beside the target's own mean judge score "
            "(on-policy judge). When the two are far apart with good ESS, suspect the judge; with poor "
            "ESS, suspect the weights.", ""]
    rows = []
    for n, d in tgts.items():
        lw = d["log_weight"]
        rows.append([n, _pct(d["ess_fraction"]), _pct(d["max_weight_share"]),
                     *(_f(lw[k], ".3g") for k in ("q50", "q90", "q99", "max")),
                     _f(d["typicality_coverage"], ".2f"),
                     _f(d["snips_judge_estimate"]), _f(d["on_policy_judge_mean"])])
    out += [_table(["target", "ESS", "max weight share", "log w q50", "log w q90", "log w q99",
                    "log w max", "typicality coverage", "SNIPS judge", "on-policy judge"], rows), ""]
    if checks["notes"]:
        out += ["Notes:", ""] + [f"- {n}" for n in checks["notes"]] + [""]

    out += ["## Suspicious values", "", "Legal but worth a look; they do not stop the pipeline.", ""]
    s = checks["suspicious"]
    for key, title in (("low_per_token_logprob",
                        f"Per-token log-probability below {s['low_per_token_logprob']['threshold']:g}"),):
        items = s[key]["examples"]
        out += [f"**{title}**: {s[key]['count']}", ""]
        if items:
            shown = items[:MAX_REPORT_ROWS]
            out += [_table(["file", "line", "prompt_id", "policy", "logprob", "tokens", "per token"],
                           [[i["file"], str(i["line"]), i["prompt_id"], i["policy"], _f(i["logprob"], ".4g"),
                             str(i["n_tokens"]), _f(i["per_token"], ".3g")] for i in shown]), ""]
            if s[key]["count"] > len(shown):
                out += [f"... and {s[key]['count'] - len(shown)} more (dataset_info.json lists up to "
                        f"{len(items)}).", ""]

    out += ["## Plots", ""]
    for tname in tgts:
        out += [f"![log-weights of {tname}]({log_weight_plot(tname)})", ""]
    out += [f"![judge scores]({JUDGE_PLOT})", "", f"![judge vs oracle, calibration]({CALIBRATION_PLOT})", "",
            f"![judge vs oracle, validation]({VALIDATION_PLOT})", ""]

    out += ["## CJE", "", cje_line(info["cje"]), "",
            "CJE 0.3 (off-policy: calibrated IPS, DR): `cje/logged_data.jsonl` (logged data) and "
            "`cje/responses/` (fresh draws; pass it as `fresh_draws_dir`). CJE 0.9 (Direct mode): "
            "`cje analyze cje/responses --calibration-data cje/logged_data.jsonl`. The targets' held-out "
            "validation labels are in `cje/validation/<policy>.jsonl` (field `oracle_label`), which no "
            "CJE loader reads unless told to: CJE 0.9 takes them as `--transport-probe "
            "<policy>=cje/validation/<policy>.jsonl`.", ""]
    out += cost_section(info.get("cost") or [])
    out += ["## Files", "", "Machine-readable numbers: `dataset_info.json`.", ""]
    out += [_table(["file", "records"], [[f"`{rel}`", str(n)] for rel, n in info.get("outputs", {}).items()]), ""]
    return "\n".join(out)


def cost_section(rows: list[dict]) -> list[str]:
    """Requests, tokens and dollars per stage and model (each stage's last run; the request caches
    in cache/ hold what was paid over all runs)."""
    if not rows:
        return []
    total = sum(r["usd"] or 0.0 for r in rows)
    return ["## Cost", "", f"Each stage's last run, per model: **${total:.4f}** in all (prices from the "
            "config; in-process models cost nothing). A rerun is answered from the request caches in "
            "`cache/`.", "",
            _table(["stage", "model", "HTTP requests", "from cache", "input tokens", "output tokens", "USD"],
                   [[r["stage"], r["model"], str(r["calls"] or 0), str(r["cached"] or 0),
                     str(r["input_tokens"] or 0), str(r["output_tokens"] or 0), f"{r['usd'] or 0.0:.4f}"]
                    for r in rows]), ""]


def excluded_section(excluded: dict, n_included: int, profile: dict | None = None) -> list[str]:
    """The prompts left out because a unit of theirs was quarantined (failed the same way every
    time): what they have in common (stage and reason, source, length), then each with its first
    reason."""
    if not excluded:
        return ["No prompt was left out: no unit was quarantined.", ""]
    out = ["## Left out", "", f"**{len(excluded)} of {len(excluded) + n_included} prompts are left out** of "
           "the dataset for every policy (OPE needs each prompt complete): a unit of theirs failed the "
           "same way on every try and was quarantined (`quarantine/<stage>.jsonl`). The estimate is "
           "for the prompts kept: if the left-out ones differ (longer, or from one source), say so "
           "wherever it is reported.", ""]
    if profile:
        out += [_table(["stage: reason", "prompts"], [[r, str(n)] for r, n in profile["by_reason"].items()]), ""]
        out += [_table(["source", "left out", "kept", "left out share"],
                       [[s, str(c["left_out"]), str(c["kept"]),
                         f"{c['left_out'] / max(1, c['left_out'] + c['kept']):.0%}"]
                        for s, c in profile["by_source"].items()]), ""]
        gone, kept = profile["prompt_chars"]["left_out"], profile["prompt_chars"]["kept"]
        if gone and kept:
            out += [f"Prompt length in characters: left out median {gone['median']:.0f} (max {gone['max']}), "
                    f"kept median {kept['median']:.0f} (max {kept['max']}).", ""]
    out += [_table(["prompt", "stage", "unit", "reason"],
                   [[pid, qs[0]["stage"], qs[0]["key"], qs[0]["error"][:160]] for pid, qs in excluded.items()]), ""]
    return out


def passed_over_section(skipped: dict) -> list[str]:
    """Stage 1's candidates passed over, per reason, over all sources (run.json's ``skipped``): the
    ones for a context (a policy's, the judge's, the oracle's) are prompts the run cannot hold."""
    totals: dict[str, int] = {}
    for reasons in skipped.values():
        for reason, n in reasons.items():
            totals[reason] = totals.get(reason, 0) + n
    if not totals:
        return []
    return ["Stage 1 passed over these candidates (per source in `run.json`):", "",
            _table(["reason", "candidates"], [[r, str(n)] for r, n in sorted(totals.items(), key=lambda x: -x[1])]),
            ""]


def _z(gap: dict) -> str:
    return "n/a" if gap["z"] is None else f"{gap['z']:+.1f}"


def discrimination_section(d: dict, base: str) -> list[str]:
    """The judge's spread, its agreement with the oracle, and base − target gaps, as report lines."""
    out = ["## Judge discrimination", "", "Whether the judge's scores carry signal. Spread: over every "
           "policy's responses. Spearman: rank correlation with the oracle label on the labeled "
           f"responses. Gap: {base}'s mean judge score minus the target's, paired by prompt, and that gap "
           "in standard errors (z).", ""]
    if d["notes"]:
        out += [f"**{note[0].upper()}{note[1:]}.**" for note in d["notes"]] + [""]
    sp = d["spread"]
    out += [_table(["judge", "responses", "distinct values", "std", "range"],
                   [[what, str(sp[key]["n"]), str(sp[key]["n_distinct"]), _f(sp[key]["std"]),
                     f"{_f(sp[key]['lo'])} to {_f(sp[key]['hi'])}"]
                    for what, key in (("deterministic score", "score"), ("distribution mean", "mean"))]), ""]
    agree = d["judge_vs_oracle"]
    out += [_table(["labeled set", "labels", "Spearman (score)", "Spearman (mean)"],
                   [[split, str(a["n"]), *(_f(a[w]["spearman"], ".2f") if a[w]["spearman"] is not None
                                          else f"undefined: {a[w]['undefined']}" for w in ("score", "mean"))]
                    for split, a in agree.items()]), ""]
    out += [_table(["target", "prompts", f"gap {base} − target (score)", "z (score)", "gap (mean)", "z (mean)"],
                   [[t, str(g["score"]["n"]), _f(g["score"]["gap"], "+.3f"), _z(g["score"]),
                     _f(g["mean"]["gap"], "+.3f"), _z(g["mean"])] for t, g in d["base_minus_target"].items()]), ""]
    return out


def cje_line(cje: dict) -> str:
    """From what number of labels CJE calibrates, and what this run can do (report, terminal, runner)."""
    return (f"calibration labels: {cje['calibration_labels']} ({cje['regime'].replace('_', ' ')}): "
            f"{cje['advice']}. {cje['thresholds']}.")


def write_report(path: Path, config: Config, info: dict) -> dict:
    return write_bytes(path, render_report(config, info).encode("utf-8"))


def terminal_summary(config: Config, info: dict) -> str:
    run, checks = info["run"], info["checks"]
    t = checks["tf_vs_sampling"]
    lines = [f"[summarize] {run['n_prompts']} prompts, seed {run['seed']}: all checks passed "
             f"(TF vs sampling, worst token: {_f(t['max'], '.2g')} nats over {t['n']} {run['base_policy']} "
             f"responses; self-consistency: "
             + ", ".join(f"{n} {_f(c['max'], '.2g')}" for n, c in checks["self_consistency"].items())
             + (f"; {checks['clone']['policy']} max |log w| {_f(checks['clone']['max_abs_log_weight'], '.2g')}"
                if checks["clone"] else "") + ")"]
    width = max(len(n) for n in info["policies"])
    for n, p in info["policies"].items():
        j, o = p["judge"], p["oracle"]
        line = (f"  {n:<{width}}  judge {_f(j['mean'])} ± {_f(j['se'])}  {o['split']} labels {o['n']}"
                f" (r {_f(o['pearson_r'], '.2f')}, |judge-oracle| {_f(o['mean_abs_diff'], '.2f')})")
        d = info["targets"].get(n)
        if d:
            line += (f"  ESS {_pct(d['ess_fraction'])}, max w share {_pct(d['max_weight_share'])}, "
                     f"log w q99 {_f(d['log_weight']['q99'], '.3g')}, typicality {_f(d['typicality_coverage'], '.2f')}, "
                     f"SNIPS judge {_f(d['snips_judge_estimate'])}")
        lines.append(line)
    for note in checks["notes"] + info["discrimination"]["notes"]:
        lines.append(f"  note: {note}")
    lines.append(f"  CJE: {cje_line(info['cje'])}")
    lines.append(f"  report: {config.data_dir / 'report.md'}")
    return "\n".join(lines)
