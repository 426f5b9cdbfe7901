"""Stage 5: check every file, compute statistics and OPE diagnostics, write the report and exports.

Nothing is written unless every check passes. A check that fails is a problem listed on its own
line, and all problems go out together in one ValidationFailed (exit code 1), so one run shows
everything that is wrong. What the checks stop:

* a missing or damaged input file (a line that is not JSON, or not a record of its kind);
* a missing, duplicated or unknown (prompt, policy) record in responses, logprobs or judge scores;
  an oracle label for an unknown pair, twice for one pair, or in the wrong split;
* a log-probability that is positive, NaN, infinite or not a number;
* a record whose per-token log-probabilities do not match its token ids or do not sum to its
  log-probability; an exact 0.0 log-probability on a non-empty response (a computed 0 is a bug);
* pi_clone's log-weight (teacher-forced logprob under pi_clone minus under the base policy, each
  from a pass of its own in stage 2b) departing from 0 by more than ``validation.clone_tolerance``;
* on any record, any token whose teacher-forced log-probability differs from the log-probability
  the sampler drew it with by more than ``validation.tf_vs_sampling_tolerance_per_token``: the
  base policy's response under itself (logprobs.jsonl), and every policy's own responses under
  itself (self_consistency.jsonl: all of them up to 200 prompts, a seeded 200 beyond); scored
  tokens that are not the response's own, or fewer of them than a complete record says;
* a judge score, judge mean or oracle label outside [0, 1] (or a judge variance outside [0, 1/4]).

Suspicious but legal values (a per-token log-probability below
``validation.suspicious_per_token_logprob``) are listed in the report.

The base policy's log-probability used everywhere here (weights, export) is its teacher-forced
one from logprobs.jsonl, computed by the same code path as every target's, so a shared error
cancels in the weight; its sampling log-probability is kept in the export's metadata.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import diagnostics as dx
from ..config import Config
from ..export import cje_readiness
from ..files import (CALIBRATION, CJE_DIR, DATASET_INFO, JUDGE_SCORES, LOGPROBS, ORACLE_LABELS, P0_DET,
                     P0_UNC, PLOTS_DIR, PROMPTS, REPORT, RESPONSES, RUN_PARAMS, SELF_CONSISTENCY, TARGETS_DET,
                     TARGETS_UNC, VALIDATION, quarantine_file, usage_file)
from ..fingerprint import flatten
from ..errors import InputError, ValidationFailed
from ..records import JudgeScore, OracleLabel, Prompt, Quarantined, Response, SelfCheck, TeacherForced
from ..store import read_jsonl, write_json
from ..validate import check_scored_events
from .units import (exclusion_over_limit, low_overlap_targets, run_identity, self_check_prompts,
                    upstream_digests)

UPSTREAM = ["prepare", "generate", "logprobs", "judge", "oracle"]

# Fixed files, plus the folders that hold per-policy files (cje/responses/<policy>_responses.jsonl,
# plots/log_weights_<policy>.png): `--force` moves all of them aside. The exact files a run wrote
# are the keys of the manifest that run() returns.
OUTPUTS = [REPORT, DATASET_INFO, CJE_DIR, PLOTS_DIR, P0_DET, P0_UNC, TARGETS_DET, TARGETS_UNC, CALIBRATION,
           VALIDATION]

MAX_EXAMPLES = 5          # per problem line
MAX_LISTED = 100          # suspicious records kept in dataset_info.json


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

def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _fmt(x) -> str:
    return repr(x) if not _is_num(x) else f"{x:.6g}"


@dataclass
class Data:
    """Every input, keyed; filled as far as the files allow (a broken file leaves its part empty)."""

    run: dict = field(default_factory=dict)
    prompts: list[Prompt] = field(default_factory=list)
    responses: dict[tuple[str, str], Response] = field(default_factory=dict)
    logprobs: dict[tuple[str, str], TeacherForced] = field(default_factory=dict)
    self_checks: dict[tuple[str, str], SelfCheck] = field(default_factory=dict)
    judge: dict[tuple[str, str], JudgeScore] = field(default_factory=dict)
    oracle: dict[tuple[str, str], OracleLabel] = field(default_factory=dict)
    lines: dict[tuple[str, str, str], int] = field(default_factory=dict)   # (file, pid, pol) -> line
    # Prompts left out of the dataset (prompt_id -> the quarantined units and why); `prompts` and
    # every record above hold only the others.
    excluded: dict[str, list[Quarantined]] = field(default_factory=dict)
    all_prompt_ids: list[str] = field(default_factory=list)
    left_out: list[Prompt] = field(default_factory=list)     # the excluded prompts' records


class Problems:
    """Fatal problems, one line each: a rule, a count and the first few offending records."""

    def __init__(self):
        self.lines: list[str] = []

    def add(self, msg: str) -> None:
        self.lines.append(msg)

    def rule(self, file: str, what: str, items: list[str]) -> None:
        if items:
            shown = "; ".join(items[:MAX_EXAMPLES])
            more = f"; and {len(items) - MAX_EXAMPLES} more" if len(items) > MAX_EXAMPLES else ""
            self.add(f"{file}: {len(items)} {what}: {shown}{more}")


def _bad_line(path: Path) -> str | None:
    """Where and why a JSONL file fails to parse, said precisely (the first bad line)."""
    def reject(name):
        raise ValueError(name)
    try:
        data = path.read_bytes()
    except OSError as e:
        return f"{path}: cannot be read ({e.strerror})"
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip() and lineno == data.count(b"\n") + 1:
            break                           # the empty string after the final newline
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            return f"{path}: line {lineno}: not UTF-8"
        try:
            json.loads(line, parse_constant=reject)
        except ValueError:
            try:
                json.loads(line)
            except ValueError:
                return f"{path}: line {lineno}: not valid JSON"
            return f"{path}: line {lineno}: holds NaN or Infinity, which JSON does not allow"
    return None


def _read(problems: Problems, data_dir: Path, name: str, cls) -> list | None:
    path = data_dir / name
    try:
        return read_jsonl(path, cls)
    except InputError as e:
        msg = str(e)
        if "not valid JSON" in msg or "not UTF-8" in msg:
            msg = _bad_line(path) or msg
    except Exception as e:                  # noqa: BLE001 - say which file, whatever went wrong
        msg = _bad_line(path) or f"{path}: cannot be read ({type(e).__name__}: {e})"
    problems.add(msg)
    return None


def _read_run(problems: Problems, data_dir: Path) -> dict:
    path = data_dir / RUN_PARAMS
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.add(f"{path}: file not found")
        return {}
    except (OSError, ValueError) as e:
        problems.add(f"{path}: damaged ({type(e).__name__}: {e})")
        return {}
    if not isinstance(run, dict) or not isinstance(run.get("seed"), int) or isinstance(run.get("seed"), bool):
        problems.add(f"{path}: not a run record (needs an integer 'seed')")
        return {}
    return run


def _read_quarantine(problems: Problems, data_dir: Path, config: Config, prompt_ids: set[str]) -> dict:
    """prompt_id -> its quarantined units, from every unit stage's quarantine file; a problem when
    more of the run's prompts are left out than validation.max_excluded_fraction allows."""
    excluded: dict[str, list[Quarantined]] = {}
    for stage in UPSTREAM[1:]:
        if (data_dir / quarantine_file(stage)).exists():
            for q in _read(problems, data_dir, quarantine_file(stage), Quarantined) or []:
                excluded.setdefault(q.prompt_id, []).append(q)
    problems.rule("quarantine", "quarantined units name a prompt that is not in the run",
                  [f"{q.stage} {q.key}" for pid, qs in excluded.items() if pid not in prompt_ids for q in qs])
    problem = exclusion_over_limit(len(excluded), len(prompt_ids), config.validation.max_excluded_fraction)
    if problem:
        problems.add(f"quarantine: {problem}: " + "; ".join(
            f"{pid} ({qs[0].stage} {qs[0].key}: {qs[0].error})" for pid, qs in sorted(excluded.items())[:MAX_EXAMPLES]))
    return excluded


