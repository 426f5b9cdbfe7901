"""The one place that reads and writes JSONL.

Two kinds of files:

* work files (``<data_dir>/work/<stage>.jsonl``): append-only, one line per finished or failed
  unit, flushed and fsynced per batch. The first line is a header carrying the fingerprint of
  the config that made the file, so work from two configs is never mixed. Each line also
  carries a digest of the unit's own inputs (its prompt, the response it scores): a unit counts
  as done only for the inputs it was computed from, so a run can grow (new units are added,
  finished ones kept) and can never reuse a result for changed inputs. A torn last line (a kill
  in the middle of a write) is cut off on open and its unit is recomputed; a torn header (a kill
  while the file was being started) is written again (see `WorkFile._repair_header`).
* final files: written whole to a temporary name, fsynced, then renamed into place, so a
  reader sees the old file or the new one and never half of one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import sys
import time
from dataclasses import MISSING, asdict, fields, is_dataclass
from pathlib import Path
from typing import Iterable, TypeVar

import jsonlines

from .errors import InputError, RefusedError

T = TypeVar("T")

OK = "ok"
FAILED = "failed"


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if os.environ.get("OPE_PREP_KILL_BEFORE_RENAME") == path.name:
        # Fault injection for the tests: a real kill -9 at the worst moment, between the
        # temporary file being complete and its rename.
        os.kill(os.getpid(), signal.SIGKILL)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_jsonl(path: Path, rows: Iterable) -> dict:
    """Write a final JSONL file atomically; returns its manifest (sha256, record count)."""
    buf = io.StringIO()
    n = 0
    for row in rows:
        buf.write(_dumps(asdict(row) if is_dataclass(row) else row))
        buf.write("\n")
        n += 1
    data = buf.getvalue().encode("utf-8")
    atomic_write_bytes(path, data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "records": n}


def write_json(path: Path, obj) -> dict:
    data = (json.dumps(obj, ensure_ascii=False, indent=2, allow_nan=False) + "\n").encode()
    atomic_write_bytes(path, data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "records": 1}


def count_records(path: Path) -> int:
    """Non-empty lines of a JSONL file, without parsing them (0 if it cannot be read): for
    progress and estimates, never for results."""
    try:
        return sum(1 for line in path.read_bytes().split(b"\n") if line.strip())
    except OSError:
        return 0


def read_jsonl(path: Path, cls: type[T] | None = None) -> list:
    """Read a whole JSONL file strictly: any bad line is an InputError naming file and line."""
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    out = []
    with jsonlines.open(path) as reader:
        try:
            for lineno, obj in enumerate(reader, 1):
                out.append(_to_record(cls, obj, path, lineno) if cls else obj)
        except jsonlines.InvalidLineError as e:
            what = "not UTF-8" if "utf-8" in e.message.lower() else "not valid JSON"
            raise InputError(f"{path}: line {e.lineno}: {what}")
    return out


def _to_record(cls, obj, path, lineno):
    names = {f.name for f in fields(cls)}
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    if not isinstance(obj, dict) or not names.issuperset(obj) or not required.issubset(obj):
        raise InputError(f"{path}: line {lineno}: not a {cls.__name__} record")
    return cls(**obj)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def file_manifest(path: Path) -> dict:
    """sha256 and record count of a final file, for checkpoint verification."""
    data = path.read_bytes()
    if path.suffix == ".jsonl":
        n = 0
        for lineno, line in enumerate(data.splitlines(), 1):
            try:
                json.loads(line, parse_constant=_reject_constant)
            except ValueError:
                raise InputError(f"{path}: line {lineno}: not valid JSON (or holds NaN/Infinity)")
            n += 1
        if data and not data.endswith(b"\n"):
            raise InputError(f"{path}: last line is cut off")
    else:
        n = 1
        if path.suffix == ".json":
            json.loads(data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "records": n}


def diff_keys(old: dict[str, object], new: dict[str, object]) -> list[str]:
    """The keys whose values differ (a fingerprint's, a stage's inputs'), each with its old and new
    value; a digest (sha256 hex) by its first 12 digits, enough to tell two apart."""
    def shown(v) -> str:
        if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
            return f"{v[:12]}…"
        return repr(v)
    return [f"{k}: {shown(old.get(k, '<unset>'))} -> {shown(new.get(k, '<unset>'))}"
            for k in sorted(set(old) | set(new)) if old.get(k, "<unset>") != new.get(k, "<unset>")]


class WorkFile:
    """Append-only record of finished and failed units of one stage.

    ``results`` maps a unit key to its latest line: a later line for the same key (a retry)
    wins, so a failure followed by a success counts as done, and a unit is never counted twice.
    ``inputs`` maps each unit key of this run to the digest of its inputs (see `input_digest`);
    a line made from other inputs is stale: kept in the file, never counted as done.

    A unit whose failure is deterministic (an answer that cannot be read, a request the API
    refuses) is quarantined once it has failed so ``quarantine_after`` times in a row, and one
    whose failure is certain (too long for a context: the same inputs fail the same way) at
    once: it is no longer retried, and the stage finishes without it (stage 5 leaves its prompt
    out of the dataset). Transient failures (timeouts, 5xx) are always retried.
    """

    def __init__(self, path: Path, fingerprint_keys: dict[str, object], inputs: dict[str, str] | None = None,
                 quarantine_after: int = 1, self_keyed: bool = False):
        self.path = path
        self.inputs = inputs
        self.quarantine_after = quarantine_after
        self.self_keyed = self_keyed
        self.results: dict[str, dict] = {}
        self.repaired_bytes = 0
        self.repaired_header = False
        self.damaged_lines: list[int] = []     # line numbers skipped on open (see _load)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            self._load(fingerprint_keys)
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(_dumps({"_header": {"fingerprint": fingerprint_keys}}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(path.parent)
        self._fh = open(path, "a", encoding="utf-8")

    def _load(self, fingerprint_keys: dict[str, object]) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            # A kill tore the last line: cut it off; its unit will be recomputed.
            self.repaired_bytes = len(data) - end
            with open(self.path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
            data = data[:end]
        # Line by line: a line of bytes that are not UTF-8 is one damaged line, not the file's.
        lines = [_decoded(raw) for raw in data.split(b"\n")[:-1]] if data else []
        header = _header_of(lines[0]) if lines else None
        if header is None:
            # A kill while the header was being written (or a header damaged since) leaves no
            # header: the file is started again, as a torn last line is cut.
            kept = self._repair_header(fingerprint_keys, lines)
            if not kept:
                return
            lines, header = [""] + kept, fingerprint_keys
        if header != fingerprint_keys:
            changed = "; ".join(diff_keys(header, fingerprint_keys))
            raise RefusedError(
                f"{self.path} holds partial work made with another config ({changed}); "
                "restore the config, or discard that work (moved aside, kept) by redoing the stage", redo=True)
        damaged = []
        for lineno, line in enumerate(lines[1:], 2):
            row = _work_row(line)
            if row is None:
                # One damaged line (a disk error, an edit) costs its unit, not the file: it is
                # skipped, so its unit is done again; the other lines, and for a request cache
                # the spend they record, are kept.
                if line.strip():
                    damaged.append(lineno)
                continue
            self.results[row["key"]] = row
        self.damaged_lines = damaged
        if damaged:
            shown = ", ".join(map(str, damaged[:10])) + (", ..." if len(damaged) > 10 else "")
            print(f"[{self.path.stem}] {self.path}: skipped {len(damaged)} damaged line"
                  f"{'s' if len(damaged) > 1 else ''} (line {shown}); "
                  f"{'their' if len(damaged) > 1 else 'its'} unit is done again if needed", file=sys.stderr)

    def _repair_header(self, fingerprint_keys: dict[str, object], lines: list[str]) -> list[str]:
        """Write a new header in place of a torn or damaged one. The lines after it are kept only
        in a file whose lines identify their own inputs (``self_keyed``: a request cache, whose
        paid replies are its spend ledger); a work file's are moved aside whole (its units are
        recomputed), since without its header nothing says which config made them."""
        rest = [l for l in lines[1:] if _work_row(l) is not None]
        moved = None
        if rest and not self.self_keyed:
            moved = self.path.with_name(f"{self.path.name}.bad-header-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(self.path, moved)
            rest = []
        body = _dumps({"_header": {"fingerprint": fingerprint_keys}}) + "\n" + "".join(l + "\n" for l in rest)
        atomic_write_bytes(self.path, body.encode("utf-8"))
        self.repaired_header = True
        what = (f"moved it to {moved.name} (its units are recomputed) and started it again" if moved else
                f"rewrote the header, keeping its {len(rest)} lines" if rest else "started it again")
        print(f"[{self.path.stem}] {self.path}: its header was torn or damaged: {what}", file=sys.stderr)
        return rest

    def _current(self, key: str) -> dict | None:
        """The key's latest line, if it was made from this run's inputs for it."""
        row = self.results.get(key)
        if row is None or (self.inputs is not None and row.get("input") != self.inputs.get(key)):
            return None
        return row

    def done(self, key: str) -> bool:
        row = self._current(key)
        return row is not None and row["status"] == OK

    def quarantined(self, key: str) -> bool:
        row = self._current(key)
        return row is not None and is_quarantined(row, self.quarantine_after)

    def settled(self, key: str) -> bool:
        """Done, or quarantined: nothing more will be tried for it."""
        return self.done(key) or self.quarantined(key)

    def stale(self) -> int:
        """Finished units of this run's keys that were made from other inputs (to be redone)."""
        if self.inputs is None:
            return 0
        return sum(1 for k, d in self.inputs.items()
                   if k in self.results and self.results[k]["status"] == OK and self.results[k].get("input") != d)

    def failures(self) -> dict[str, dict]:
        return {k: r for k, r in self.results.items() if r["status"] == FAILED and self._current(k) is not None}

    def append(self, rows: list[dict]) -> None:
        """Append finished units and make them durable before they count as done."""
        if not rows:
            return
        for row in rows:
            assert row["status"] in (OK, FAILED) and "key" in row
            key = row["key"]
            if self.done(key):
                raise RuntimeError(f"unit {key} is already done; refusing to append it twice")
            if self.inputs is not None:
                row["input"] = self.inputs[key]
            row["t"] = round(time.time(), 1)     # when it was saved: throughput for --status
            if row["status"] == FAILED:
                # Deterministic failures in a row: a transient one in between does not count.
                before = self._current(key)
                again = (before is not None and before["status"] == FAILED and before.get("deterministic")
                         and row.get("deterministic"))
                row["tries"] = before.get("tries", 1) + 1 if again else 1
        # Traced before the write: a unit that is durable is always in the trace (the tests
        # count computations across kills; a kill between the two only over-counts a unit that
        # was not saved and is computed again anyway).
        _trace(self.path.stem, rows)
        self._fh.write("".join(_dumps(r) + "\n" for r in rows))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        _pause_point(self.path.stem)
        for row in rows:
            self.results[row["key"]] = row

    def close(self) -> None:
        self._fh.close()


