"""Stage 1 memory and time: sampling prompts from a 1,000,000-conversation parquet source.

    python benchmarks/bench_sources.py [--rows 1000000] [--samples 10000] [--rounds 3] [--seed 0]
                                       [--cache-dir ~/.cache/ope_prep/bench_sources]
                                       [--out benchmarks/last_sources_run.txt | --out -]

    small (smoke) mode, e.g. from a test:
    python benchmarks/bench_sources.py --rows 20000 --samples 500 --rounds 1 --cache-dir TMP --out -

The source is a synthetic file in the ChatBot Arena schema (question_id, model_a, model_b,
winner, judge, conversation_a, conversation_b, turn, anony, language, tstamp, openai_moderation),
written once with pyarrow a batch at a time (row groups of 10,000 rows) and cached under
--cache-dir: first user turns of random words from a fixed vocabulary averaging about 300
characters (a few are longer than 4,000), an assistant turn, conversation_b a copy of
conversation_a, ~90% language "English", ~2% flagged, ~1% exact duplicates of another row's
first turn. Seeded: the same --rows and --seed give the same file.

Every measurement is a fresh Python process (this script with --child), with HF_DATASETS_CACHE
in --cache-dir/hf_cache/<file>. Its peak RSS is GNU time's maximum resident set size of that
process (/usr/bin/time; see `measure`); its wall time is measured from outside, interpreter start
and imports included:

* cold: the datasets cache emptied first, then the pipeline's own
  `ope_prep.sources.mix.sample_prompts(config, --samples, --seed)` (source.mix: one `arena` source
  with data_files; language en, max_prompt_chars 4000; other filters at their defaults). This
  includes the first read of the file (a local parquet source is read by row group with pyarrow,
  not converted to datasets' Arrow cache). Once per run.
* new (warm): the same, cache kept.
* old: the approach before it, on the same cached dataset: `datasets.load_dataset` the same way,
  every first turn materialized as a Python string (`pc.list_element(conversation_a, 0)` then
  `pc.struct_field(..., "content").to_pylist()` over the whole column), then the same seeded
  permutation walked with the same filters (language and flag as numpy columns) until --samples
  are kept. Its sample is checked to be the same prompts, in the same order, as the new path's.

Also printed, polled in the process every 20 ms from /proc/self/status: the peaks of its anonymous
RSS (heap: Python objects, Arrow buffers) and of its file-backed RSS (pages of the memory-mapped
Arrow cache it has touched: clean page cache, shared and reclaimable, but counted in RSS).

new and old are repeated for --rounds rounds (the order flips every round). Printed: each
process's wall time and peak RSS, with a per-step breakdown (time and RSS after each step), a
table of min/median/max, and the ratio of peak RSS old/new per round. Also written, with the date
and machine, to --out. Nothing is asserted: it is a benchmark.

The last line is exactly: new_peak_rss_mib=<median warm new> old_vs_new_rss=<median ratio>
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ROW_GROUP = 10_000
LANGUAGES = ["German", "Spanish", "French", "Chinese", "Russian", "Portuguese", "Japanese", "Italian", "Korean"]
MODELS = ["vicuna-13b", "koala-13b", "alpaca-13b", "chatglm-6b", "oasst-pythia-12b", "gpt-3.5-turbo",
          "gpt-4", "claude-v1", "llama-13b", "dolly-v2-12b", "stablelm-tuned-alpha-7b", "fastchat-t5-3b"]
WINNERS = ["model_a", "model_b", "tie", "tie (bothbad)"]
CATEGORIES = ["harassment", "hate", "self-harm", "sexual", "violence"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "ope_prep" / "bench_sources"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "last_sources_run.txt"),
                    help="where to write the results ('-': nowhere)")
    ap.add_argument("--child", choices=["new", "old"], help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--parquet", help=argparse.SUPPRESS)
    ap.add_argument("--report", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ---------------------------------------------------------------- the synthetic source

def vocabulary():
    import numpy as np
    rng = np.random.default_rng(20240601)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    freq = np.array([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.2, 2.4, 2.0,
                     2.0, 1.0, 1.5, 2.0, 0.8, 0.2, 0.1, 0.2, 0.1])
    freq = freq / freq.sum()
    words = {"".join(rng.choice(letters, size=int(rng.integers(2, 11)), p=freq)) for _ in range(6000)}
    return sorted(words)[:5000]


def _texts(rng, vocab_arr, mean_word, n, mean_chars, long_share=0.0):
    """n strings of random words joined by spaces, about mean_chars long on average (vectorized)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    m = mean_chars / (mean_word + 1)
    counts = rng.integers(max(1, int(m * 0.2)), int(m * 1.8) + 1, size=n)
    if long_share:
        long_rows = rng.random(n) < long_share
        counts[long_rows] = rng.integers(int(4200 / (mean_word + 1)), int(6000 / (mean_word + 1)),
                                         size=int(long_rows.sum()))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    words = vocab_arr.take(pa.array(rng.integers(0, len(vocab_arr), size=int(offsets[-1]))))
    return pc.binary_join(pa.LargeListArray.from_arrays(pa.array(offsets), words), " ").cast(pa.string())