def _index(problems: Problems, data: Data, name: str, records: list, expected: set | None,
           check_missing: bool = True) -> dict:
    """Key records by (prompt_id, policy); list duplicated, unknown and missing pairs."""
    out: dict = {}
    counts: Counter = Counter()
    bad_keys, unknown = [], []
    for lineno, r in enumerate(records, 1):
        if not isinstance(r.prompt_id, str) or not isinstance(r.policy, str):
            bad_keys.append(f"line {lineno}: prompt_id {r.prompt_id!r}, policy {r.policy!r}")
            continue
        key = (r.prompt_id, r.policy)
        counts[key] += 1
        if expected is not None and key not in expected:
            unknown.append(f"line {lineno} {r.prompt_id}/{r.policy}")
        out.setdefault(key, r)
        data.lines.setdefault((name, *key), lineno)
    problems.rule(name, "records whose prompt_id or policy is not a string", bad_keys)
    problems.rule(name, "records for an unknown prompt or policy", unknown)
    dup = [f"{k[0]}/{k[1]} x{n}" for k, n in counts.items() if n > 1]
    problems.rule(name, "(prompt, policy) pairs appear more than once", dup)
    if expected is not None and check_missing:
        missing = [f"{k[0]}/{k[1]}" for k in sorted(expected - set(counts))]
        problems.rule(name, "(prompt, policy) records are missing", missing)
    return out


