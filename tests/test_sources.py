"""Prompt sources through the real loaders: `datasets` on local files in the Arena schema,
ShareGPT JSON (whole, and cut off in the middle of a record)."""

from __future__ import annotations

import json

import datasets
import pytest

from conftest import run_script, small_config, write_config
from ope_prep.config import load_config
from ope_prep.sources import sample_prompts


def arena_rows() -> list[dict]:
    rows = []
    texts = ["What is the capital of France?", "Wie spät ist es?", "Write a haiku about rain.",
             "What is the capital of France?", "   ", "Explain TCP in one sentence.",
             "Name three colors.", "List two prime numbers.", "Bonjour, comment ça va?"]
    langs = ["English", "German", "English", "English", "English", "English", "English", "English", "French"]
    for i, (t, lang) in enumerate(zip(texts, langs)):
        conv = [{"content": t, "role": "user"}, {"content": "answer", "role": "assistant"}]
        rows.append({"question_id": f"q{i:03d}", "model_a": "a", "model_b": "b", "winner": "model_a",
                     "judge": "arena_user", "conversation_a": conv, "conversation_b": conv, "turn": 1,
                     "anony": True, "language": lang, "tstamp": 1.0 + i})
    return rows


@pytest.fixture
def arena_parquet(tmp_path):
    path = tmp_path / "arena.parquet"
    datasets.Dataset.from_list(arena_rows()).to_parquet(str(path))
    return path


def _arena_config(tmp_path, files):
    cfg = small_config(tmp_path / "data")
    cfg["source"] = {"type": "arena", "data_files": [str(f) for f in files], "language": "en"}
    return load_config(write_config(tmp_path / "config.yaml", cfg))


def test_arena_schema_parquet_english_first_turn_dedup(tmp_path, arena_parquet):
    config = _arena_config(tmp_path, [arena_parquet])
    prompts, skipped = sample_prompts(config, 5, seed=1)
    texts = [p.prompt for p in prompts]
    assert len(set(texts)) == 5
    assert "Wie spät ist es?" not in texts and "Bonjour, comment ça va?" not in texts
    assert all(t.strip() == t and t for t in texts)
    rows = arena_rows()
    for p in prompts:   # provenance points at the row it came from
        assert rows[p.source_row]["question_id"] == p.source_id == p.prompt_id
        assert rows[p.source_row]["conversation_a"][0]["content"].strip() == p.prompt
    # 9 rows: 2 not English, 1 empty, 1 duplicate -> 5 eligible; asking 6 is a clear error
    with pytest.raises(Exception, match="only 5 eligible prompts"):
        sample_prompts(config, 6, seed=1)


def test_sampling_is_seeded_and_a_smaller_sample_is_a_prefix(tmp_path, arena_parquet):
    config = _arena_config(tmp_path, [arena_parquet])
    a, _ = sample_prompts(config, 5, seed=7)
    b, _ = sample_prompts(config, 5, seed=7)
    c, _ = sample_prompts(config, 3, seed=7)
    d, _ = sample_prompts(config, 5, seed=8)
    assert a == b
    assert c == a[:3]
    assert [p.prompt_id for p in d] != [p.prompt_id for p in a]


def test_arena_jsonl_loads_through_datasets_too(tmp_path):
    path = tmp_path / "arena.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in arena_rows()))
    prompts, _ = sample_prompts(_arena_config(tmp_path, [path]), 4, seed=3)
    assert len(prompts) == 4


def test_sharegpt_file_cut_off_mid_record_keeps_complete_records(tmp_path):
    convs = [{"id": f"c{i}_0", "conversations": [{"from": "human", "value": f"Question number {i} about cats?"},
                                                   {"from": "gpt", "value": "ok"}]} for i in range(6)]
    convs.append({"id": "c1_1", "conversations": [{"from": "human", "value": "A continuation segment"}]})
    text = json.dumps(convs, indent=2)
    cut = text[: text.index('"c5_0"') + 30]    # the file ends inside record 5
    path = tmp_path / "sharegpt.json"
    path.write_text(cut)
    cfg = small_config(tmp_path / "data")
    cfg["source"]["path"] = str(path)
    config = load_config(write_config(tmp_path / "config.yaml", cfg))
    prompts, skipped = sample_prompts(config, 5, seed=0)
    assert sorted(p.prompt_id for p in prompts) == [f"c{i}_0" for i in range(5)]
    with pytest.raises(Exception, match="only 5 eligible"):
        sample_prompts(config, 6, seed=0)


def test_prepare_stage_writes_prompts_and_run_params(tmp_config):
    cfg = tmp_config()
    run_script("01_prepare_data.py", "--samples", "4", "--seed", "3", "--config", str(cfg), check=True)
    data = cfg.parent / "data"
    prompts = [json.loads(l) for l in (data / "prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == 4 and len({p["prompt"] for p in prompts}) == 4
    assert json.loads((data / "run.json").read_text())["seed"] == 3
    again = run_script("01_prepare_data.py", "--samples", "4", "--seed", "3", "--config", str(cfg), check=True)
    assert "already complete" in again.stdout


def test_production_config_loads_arena_prompts_from_local_files(tmp_path, arena_parquet):
    """configs/arena_10k.yaml as shipped, with only what this machine lacks swapped for local
    stand-ins: the GGUF file, the hub (local parquet in the same schema), the API key."""
    import yaml
    from conftest import ROOT
    cfg = yaml.safe_load((ROOT / "configs" / "arena_10k.yaml").read_text())
    cfg["paths"]["data_dir"] = str(tmp_path / "data")
    cfg["models"]["llama32_3b"]["path"] = str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    cfg["source"]["data_files"] = [str(arena_parquet)]
    path = write_config(tmp_path / "arena.yaml", cfg)
    missing_key = run_script("01_prepare_data.py", "--samples", "3", "--config", str(path),
                             env={"OPENAI_API_KEY": ""})
    assert missing_key.returncode == 2 and "OPENAI_API_KEY is not set" in missing_key.stderr
    run_script("01_prepare_data.py", "--samples", "3", "--config", str(path),
                      env={"OPENAI_API_KEY": "sk-local-test"}, check=True)
    prompts = [json.loads(l) for l in (tmp_path / "data" / "prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == 3 and all(p["source_id"].startswith("q") for p in prompts)