def _batch(rng, vocab_arr, mean_word, start, n):
    import numpy as np
    import pyarrow as pa
    user = _texts(rng, vocab_arr, mean_word, n, 300, long_share=0.003)
    dups = np.flatnonzero(rng.random(n) < 0.01)
    take = np.arange(n)
    take[dups] = rng.integers(0, n, size=len(dups))          # an exact copy of another row's first turn
    user = user.take(pa.array(take))
    reply = _texts(rng, vocab_arr, mean_word, n, 600)
    content = pa.concat_arrays([user, reply]).take(pa.array(np.stack([np.arange(n), np.arange(n) + n], 1).ravel()))
    role = pa.array(["user", "assistant"] * n)
    turns = pa.StructArray.from_arrays([content, role], names=["content", "role"])
    conversation = pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)), turns)
    hi, lo = rng.integers(0, 2**63, size=n), rng.integers(0, 2**63, size=n)
    ids = [f"{a:016x}{b:016x}" for a, b in zip(hi.tolist(), lo.tolist())]
    model_a = rng.integers(0, len(MODELS), size=n)
    model_b = (model_a + rng.integers(1, len(MODELS), size=n)) % len(MODELS)
    english = rng.random(n) < 0.9
    language = np.where(english, "English", np.array(LANGUAGES)[rng.integers(0, len(LANGUAGES), size=n)])
    flagged = rng.random(n) < 0.02
    scores = rng.random((len(CATEGORIES), n)) * np.where(flagged, 1.0, 0.05)
    categories = pa.StructArray.from_arrays([pa.array(s > 0.5) for s in scores], names=CATEGORIES)
    category_scores = pa.StructArray.from_arrays([pa.array(s) for s in scores], names=CATEGORIES)
    moderation = pa.StructArray.from_arrays([categories, category_scores, pa.array(flagged)],
                                            names=["categories", "category_scores", "flagged"])
    return pa.table({
        "question_id": pa.array(ids),
        "model_a": pa.array(np.array(MODELS)[model_a]),
        "model_b": pa.array(np.array(MODELS)[model_b]),
        "winner": pa.array(np.array(WINNERS)[rng.integers(0, len(WINNERS), size=n)]),
        "judge": pa.array([f"arena_user_{j}" for j in rng.integers(0, 20000, size=n).tolist()]),
        "conversation_a": conversation,
        "conversation_b": conversation,
        "turn": pa.array(np.ones(n, dtype=np.int64)),
        "anony": pa.array(rng.random(n) < 0.7),
        "language": pa.array(language),
        "tstamp": pa.array(1682351591.1322 + (start + np.arange(n)) * 3.7 + rng.random(n)),
        "openai_moderation": moderation,
    })


def build_source(rows: int, seed: int, cache_dir: Path) -> tuple[Path, dict]:
    """The cached parquet file and what building it took (built now if missing)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    path = cache_dir / f"arena_{rows}_seed{seed}_v1.parquet"
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        meta["cached"] = True
        return path, meta
    cache_dir.mkdir(parents=True, exist_ok=True)
    vocab = vocabulary()
    vocab_arr = pa.array(vocab)
    mean_word = float(np.mean([len(w) for w in vocab]))
    tmp = path.with_suffix(".parquet.tmp")
    started = time.monotonic()
    chars = english = flagged = long_rows = 0
    writer = None
    try:
        for b, start in enumerate(range(0, rows, ROW_GROUP)):
            n = min(ROW_GROUP, rows - start)
            table = _batch(np.random.default_rng([seed, b]), vocab_arr, mean_word, start, n)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table, row_group_size=ROW_GROUP)
            first = pc.struct_field(pc.list_element(table.column("conversation_a"), 0), "content")
            lengths = pc.utf8_length(first)
            chars += pc.sum(lengths).as_py()
            long_rows += pc.sum(pc.greater(lengths, 4000).cast("int64")).as_py()
            english += pc.sum(pc.equal(table.column("language"), "English").cast("int64")).as_py()
            flagged += pc.sum(pc.struct_field(table.column("openai_moderation"), "flagged").cast("int64")).as_py()
    finally:
        if writer is not None:
            writer.close()
    os.replace(tmp, path)
    meta = {"rows": rows, "seed": seed, "seconds": round(time.monotonic() - started, 1),
            "bytes": path.stat().st_size, "row_group": ROW_GROUP, "mean_first_turn_chars": round(chars / rows, 1),
            "english": round(english / rows, 4), "flagged": round(flagged / rows, 4),
            "over_4000_chars": round(long_rows / rows, 4), "vocabulary": len(vocab),
            "built": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cached": False}
    meta_path.write_text(json.dumps(meta, indent=1))
    return path, meta


def write_config(parquet: Path, workdir: Path) -> Path:
    import yaml
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    for m in cfg["models"].values():
        m["path"] = str((ROOT / m["path"]).resolve())
    cfg["paths"]["data_dir"] = str(workdir / "data")
    cfg["source"] = {"mix": [{"type": "arena", "data_files": [str(parquet)]}],
                     "language": "en", "max_prompt_chars": 4000}
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ---------------------------------------------------------------- the measured processes

def _proc_status() -> dict:
    """This process's current and peak RSS and its anonymous/file-backed parts, in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