def _check_logprob(bad: dict[str, list[str]], where: str, lp) -> bool:
    """True if lp is a legal log-probability; otherwise note why under its rule."""
    if not _is_num(lp):
        bad["not a number"].append(f"{where}: {lp!r}")
    elif math.isnan(lp):
        bad["NaN"].append(f"{where}: nan")
    elif math.isinf(lp):
        bad["infinite"].append(f"{where}: {lp}")
    elif lp > 0:
        bad["positive"].append(f"{where}: {lp:.6g}")
    else:
        return True
    return False


def _legal_values(values) -> bool:
    return isinstance(values, list) and all(_is_num(v) and math.isfinite(v) and v <= 0 for v in values)


def _token_logprobs_match(values, n_tokens, total) -> bool:
    """values is one finite log-probability <= 0 per token, and they sum to total (a total that
    is itself no log-probability is reported by its own rule, not here)."""
    if not _lp_ok(total):
        return True
    return (_legal_values(values) and isinstance(n_tokens, int) and len(values) == n_tokens
            and _is_num(total) and abs(math.fsum(values) - total) <= 1e-9 * max(1.0, abs(total)))


def _in_unit(x, hi: float = 1.0) -> bool:
    return _is_num(x) and math.isfinite(x) and 0.0 <= x <= hi


