"""Stage 5's reading and record checks: every input file read into a `Dataset` by the
check_<kind> of its file kind (RECORD_CHECKS, in order), each record checked against the rules
of its kind (a line that does not parse, a missing, duplicated or unknown (prompt, policy), a
log-probability that is not a finite value <= 0, per-token values that do not match the token
ids or their sum, a judge value or oracle label outside its range, a label in the wrong split, a
score or label not computed from the current prompt and response);
then the propensity rules (propensity_checks.py)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from .commands import rerun_command
from .config import Config
from .dataset import (MAX_EXAMPLES, Dataset, Problems, fmt, in_unit, is_num, legal_values, text_record_ok,
                      token_logprobs_match)
from .errors import InputError
from .files import (BASE_TEXT_LOGPROBS, JUDGE_SCORES, LOGPROBS, ORACLE_LABELS, PROMPTS, RESPONSES, RUN_PARAMS, SELF_CONSISTENCY,
                    quarantine_file)
from .propensity_checks import propensity_checks
from .records import JudgeScore, OracleLabel, Prompt, Quarantined, Response, SelfCheck, TeacherForced, scored_digest
from .stages import UNIT_STAGES
from .stages.units import exclusion_over_limit, self_check_prompts
from .store import read_jsonl


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
    for stage in UNIT_STAGES:
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


def _index(problems: Problems, data: Dataset, name: str, records: list, expected: set | None,
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
    if not is_num(lp):
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


class _Reading:
    """What the per-kind checks share: the config, the dataset filled so far, the problems, the
    (prompt, policy) pairs every per-policy file must hold, and the log-probability rules' lists
    (reported together after every file that has them)."""

    def __init__(self, config: Config):
        self.config, self.data_dir = config, config.data_dir
        self.data, self.problems = Dataset(), Problems()
        self.expected: set | None = None
        self.bad_lp: dict[str, dict[str, list[str]]] = {}

    def read(self, name: str, cls) -> list | None:
        """The records of `name`, those of left-out prompts dropped (they are not checked)."""
        records = _read(self.problems, self.data_dir, name, cls)
        if records is None or not self.data.excluded:
            return records
        return [r for r in records if r.prompt_id not in self.data.excluded]

    def logprob_records(self, name: str, records: list, logprob, malformed, fields: str) -> None:
        rules = self.bad_lp.setdefault(name, {"not a number": [], "NaN": [], "infinite": [], "positive": []})
        shape = []
        for lineno, r in enumerate(records, 1):
            where = f"line {lineno} {r.prompt_id}/{r.policy}"
            _check_logprob(rules, where, logprob(r))
            if malformed(r):
                shape.append(where)
        self.problems.rule(name, f"records are malformed ({fields})", shape)


def check_prompts(rd: _Reading) -> None:
    """prompts.jsonl and the quarantine files: which prompts the dataset holds."""
    prompts = _read(rd.problems, rd.data_dir, PROMPTS, Prompt)
    if prompts is None:
        return
    data, problems = rd.data, rd.problems
    problems.rule(PROMPTS, "records have a prompt_id or prompt that is not a string",
                  [f"line {i}" for i, p in enumerate(prompts, 1)
                   if not isinstance(p.prompt_id, str) or not isinstance(p.prompt, str)])
    ids = Counter(p.prompt_id for p in prompts if isinstance(p.prompt_id, str))
    problems.rule(PROMPTS, "prompt_ids appear more than once", [f"{pid!r} x{n}" for pid, n in ids.items() if n > 1])
    if not prompts:
        problems.add(f"{rd.data_dir / PROMPTS}: holds no prompts")
    data.all_prompt_ids = [p.prompt_id for p in prompts if isinstance(p.prompt_id, str)]
    data.excluded = _read_quarantine(problems, rd.data_dir, rd.config, set(data.all_prompt_ids))
    data.prompts = [p for p in prompts if p.prompt_id not in data.excluded]
    data.left_out = [p for p in prompts if p.prompt_id in data.excluded]
    rd.expected = {(p.prompt_id, pol.name) for p in data.prompts if isinstance(p.prompt_id, str)
                   for pol in rd.config.policies}


def check_responses(rd: _Reading) -> None:
    responses = rd.read(RESPONSES, Response)
    if responses is None:
        return
    rd.data.responses = _index(rd.problems, rd.data, RESPONSES, responses, rd.expected)
    rd.logprob_records(
        RESPONSES, responses, lambda r: r.sampling_logprob,
        lambda r: (not isinstance(r.token_ids, list) or not isinstance(r.n_tokens, int)
                   or r.n_tokens != len(r.token_ids) or not isinstance(r.response, str)
                   or r.finish_reason not in ("stop", "length")
                   or not token_logprobs_match(r.token_logprobs, r.n_tokens, r.sampling_logprob)),
        "response text, token_ids, n_tokens = len(token_ids), finish_reason stop/length, "
        "token_logprobs: one finite value <= 0 per token, summing to sampling_logprob")


def _tf_malformed(r: TeacherForced) -> bool:
    if (not isinstance(r.n_tokens, int) or not isinstance(r.token_ids, list) or len(r.token_ids) != r.n_tokens
            or not isinstance(r.complete, bool) or not isinstance(r.scored_bytes, int)
            or isinstance(r.scored_bytes, bool) or r.scored_bytes < 0 or r.event not in ("tokens", "text")):
        return True
    if r.event == "text":
        return not text_record_ok(r)
    return not token_logprobs_match(r.token_logprobs, r.n_tokens, r.logprob)


_TF_FIELDS = ("n_tokens = len(token_ids), scored_bytes, complete, event tokens/text, token_logprobs: one "
              "finite value <= 0 per token, summing to logprob (text: logprob the log-sum-exp of "
              "path_logprobs and crossing_logprob, the best path first)")


def check_logprobs(rd: _Reading) -> None:
    logprobs = rd.read(LOGPROBS, TeacherForced)
    if logprobs is None:
        return
    rd.data.logprobs = _index(rd.problems, rd.data, LOGPROBS, logprobs, rd.expected)
    rd.logprob_records(LOGPROBS, logprobs, lambda r: r.logprob, _tf_malformed, _TF_FIELDS)


def check_base_text(rd: _Reading) -> None:
    """The base policy's text events: one per prompt when any target scores the text."""
    records = rd.read(BASE_TEXT_LOGPROBS, TeacherForced)
    if records is None:
        return
    base = rd.config.base_policy
    wanted = None
    if rd.expected is not None:
        texts = any(getattr(r, "event", None) == "text" for r in rd.data.logprobs.values())
        wanted = {(p.prompt_id, base) for p in rd.data.prompts} if texts else set()
    rd.data.base_text = _index(rd.problems, rd.data, BASE_TEXT_LOGPROBS, records, wanted)
    rd.problems.rule(BASE_TEXT_LOGPROBS, "records are not text events", [
        f"line {i} {r.prompt_id}/{r.policy}" for i, r in enumerate(records, 1) if r.event != "text"])
    rd.logprob_records(BASE_TEXT_LOGPROBS, records, lambda r: r.logprob, _tf_malformed, _TF_FIELDS)