class _Steps:
    def __init__(self, t0: float):
        self.t0, self.last, self.steps = t0, t0, []

    def mark(self, name: str, seconds: float | None = None):
        now = time.monotonic()
        self.steps.append({"step": name, "seconds": round(seconds if seconds is not None else now - self.last, 3),
                           **_proc_status()})
        self.last = now


def _digest_of(digests) -> str:
    h = hashlib.sha256()
    for d in digests:
        h.update(d.encode())
    return h.hexdigest()[:16]


def child_new(args, steps: _Steps) -> dict:
    from ope_prep.config import load_config
    import ope_prep.sources.mix as sources
    import ope_prep.sources.load as load
    steps.mark("import")
    timed = {"files_digest": 0.0, "open_source": 0.0}

    def wrap(module, name, key):
        original = getattr(module, name)

        def timed_call(*a, **kw):
            t = time.monotonic()
            try:
                return original(*a, **kw)
            finally:
                timed[key] += time.monotonic() - t
        setattr(module, name, timed_call)
    wrap(load, "files_digest", "files_digest")
    wrap(sources, "open_source", "open_source")       # sample_prompts calls it by this module's name
    config = load_config(args.config)
    steps.mark("load_config")
    t = time.monotonic()
    digest_before = timed["files_digest"]
    sample = sources.sample_prompts(config, args.samples, args.seed)
    total = time.monotonic() - t
    steps.mark("sample_prompts", total)
    return {"prompts": len(sample.prompts), "sample": _digest_of(p.text_digest for p in sample.prompts),
            "rows_read": sum(p["rows_read"] for p in sample.provenance.values()),
            "skipped": sample.skipped, "open_source_s": round(timed["open_source"], 3),
            "files_digest_in_sample_s": round(timed["files_digest"] - digest_before, 3),
            "files_digest_in_config_s": round(digest_before, 3)}


def child_old(args, steps: _Steps) -> dict:
    import zlib
    import datasets
    import numpy as np
    import pyarrow.compute as pc
    from ope_prep.sources.load import normalized, text_digest
    datasets.disable_progress_bars()
    steps.mark("import")
    ds = datasets.load_dataset("parquet", data_files=[args.parquet], split="train")
    table = ds.data.table
    steps.mark("load_dataset")
    first = pc.list_element(table.column("conversation_a"), 0)
    texts = pc.struct_field(first, "content").to_pylist()
    del first
    steps.mark("materialize every first turn (to_pylist)")
    lang = pc.utf8_lower(pc.utf8_trim_whitespace(table.column("language")))
    english = pc.is_in(lang, value_set=pc.cast(["en", "english"], "string")).to_numpy(zero_copy_only=False)
    flagged = pc.struct_field(table.column("openai_moderation"), "flagged").to_numpy(zero_copy_only=False)
    order = np.random.default_rng([args.seed, zlib.crc32(b"arena")]).permutation(len(texts))
    exact, norm, kept, visited = set(), set(), [], 0
    for r in order.tolist():
        visited += 1
        text = (texts[r] or "").strip()
        if not text or len(text) > 4000 or not english[r] or flagged[r] or text in exact:
            continue
        n = normalized(text)
        if n in norm:
            continue
        exact.add(text)
        norm.add(n)
        kept.append(text_digest(text))
        if len(kept) == args.samples:
            break
    steps.mark("sample (same permutation and filters)")
    return {"prompts": len(kept), "sample": _digest_of(kept), "rows_read": visited}