def load_and_check(config: Config) -> tuple[Data, dict, list[str]]:
    """Read and check every input. Returns (data, check results, fatal problems)."""
    data_dir = config.data_dir
    problems = Problems()
    data = Data()
    data.run = _read_run(problems, data_dir)
    policies = [p.name for p in config.policies]
    base = config.base_policy

    prompts = _read(problems, data_dir, PROMPTS, Prompt)
    expected = None
    if prompts is not None:
        problems.rule(PROMPTS, "records have a prompt_id or prompt that is not a string",
                      [f"line {i}" for i, p in enumerate(prompts, 1)
                       if not isinstance(p.prompt_id, str) or not isinstance(p.prompt, str)])
        ids = Counter(p.prompt_id for p in prompts if isinstance(p.prompt_id, str))
        problems.rule(PROMPTS, "prompt_ids appear more than once",
                      [f"{pid!r} x{n}" for pid, n in ids.items() if n > 1])
        if not prompts:
            problems.add(f"{data_dir / PROMPTS}: holds no prompts")
        data.all_prompt_ids = [p.prompt_id for p in prompts if isinstance(p.prompt_id, str)]
        data.excluded = _read_quarantine(problems, data_dir, config, set(data.all_prompt_ids))
        data.prompts = [p for p in prompts if p.prompt_id not in data.excluded]
        data.left_out = [p for p in prompts if p.prompt_id in data.excluded]
        expected = {(p.prompt_id, pol) for p in data.prompts if isinstance(p.prompt_id, str) for pol in policies}

    def included(records: list | None) -> list | None:
        """The records of prompts that are in the dataset (a left-out prompt's are not checked)."""
        if records is None or not data.excluded:
            return records
        return [r for r in records if r.prompt_id not in data.excluded]

    bad_lp: dict[str, dict[str, list[str]]] = {}

    def lp_rules(name: str) -> dict[str, list[str]]:
        return bad_lp.setdefault(name, {"not a number": [], "NaN": [], "infinite": [], "positive": []})

    def check_logprob_records(name: str, records: list, logprob, malformed, fields: str) -> None:
        rules, shape = lp_rules(name), []
        for lineno, r in enumerate(records, 1):
            where = f"line {lineno} {r.prompt_id}/{r.policy}"
            _check_logprob(rules, where, logprob(r))
            if malformed(r):
                shape.append(where)
        problems.rule(name, f"records are malformed ({fields})", shape)

    responses = included(_read(problems, data_dir, RESPONSES, Response))
    if responses is not None:
        data.responses = _index(problems, data, RESPONSES, responses, expected)
        check_logprob_records(
            RESPONSES, responses, lambda r: r.sampling_logprob,
            lambda r: (not isinstance(r.token_ids, list) or not isinstance(r.n_tokens, int)
                       or r.n_tokens != len(r.token_ids) or not isinstance(r.response, str)
                       or r.finish_reason not in ("stop", "length")
                       or not _token_logprobs_match(r.token_logprobs, r.n_tokens, r.sampling_logprob)),
            "response text, token_ids, n_tokens = len(token_ids), finish_reason stop/length, "
            "token_logprobs: one finite value <= 0 per token, summing to sampling_logprob")

    logprobs = included(_read(problems, data_dir, LOGPROBS, TeacherForced))
    if logprobs is not None:
        data.logprobs = _index(problems, data, LOGPROBS, logprobs, expected)
        check_logprob_records(
            LOGPROBS, logprobs, lambda r: r.logprob,
            lambda r: (not isinstance(r.n_tokens, int) or not isinstance(r.token_ids, list)
                       or len(r.token_ids) != r.n_tokens or not isinstance(r.complete, bool)
                       or not isinstance(r.scored_bytes, int) or isinstance(r.scored_bytes, bool)
                       or r.scored_bytes < 0
                       or not _token_logprobs_match(r.token_logprobs, r.n_tokens, r.logprob)),
            "n_tokens = len(token_ids), scored_bytes, complete, token_logprobs: one finite value "
            "<= 0 per token, summing to logprob")

    self_checks = included(_read(problems, data_dir, SELF_CONSISTENCY, SelfCheck))
    if self_checks is not None:
        seed = data.run.get("seed")
        wanted = None
        if expected is not None and seed is not None:
            # Chosen among all the run's prompts, as stage 2b chose them.
            wanted = {(pid, pol) for pol in policies for pid in self_check_prompts(seed, data.all_prompt_ids, pol)
                      if pid not in data.excluded}
        data.self_checks = _index(problems, data, SELF_CONSISTENCY, self_checks, wanted)
        problems.rule(SELF_CONSISTENCY, "records are malformed (token_logprobs: finite values <= 0)",
                      [f"line {i} {r.prompt_id}/{r.policy}" for i, r in enumerate(self_checks, 1)
                       if not _legal_values(r.token_logprobs)])

    for name, rules in bad_lp.items():
        for what, items in rules.items():
            problems.rule(name, f"log-probabilities are {what}", items)

    judge = included(_read(problems, data_dir, JUDGE_SCORES, JudgeScore))
    if judge is not None:
        data.judge = _index(problems, data, JUDGE_SCORES, judge, expected)
        out_of_range = []
        for lineno, j in enumerate(judge, 1):
            where = f"line {lineno} {j.prompt_id}/{j.policy}"
            for fname, hi in (("score", 1.0), ("mean", 1.0), ("variance", 0.25 + 1e-9)):
                v = getattr(j, fname)
                if not _in_unit(v, hi):
                    out_of_range.append(f"{where} {fname}={_fmt(v)}")
        problems.rule(JUDGE_SCORES, "judge values are outside [0, 1] (variance outside [0, 0.25]) or "
                      "not finite numbers", out_of_range)

    oracle = included(_read(problems, data_dir, ORACLE_LABELS, OracleLabel))
    if oracle is not None:
        data.oracle = _index(problems, data, ORACLE_LABELS, oracle, expected, check_missing=False)
        out_of_range, wrong_split = [], []
        for lineno, o in enumerate(oracle, 1):
            where = f"line {lineno} {o.prompt_id}/{o.policy}"
            if not _in_unit(o.label):
                out_of_range.append(f"{where} label={_fmt(o.label)}")
            want = "calibration" if o.policy == base else "validation"
            if o.split != want:
                wrong_split.append(f"{where} split {o.split!r} (want {want!r})")
        problems.rule(ORACLE_LABELS, "oracle labels are outside [0, 1] or not finite numbers", out_of_range)
        problems.rule(ORACLE_LABELS, "oracle labels are in the wrong split", wrong_split)

    checks = _propensity_checks(config, data, problems)
    return data, checks, problems.lines