def check_self_checks(rd: _Reading) -> None:
    self_checks = rd.read(SELF_CONSISTENCY, SelfCheck)
    if self_checks is None:
        return
    data = rd.data
    wanted = None
    if rd.expected is not None:
        # Chosen among all the run's prompts, as stage 2b chose them.
        wanted = {(pid, pol.name) for pol in rd.config.policies
                  for pid in self_check_prompts(data.all_prompt_ids) if pid not in data.excluded}
    data.self_checks = _index(rd.problems, data, SELF_CONSISTENCY, self_checks, wanted)
    rd.problems.rule(SELF_CONSISTENCY, "records are malformed (token_logprobs: finite values <= 0)",
                     [f"line {i} {r.prompt_id}/{r.policy}" for i, r in enumerate(self_checks, 1)
                      if not legal_values(r.token_logprobs)])


def report_logprob_rules(rd: _Reading) -> None:
    """The log-probability rules of every file above, one line per file and rule."""
    for name, rules in rd.bad_lp.items():
        for what, items in rules.items():
            rd.problems.rule(name, f"log-probabilities are {what}", items)


def check_judge_scores(rd: _Reading) -> None:
    judge = rd.read(JUDGE_SCORES, JudgeScore)
    if judge is None:
        return
    rd.data.judge = _index(rd.problems, rd.data, JUDGE_SCORES, judge, rd.expected)
    out_of_range = []
    for lineno, j in enumerate(judge, 1):
        for fname, hi in (("score", 1.0), ("mean", 1.0), ("variance", 0.25 + 1e-9)):
            v = getattr(j, fname)
            if not in_unit(v, hi):
                out_of_range.append(f"line {lineno} {j.prompt_id}/{j.policy} {fname}={fmt(v)}")
    rd.problems.rule(JUDGE_SCORES, "judge values are outside [0, 1] (variance outside [0, 0.25]) or "
                     "not finite numbers", out_of_range)