def _watch_peaks(peaks: dict) -> None:
    """Poll this process's anonymous and file-backed RSS (every 20 ms) and keep their maxima."""
    import threading

    def poll():
        while True:
            for key, value in _proc_status().items():
                peaks[key] = max(peaks.get(key, 0), value)
            time.sleep(0.02)
    threading.Thread(target=poll, daemon=True).start()


def child_main(args) -> None:
    peaks: dict = {}
    _watch_peaks(peaks)
    steps = _Steps(time.monotonic())
    steps.mark("interpreter start", time.time() - float(os.environ["BENCH_WALL0"]))
    result = (child_new if args.child == "new" else child_old)(args, steps)
    result["steps"] = steps.steps
    for key, value in _proc_status().items():
        peaks[key] = max(peaks.get(key, 0), value)
    result["peak_anon"], result["peak_file"] = peaks["RssAnon"], peaks["RssFile"]
    Path(args.report).write_text(json.dumps(result))


TIME = Path("/usr/bin/time")


def measure(arm: str, args, parquet: Path, config: Path, hf_cache: Path, workdir: Path) -> dict:
    """One fresh process: wall time, its own peak RSS (MiB), and what it reported.

    The peak is GNU time's "maximum resident set size" of the process it forks (wait4 in this
    process would not do: a child started by vfork+exec inherits its parent's high-water mark,
    and this process has held the whole parquet batch by batch). Without /usr/bin/time, the
    child's own VmHWM at its end (the high-water mark of its post-exec address space).
    """
    report, timing = workdir / f"{arm}.json", workdir / f"{arm}.time"
    report.unlink(missing_ok=True)
    timing.unlink(missing_ok=True)
    env = {**os.environ, "HF_DATASETS_CACHE": str(hf_cache)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "new" if arm != "old" else "old",
           "--config", str(config), "--parquet", str(parquet), "--samples", str(args.samples),
           "--seed", str(args.seed), "--report", str(report)]
    if TIME.is_file():
        cmd = [str(TIME), "-o", str(timing), "-f", "%M %e", *cmd]
    env["BENCH_WALL0"] = repr(time.time())
    started = time.monotonic()
    with open(workdir / f"{arm}.log", "w") as log:
        p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - started
    if p.returncode != 0:
        sys.exit(f"{arm} process failed (exit {p.returncode}):\n{(workdir / f'{arm}.log').read_text()[-4000:]}")
    out = json.loads(report.read_text())
    hwm = out["steps"][-1]["VmHWM"]
    rss = int(timing.read_text().split()[-2]) / 1024 if TIME.is_file() else hwm
    out.update(arm=arm, wall=seconds, rss=rss, hwm=hwm)
    return out


# ---------------------------------------------------------------- the parent

def describe(r: dict) -> str:
    steps = "; ".join(f"{s['step']} {s['seconds']:.2f}s (RSS {s.get('VmRSS', 0):.0f}, peak {s.get('VmHWM', 0):.0f}, "
                      f"anon {s.get('RssAnon', 0):.0f}, file {s.get('RssFile', 0):.0f})" for s in r["steps"])
    extra = ""
    if "open_source_s" in r:
        extra = (f"; open_source {r['open_source_s']:.2f}s (of it files_digest {r['files_digest_in_sample_s']:.2f}s), "
                 f"files_digest in load_config {r['files_digest_in_config_s']:.2f}s")
    return (f"{r['arm']}: wall {r['wall']:.2f} s, peak RSS {r['rss']:.0f} MiB (anonymous {r['peak_anon']:.0f}, "
            f"file-backed {r['peak_file']:.0f}), {r['prompts']} prompts from "
            f"{r['rows_read']} rows read{extra}\n      steps (MiB): {steps}")