def _lp_ok(x) -> bool:
    return _is_num(x) and math.isfinite(x) and x <= 0


def _shape_ok(r, logprob_attr: str) -> bool:
    return _lp_ok(getattr(r, logprob_attr)) and _token_logprobs_match(
        r.token_logprobs, r.n_tokens, getattr(r, logprob_attr))


def _worst_token(a: list[float], b: list[float]) -> float:
    """The largest per-token |difference| (0 for no tokens)."""
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def _spread(diffs: list[float]) -> dict:
    d = np.asarray(diffs, dtype=float)
    return {"n": len(d), "max": float(d.max()) if len(d) else None,
            "q99": float(np.quantile(d, 0.99)) if len(d) else None}


def _propensity_checks(config: Config, data: Data, problems: Problems) -> dict:
    """The clone, TF-vs-sampling and self-consistency rules; the zero and suspicious values."""
    vcfg = config.validation
    tol = config.tf_tolerance(config.base_policy)
    base, clone = config.base_policy, config.clone_policy
    pids = [p.prompt_id for p in data.prompts if isinstance(p.prompt_id, str)]
    checks: dict = {}

    def where(name: str, pid: str, pol: str) -> str:
        return f"line {data.lines.get((name, pid, pol))} {pid}/{pol}"

    # pi_clone's log-weight must be 0, over the very same tokens.
    if clone is not None:
        lws, off = [], []
        for pid in pids:
            a, b = data.logprobs.get((pid, clone)), data.logprobs.get((pid, base))
            if a is None or b is None or not _lp_ok(a.logprob) or not _lp_ok(b.logprob):
                continue
            lw = a.logprob - b.logprob
            lws.append(abs(lw))
            if abs(lw) > vcfg.clone_tolerance:     # other tokens: the scored-event rule says so
                off.append((abs(lw), f"{where(LOGPROBS, pid, clone)}: log-weight {lw:+.3g}"))
        off.sort(key=lambda t: -t[0])
        problems.rule(LOGPROBS, f"{clone} log-weights depart from 0 by more than clone_tolerance "
                      f"{vcfg.clone_tolerance:g} ({clone} is meant to be identical to {base}; largest first)",
                      [s for _, s in off])
        checks["clone"] = {"policy": clone, "tolerance": vcfg.clone_tolerance, "n": len(lws),
                           "n_over": len(off), "max_abs_log_weight": max(lws) if lws else None}
    else:
        checks["clone"] = None

    # Every record scores its base response's event (ope_prep/events.py), recomputed here.
    events = check_scored_events(config, pids, data.responses, data.logprobs, _shape_ok, where)
    problems.rule(RESPONSES, f"{base} responses say they stopped but do not end in a stop token", events["bad_stop"])
    problems.rule(LOGPROBS, "prompts have records although their base response has no event every "
                  "tokenizer shares (stage 2b quarantines those)", events["no_event"])
    problems.rule(LOGPROBS, f"records do not score the event of {base}'s response (the same tokens, "
                  "scored_bytes and complete as stage 2b's definition)", events["off"])
    checks["scored_events"] = {"n": events["n"], "n_off": len(events["off"])}

    # The base policy's response, teacher-forced under itself, token by token against the sampler.
    diffs, over, mismatch, partial, fractions = [], [], [], 0, []
    for pid in pids:
        r, t = data.responses.get((pid, base)), data.logprobs.get((pid, base))
        if r is None or t is None or not _shape_ok(r, "sampling_logprob") or not _shape_ok(t, "logprob"):
            continue
        if t.token_ids != r.token_ids[:t.n_tokens] or (t.complete and t.n_tokens != r.n_tokens):
            mismatch.append(pid)      # listed by the scored-event rule
            continue
        partial += not t.complete
        if isinstance(r.response, str):   # a malformed one is reported by its own rule
            text_bytes = len(r.text_bytes_hex) // 2 if isinstance(r.text_bytes_hex, str) else len(r.response.encode())
            fractions.append(t.scored_bytes / text_bytes if text_bytes else 1.0)
        d = _worst_token(t.token_logprobs, r.token_logprobs)
        diffs.append(d)
        if d > tol:
            over.append((d, f"{where(LOGPROBS, pid, base)}: a token {d:.3g} nats off"))
    over.sort(key=lambda t: -t[0])
    problems.rule(LOGPROBS, f"{base} records have a token whose teacher-forced log-probability differs "
                  f"from its sampling log-probability by more than {tol:g} nats (largest first)",
                  [s for _, s in over])
    checks["tf_vs_sampling"] = {
        "policy": base, "tolerance_per_token": tol, **_spread(diffs), "n_over": len(over),
        "token_count_mismatches": len(mismatch),
        # Scored prefixes (another tokenizer, and a response that was cut or is not plain text)
        "n_partial": partial, "mean_scored_fraction": float(np.mean(fractions)) if fractions else None,
    }

    # Every policy's own responses under itself, computed in a pass of its own by stage 2b.
    consistency, over, mismatch = {}, [], []
    for pol in config.policies:
        ds, tol = [], config.tf_tolerance(pol.name)
        for (pid, name), sc in data.self_checks.items():
            r = data.responses.get((pid, name))
            if name != pol.name or r is None or not _shape_ok(r, "sampling_logprob"):
                continue
            if not isinstance(sc.token_logprobs, list) or len(sc.token_logprobs) != r.n_tokens:
                mismatch.append(f"{where(SELF_CONSISTENCY, pid, name)}: "
                                f"{len(sc.token_logprobs) if isinstance(sc.token_logprobs, list) else '?'} "
                                f"values for {r.n_tokens} tokens")
                continue
            d = _worst_token(sc.token_logprobs, r.token_logprobs)
            ds.append(d)
            if d > tol:
                over.append((d, f"{where(SELF_CONSISTENCY, pid, name)}: a token {d:.3g} nats off "
                                f"(tolerance {tol:g})"))
        consistency[pol.name] = _spread(ds)
    over.sort(key=lambda t: -t[0])
    problems.rule(SELF_CONSISTENCY, "records do not have one value per token of their response", mismatch)
    problems.rule(SELF_CONSISTENCY, "responses have a token whose teacher-forced log-probability "
                  "differs from its sampling log-probability by more than the tolerance (largest first)",
                  [s for _, s in over])
    checks["self_consistency"] = consistency

    # An exact 0.0 on a non-empty response is a bug, not a certainty; very low values are listed.
    low = []
    for name, recs, attr in ((RESPONSES, data.responses, "sampling_logprob"),
                             (LOGPROBS, data.logprobs, "logprob")):
        zero = []
        for (pid, pol), r in recs.items():
            lp, n = getattr(r, attr), r.n_tokens
            if not _lp_ok(lp) or not isinstance(n, int) or n <= 0:
                continue
            if lp == 0.0:
                zero.append(where(name, pid, pol))
            elif lp / n < vcfg.suspicious_per_token_logprob:
                low.append({"file": name, "line": data.lines.get((name, pid, pol)), "prompt_id": pid,
                            "policy": pol, "logprob": lp, "n_tokens": n, "per_token": lp / n})
        problems.rule(name, "records have a log-probability of exactly 0.0 on a non-empty response", zero)
    low.sort(key=lambda it: it["per_token"])
    checks["suspicious"] = {
        "low_per_token_logprob": {"threshold": vcfg.suspicious_per_token_logprob, "count": len(low),
                                  "examples": low[:MAX_LISTED]},
    }
    return checks