def check_oracle_labels(rd: _Reading) -> None:
    oracle = rd.read(ORACLE_LABELS, OracleLabel)
    if oracle is None:
        return
    rd.data.oracle = _index(rd.problems, rd.data, ORACLE_LABELS, oracle, rd.expected, check_missing=False)
    out_of_range, wrong_split = [], []
    for lineno, o in enumerate(oracle, 1):
        where = f"line {lineno} {o.prompt_id}/{o.policy}"
        if not in_unit(o.label):
            out_of_range.append(f"{where} label={fmt(o.label)}")
        want = "calibration" if o.policy == rd.config.base_policy else "validation"
        if o.split != want:
            wrong_split.append(f"{where} split {o.split!r} (want {want!r})")
    rd.problems.rule(ORACLE_LABELS, "oracle labels are outside [0, 1] or not finite numbers", out_of_range)
    rd.problems.rule(ORACLE_LABELS, "oracle labels are in the wrong split", wrong_split)


def check_scored_inputs(rd: _Reading) -> None:
    """Each judge score and oracle label carries the digest of the prompt and response it scored:
    it must be the current one's, or the run pairs a response with another response's score (a
    stage redone by hand after its upstream changed, a file copied from another run)."""
    data = rd.data
    prompts = {p.prompt_id: p.prompt for p in data.prompts}
    for name, records, stage in ((JUDGE_SCORES, data.judge, "judge"), (ORACLE_LABELS, data.oracle, "oracle")):
        stale = []
        for (pid, pol), r in records.items():
            resp = data.responses.get((pid, pol))
            if pid not in prompts or resp is None or not isinstance(resp.response, str):
                continue                 # missing or unknown pairs are their own rules
            if r.input_digest is None:
                stale.append(f"line {data.lines[(name, pid, pol)]} {pid}/{pol}: no digest")
            elif r.input_digest != scored_digest(prompts[pid], resp.response):
                stale.append(f"line {data.lines[(name, pid, pol)]} {pid}/{pol}")
        rd.problems.rule(name, f"records were not computed from the current prompt and response (redo stage "
                         f"{stage}: {rerun_command(rd.config, stage)})", stale)


def answering_models(records: dict) -> dict[str, int]:
    """How many records each model answered, by the name its replies gave (JudgeScore.model)."""
    return dict(sorted(Counter(r.model if isinstance(r.model, str) else "(not named by the reply)"
                               for r in records.values()).items()))


def mixed_models(stage: str, models: dict[str, int]) -> str | None:
    """What is wrong when more than one model answered a stage's records (an API alias updated
    during the run: two judges in one dataset), else None."""
    if len(models) < 2:
        return None
    return (f"the {stage}'s records were answered by {len(models)} models ("
            + ", ".join(f"{m}: {n}" for m, n in models.items()) + ")")


def check_scorer_models(rd: _Reading) -> None:
    """With validation.on_mixed_scorer_models 'stop', a stage whose records more than one model
    answered fails the run; with 'warn' the report says so (summarize.dataset_info)."""
    if rd.config.validation.on_mixed_scorer_models != "stop":
        return
    for name, records, stage in ((JUDGE_SCORES, rd.data.judge, "judge"), (ORACLE_LABELS, rd.data.oracle, "oracle")):
        problem = mixed_models(stage, answering_models(records))
        if problem:
            rd.problems.add(f"{name}: {problem}, and validation.on_mixed_scorer_models is 'stop'; redo "
                            f"stage {stage} with one model: {rerun_command(rd.config, stage)}")


# In order: the prompts first (they say which pairs every other file must hold).
RECORD_CHECKS = [check_prompts, check_responses, check_logprobs, check_base_text, check_self_checks,
                 report_logprob_rules,
                 check_judge_scores, check_oracle_labels, check_scored_inputs, check_scorer_models]


def load_and_check(config: Config) -> tuple[Dataset, dict, list[str]]:
    """Read and check every input: the records of each file (RECORD_CHECKS), then the propensity
    rules (propensity_checks.py). Returns (data, the rules' figures, fatal problems)."""
    rd = _Reading(config)
    rd.data.run = _read_run(rd.problems, rd.data_dir)
    for check in RECORD_CHECKS:
        check(rd)
    checks = propensity_checks(config, rd.data, rd.problems)
    return rd.data, checks, rd.problems.lines