def spread(values: list[float], fmt: str) -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main() -> None:
    args = parse_args()
    if args.child:
        return child_main(args)
    lines: list[str] = []

    def say(text: str = ""):
        print(text, flush=True)
        lines.append(text)

    cache_dir = Path(args.cache_dir).expanduser()
    t_start = datetime.datetime.now(datetime.timezone.utc)
    say(f"# python benchmarks/bench_sources.py {' '.join(sys.argv[1:])}   ({t_start:%Y-%m-%d %H:%M} UTC)")
    code = subprocess.run(["git", "log", "-1", "--format=%h"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "ope_prep/sources", "ope_prep/config.py"],
                           cwd=ROOT, capture_output=True, text=True).stdout.strip()
    import datasets
    import numpy
    import pyarrow
    say(f"machine: {platform.node()}, nproc {os.cpu_count()}, {platform.machine()}, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM; Python "
        f"{platform.python_version()}, datasets {datasets.__version__}, pyarrow {pyarrow.__version__}, "
        f"numpy {numpy.__version__}; code: commit {code}"
        + (" with uncommitted changes in ope_prep/sources or config.py" if dirty else ""))
    say(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")

    parquet, meta = build_source(args.rows, args.seed, cache_dir)
    say(f"source: {parquet} ({meta['bytes'] / 2**20:.0f} MiB; {meta['rows']:,} rows in row groups of "
        f"{meta['row_group']:,}; mean first turn {meta['mean_first_turn_chars']:.0f} chars, "
        f"{meta['over_4000_chars']:.1%} over 4000; English {meta['english']:.1%}, flagged {meta['flagged']:.1%}); "
        f"generated in {meta['seconds']:.1f} s"
        + (f" on {meta['built']} (cached)" if meta["cached"] else " now"))
    hf_cache = cache_dir / "hf_cache" / parquet.stem
    say(f"HF_DATASETS_CACHE={hf_cache}; {args.samples} samples, seed {args.seed}; {args.rounds} rounds")
    say()

    results: dict[str, list[dict]] = {"cold": [], "new": [], "old": []}
    with tempfile.TemporaryDirectory(prefix="bench_sources_") as tmp:
        workdir = Path(tmp)
        config = write_config(parquet, workdir)
        shutil.rmtree(hf_cache, ignore_errors=True)
        hf_cache.mkdir(parents=True)
        r = measure("cold", args, parquet, config, hf_cache, workdir)
        results["cold"].append(r)
        cache_bytes = sum(f.stat().st_size for f in hf_cache.rglob("*") if f.is_file())
        say(f"cold (datasets cache emptied; Arrow cache written: {cache_bytes / 2**20:.0f} MiB)")
        say("  " + describe(r))
        for rnd in range(args.rounds):
            order = ("new", "old") if rnd % 2 == 0 else ("old", "new")
            say(f"round {rnd + 1} ({order[0]} first):")
            for arm in order:
                r = measure(arm, args, parquet, config, hf_cache, workdir)
                results[arm].append(r)
                say("  " + describe(r))
            say(f"  old/new peak RSS {results['old'][-1]['rss'] / results['new'][-1]['rss']:.2f}, "
                f"old/new wall {results['old'][-1]['wall'] / results['new'][-1]['wall']:.2f}")

    samples = {r["sample"] for rs in results.values() for r in rs}
    say()
    say("same prompts in the same order in every process (new, cold and old): "
        + ("yes" if len(samples) == 1 else f"NO ({len(samples)} different samples)"))
    say(f"new path rows read for {args.samples} prompts: {results['new'][0]['rows_read']:,} of {args.rows:,}; "
        f"passed over: {results['new'][0]['skipped']}")
    say()
    say("| process | wall s, median (min-max) | peak RSS MiB, median (min-max) | of it: peak anonymous MiB "
        "| peak file-backed MiB |")
    say("|---|---|---|---|---|")
    names = {"cold": "new, cold (caches emptied), once",
             "new": f"new, warm (sample_prompts), {len(results['new'])} rounds",
             "old": f"old (every first turn to Python), {len(results['old'])} rounds"}
    for arm in ("cold", "new", "old"):
        rs = results[arm]
        say(f"| {names[arm]} | {spread([r['wall'] for r in rs], '{:.2f}')} | "
            f"{spread([r['rss'] for r in rs], '{:.0f}')} | {spread([r['peak_anon'] for r in rs], '{:.0f}')} | "
            f"{spread([r['peak_file'] for r in rs], '{:.0f}')} |")
    ratios = [o["rss"] / n["rss"] for o, n in zip(results["old"], results["new"])]
    walls = [o["wall"] / n["wall"] for o, n in zip(results["old"], results["new"])]
    say()
    say(f"peak RSS old/new per round: {', '.join(f'{x:.2f}' for x in ratios)}; "
        f"wall old/new per round: {', '.join(f'{x:.2f}' for x in walls)}")
    peak_new = max(r["rss"] for r in results["new"] + results["cold"])
    say(f"largest peak RSS of the new path (cold included): {peak_new:.0f} MiB "
        f"({'under' if peak_new < 1024 else 'NOT under'} 1 GiB)")
    say(f"total time {(datetime.datetime.now(datetime.timezone.utc) - t_start).total_seconds():.0f} s; "
        f"load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    say(f"new_peak_rss_mib={statistics.median(r['rss'] for r in results['new']):.0f} "
        f"old_vs_new_rss={statistics.median(ratios):.2f}")
    if args.out != "-":
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