# ---- statistics ------------------------------------------------------------------------------------

def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    # Constant inputs have no correlation; np.std of five copies of 1/9 is ~1e-17, not 0.
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def mean_se(x: np.ndarray) -> tuple[float | None, float | None]:
    if len(x) == 0:
        return None, None
    return float(np.mean(x)), (float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None)


def discrimination(config: Config, data: Data) -> dict:
    """Whether the judge's scores carry signal: their spread, their rank agreement with the oracle
    on the labeled units, and how far each target's mean score lies below the base policy's in
    standard errors (paired by prompt)."""
    base = config.base_policy
    pids = [p.prompt_id for p in data.prompts]
    every = [data.judge[(pid, p.name)] for p in config.policies for pid in pids]
    spread = {"score": asdict(dx.spread([j.score for j in every])),
              "mean": asdict(dx.spread([j.mean for j in every]))}
    agreement = {}
    for split, policies in (("all", [p.name for p in config.policies]), ("calibration", [base]),
                            ("validation", config.target_policies)):
        keys = [(pid, pol) for pol in policies for pid in pids if (pid, pol) in data.oracle]
        labels = [data.oracle[k].label for k in keys]
        agreement[split] = {"n": len(keys)}
        for what in ("score", "mean"):
            judged = [getattr(data.judge[k], what) for k in keys]
            agreement[split][what] = {
                "spearman": dx.spearman(judged, labels),
                "undefined": dx.spearman_undefined(judged, labels, (f"judge {what}", "oracle label"))}

    def by_prompt(policy: str, what: str) -> dict[str, float]:
        return {pid: getattr(data.judge[(pid, policy)], what) for pid in pids}

    gaps = {t: {what: asdict(dx.paired_gap(by_prompt(base, what), by_prompt(t, what))) for what in ("score", "mean")}
            for t in config.target_policies}
    notes = []
    if spread["score"]["n_distinct"] == 1:
        notes.append(f"the judge's scores have no spread: all {spread['score']['n']} deterministic "
                     f"scores are {spread['score']['lo']:.3g}; they cannot rank responses")
    for what in ("score", "mean"):
        why = agreement["all"][what]["undefined"]
        if why:
            notes.append(f"judge {what} vs oracle label: Spearman correlation undefined ({why})")
    return {"spread": spread, "judge_vs_oracle": agreement, "base_minus_target": gaps, "notes": notes}