def _decoded(raw: bytes) -> str:
    """A work line's text; bytes that are not UTF-8 make it a line no reader accepts."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "\x00<not UTF-8>"


def _work_row(line: str) -> dict | None:
    """A work line's record, or None if the line is damaged (not JSON, or not a unit's line)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if (not isinstance(row, dict) or not isinstance(row.get("key"), str) or row.get("status") not in (OK, FAILED)
            or (row["status"] == OK and "record" not in row)):
        return None
    return row


def _header_of(line: str) -> dict | None:
    """The fingerprint in a work file's header line, or None if the line is not a header."""
    try:
        header = json.loads(line)["_header"]["fingerprint"]
    except (ValueError, KeyError, TypeError):
        return None
    return header if isinstance(header, dict) else None


def _trace(work_name: str, rows: list[dict]) -> None:
    """With OPE_PREP_TRACE=<file>, every computed unit is also listed there (one line per unit,
    appended by whichever process computed it): how the tests count model calls across kills."""
    trace = os.environ.get("OPE_PREP_TRACE")
    if trace:
        with open(trace, "a", encoding="utf-8") as f:
            f.write("".join(f"{work_name}\t{r['key']}\t{r['status']}\n" for r in rows))


def _pause_point(work_name: str) -> None:
    """With OPE_PREP_PAUSE_AFTER_SAVE=<work name>:<marker file>, the process stops right after its
    first durable batch of that work file: it writes the marker and sleeps (10 min at most) until a
    signal ends it. A named point where the tests interrupt or kill a stage, instead of a clock."""
    name, _, marker = os.environ.get("OPE_PREP_PAUSE_AFTER_SAVE", "").partition(":")
    if name != work_name or not marker:
        return
    del os.environ["OPE_PREP_PAUSE_AFTER_SAVE"]     # once per process, and not for its children
    Path(marker).write_text(str(os.getpid()), encoding="utf-8")
    time.sleep(600)


def is_quarantined(row: dict, quarantine_after: int) -> bool:
    """Whether a unit's latest work line gives it up (see WorkFile)."""
    return (row["status"] == FAILED and row.get("deterministic", False)
            and (row.get("certain", False) or row.get("tries", 1) >= quarantine_after))


def ok_row(key: str, record) -> dict:
    return {"key": key, "status": OK, "record": asdict(record) if is_dataclass(record) else record}


def failed_row(key: str, error: str, *, deterministic: bool = False, certain: bool = False,
               prompt_id: str | None = None, **extra) -> dict:
    """A failed unit. deterministic: it would likely fail the same way again; certain: it
    will (see WorkFile); prompt_id: the prompt left out of the dataset if it is quarantined."""
    row = {"key": key, "status": FAILED, "error": error, **extra}
    if deterministic or certain:
        row.update(deterministic=True, certain=certain, prompt_id=prompt_id)
    return row


def input_digest(*parts) -> str:
    """A short digest of a unit's inputs (any JSON-able values)."""
    return hashlib.sha256(_dumps(parts).encode()).hexdigest()[:20]
