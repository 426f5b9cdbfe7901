"""The lmsys/chatbot_arena_conversations schema, loaded through `datasets`.

Columns used: `question_id`, `language` (e.g. "English"), `conversation_a` (a list of
{"role", "content"}). The hub name is used by `configs/arena_10k.yaml`; tests use local
parquet/JSONL files in the same schema. Columns are read as Arrow arrays, not row by row.
"""

from __future__ import annotations

from ..config import Config
from ..errors import InputError
from . import Candidates

LANGUAGE_NAMES = {"en": "English", "de": "German", "fr": "French", "es": "Spanish",
                  "zh": "Chinese", "ru": "Russian", "ja": "Japanese", "pt": "Portuguese"}


def load(config: Config) -> Candidates:
    import datasets
    import pyarrow.compute as pc

    src = config.source
    datasets.disable_progress_bars()
    try:
        if src.data_files:
            files = [str(config.resolve(f)) for f in src.data_files]
            kind = "parquet" if files[0].endswith(".parquet") else "json"
            ds = datasets.load_dataset(kind, data_files=files, split=src.split)
            name = ",".join(src.data_files)
        else:
            ds = datasets.load_dataset(src.name, split=src.split)
            name = src.name
    except Exception as e:  # datasets raises many types; the user needs one line
        raise InputError(f"source {src.name or src.data_files}: cannot load ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})")
    missing = {"question_id", "language", "conversation_a"} - set(ds.column_names)
    if missing:
        raise InputError(f"source {name}: missing columns {sorted(missing)}")
    table = ds.data.table
    first = pc.list_element(table.column("conversation_a"), 0)
    roles = pc.struct_field(first, "role").to_pylist()
    contents = pc.struct_field(first, "content").to_pylist()
    texts = [c if r == "user" else None for r, c in zip(roles, contents)]
    want = LANGUAGE_NAMES.get(src.language, src.language)
    language_ok = pc.equal(table.column("language"), want).fill_null(False).to_pylist()
    ids = [str(x) for x in table.column("question_id").to_pylist()]
    return Candidates(source=name, texts=texts, ids=ids, language_ok=language_ok)