def diagnostics(config: Config, data: Data, checks: dict) -> dict:
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
        mean, se = mean_se(scores)
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
                       "pearson_r": pearson(lab_judge, lab),
                       "mean_abs_diff": float(np.mean(np.abs(lab_judge - lab))) if len(lab) else None},
        }
    lp_base = np.array([data.logprobs[(pid, base)].logprob for pid in pids], dtype=float)
    judge_base = np.array([data.judge[(pid, base)].score for pid in pids], dtype=float)
    targets = {}
    for t in config.target_policies:
        tf = [data.logprobs[(pid, t)] for pid in pids]
        targets[t] = {**dx.overlap(np.array([r.logprob for r in tf]), lp_base, np.array([r.n_tokens for r in tf]),
                                   judge_base),
                      "on_policy_judge_mean": policies[t]["judge"]["mean"]}
    notes = low_overlap_targets(config, targets)
    if policies[base]["oracle"]["n"] < 2:
        notes.append(f"{base}: {policies[base]['oracle']['n']} calibration labels; the judge cannot "
                     "be calibrated")
    low = checks["suspicious"]["low_per_token_logprob"]
    if low["count"]:
        notes.append(f"{low['count']} per-token log-probabilities below {low['threshold']:g} "
                     "(see Suspicious values)")
    tvs = checks["tf_vs_sampling"]
    if tvs["n_partial"]:
        notes.append(f"{tvs['n_partial']} of {tvs['n']} {base} responses were scored on a prefix "
                     f"(mean {tvs['mean_scored_fraction']:.0%} of the text): another policy's tokenizer "
                     "differs and the response was cut at max_tokens or is not plain text")
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
        "policies": policies,
        "targets": targets,
        "discrimination": discrimination(config, data),
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
    for stage in ("generate", "logprobs", "judge", "oracle"):
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


# ---- the stage ---------------------------------------------------------------------------------------

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
    info = clean_json(diagnostics(config, data, checks))
    info["cost"] = usage_rows(config, data_dir)
    info["numeric_path"] = numeric_path(config)
    outputs: dict[str, dict] = {}
    outputs.update(export.write_all(config, data))
    outputs.update(report.write_plots(config, data, info))
    info["outputs"] = {rel: m["records"] for rel, m in sorted(outputs.items())}
    outputs[REPORT] = report.write_report(data_dir / REPORT, config, info)
    outputs[DATASET_INFO] = write_json(data_dir / DATASET_INFO, info)
    stale = export.stale_fresh_draws(config)
    if stale:
        print(f"[summarize] note: {data_dir / export.FRESH_DIR} also holds files of policies not in "
              f"this config: {', '.join(stale)}; CJE's direct mode would read them")
    print(report.terminal_summary(config, info))
    return outputs
