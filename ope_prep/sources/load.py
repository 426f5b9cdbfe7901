"""Open one source as a memory-mapped `datasets.Dataset`, and read chosen rows of it.

Nothing here turns a whole source into Python objects: `datasets` writes the source to its Arrow
cache once (in batches) and maps it; the sampler then reads only the rows it chose, a chunk at a
time, and only the columns the field mapping names.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from pathlib import Path
from typing import Callable, Optional

from ..errors import ConfigError, InputError
from ..digests import files_digest
from ..packages import data_package
from .registry import GENERIC_KINDS, REGISTRY, FieldMap
from .schema import SourceSpec

LANGUAGE_NAMES = {"en": "english", "de": "german", "fr": "french", "es": "spanish", "zh": "chinese",
                  "ru": "russian", "ja": "japanese", "pt": "portuguese", "it": "italian", "ko": "korean"}
SHAREGPT_CONTINUATION = re.compile(r"_[1-9][0-9]*$")
BUILDER_BY_SUFFIX = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".arrow": "arrow"}


@dataclass
class Row:
    """What the filters need of one source row."""
    row: int
    text: Optional[str]          # the first user turn (None: the row has none)
    source_id: str
    language: Optional[str]      # the source's own language field, lower case (None: not given)
    flagged: bool


@dataclass
class OpenedSource:
    spec: SourceSpec
    fields: FieldMap
    dataset: object              # datasets.Dataset, only the columns the fields name
    where: str                   # hub name or files, for messages and provenance
    revision: str                # hub revision, or a digest of the files read

    @property
    def label(self) -> str:
        return self.spec.label

    def __len__(self) -> int:
        return len(self.dataset)

    def rows(self, indices: list[int]) -> list[Row]:
        """The given rows, read from the mapped table (only these rows become Python objects)."""
        f = self.fields
        cols = self.dataset[indices] if indices else {}
        out = []
        for j, row in enumerate(indices):
            def col(name):
                return cols[name][j] if name else None
            text = col(f.prompt) if f.prompt else first_user_turn(col(f.messages), f)
            sid = col(f.id)
            sid = f"row{row}" if sid is None else str(sid)
            if self.spec.type == "sharegpt" and SHAREGPT_CONTINUATION.search(sid):
                text = None     # ShareGPT V3 splits long conversations; only segment 0 starts with the user
            lang = col(f.language)
            flag = _path(cols[f.flagged.split(".")[0]][j], f.flagged.split(".")[1:]) if f.flagged else None
            out.append(Row(row=row, text=text if isinstance(text, str) else None, source_id=sid,
                           language=lang.strip().lower() if isinstance(lang, str) else None,
                           flagged=bool(flag)))
        return out


class ParquetRows:
    """Local parquet files read by row group, only the named columns, only the row groups that
    hold chosen rows: memory stays at about one row group's columns, whatever the files' size
    (`datasets`' conversion to its Arrow cache holds about the whole table in memory, and reading
    rows from its memory map brings most of the file into the process's resident pages)."""

    # Rows are read in chunks of chosen rows, and each chunk decodes every row group it touches:
    # few large chunks, not many small ones.
    first_chunk = 4096

    def __init__(self, files: list[Path], columns: list[str]):
        import pyarrow.parquet as pq
        self.files = [pq.ParquetFile(f) for f in files]
        self.column_names = self.files[0].schema_arrow.names
        self.columns = [c for c in columns if c in self.column_names]
        self.groups = []          # (first row, file, row group), in row order
        start = 0
        for f in self.files:
            for g in range(f.metadata.num_row_groups):
                self.groups.append((start, f, g))
                start += f.metadata.row_group(g).num_rows
        self.num_rows = start

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, indices: list[int]) -> dict[str, list]:
        import bisect
        starts = [g[0] for g in self.groups]
        by_group: dict[int, list[tuple[int, int]]] = {}
        for pos, row in enumerate(indices):
            by_group.setdefault(bisect.bisect_right(starts, row) - 1, []).append((pos, row))
        out = {c: [None] * len(indices) for c in self.columns}
        for gi, members in sorted(by_group.items()):
            start, f, g = self.groups[gi]
            table = f.read_row_group(g, columns=self.columns).take([row - start for _, row in members])
            for c, values in table.to_pydict().items():
                for (pos, _), v in zip(members, values):
                    out[c][pos] = v
        return out


def first_user_turn(turns, f: FieldMap) -> Optional[str]:
    """The first turn after any system turns, if a user wrote it."""
    if not isinstance(turns, list):
        return None
    for turn in turns:
        if not isinstance(turn, dict):
            return None
        role = turn.get(f.role_key)
        if role == "system":
            continue
        return turn.get(f.content_key) if role in f.user_roles else None
    return None


def _path(value, steps: list[str]):
    for step in steps:
        if isinstance(value, list) and step.isdigit():
            value = value[int(step)] if int(step) < len(value) else None
        elif isinstance(value, dict):
            value = value.get(step)
        else:
            return None
    return value


def language_matches(value: str, language: str) -> bool:
    return value in (language.lower(), LANGUAGE_NAMES.get(language.lower(), language.lower()))


def normalized(text: str) -> str:
    """The text as compared for normalized deduplication."""
    return " ".join(re.sub(r"[\W_]+", " ", unicodedata.normalize("NFKC", text).casefold()).split())


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def data_file_paths(spec: SourceSpec, index: int, resolve: Callable[[str], Path], config_file: Path) -> list[Path]:
    """The files source.mix.<index>'s data_files name: in an installed package when `package` is
    set, else paths that ``resolve`` (Config.resolve: from the config's folder) makes whole."""
    files: list[Path] = []
    for pattern in spec.data_files or []:
        if spec.package:
            try:
                p = Path(str(data_package(spec.package).locate_file(pattern)))
            except PackageNotFoundError:
                raise ConfigError(f"{config_file}: source.mix.{index}.package: "
                                  f"{spec.package} is not installed (bash setup.sh fetches the default's)")
        else:
            p = resolve(pattern)
        found = sorted(p.parent.glob(p.name))
        if not found:
            raise ConfigError(f"{config_file}: source.mix.{index}.data_files: "
                              f"no file matches {pattern}" + (f" in {spec.package}" if spec.package else ""))
        files += found
    return files


def open_source(spec: SourceSpec, index: int, files: list[Path]) -> OpenedSource:
    """source.mix.<index>, opened from its ``files`` (`data_file_paths`; none: the hub, or the
    packaged copy), loaded through `datasets` and cached by it."""
    import datasets
    datasets.disable_progress_bars()
    fields = spec.row_fields
    key = f"source.mix.{index} ({spec.label})"
    named = REGISTRY.get(spec.type)
    try:
        if spec.type == "sharegpt" and not files and not spec.dataset:
            from .sharegpt import packaged
            ds, where, revision = packaged()
        elif files and all(f.suffix == ".parquet" for f in files) and spec.type != "datasets":
            ds = ParquetRows(files, _columns(fields))
            where, revision = _files_where(spec, files), files_digest(files)
        elif files:
            builder = GENERIC_KINDS.get(spec.type) or BUILDER_BY_SUFFIX.get(files[0].suffix)
            if builder is None:
                raise InputError(f"{key}.data_files: cannot tell the format of {files[0]} "
                                 f"(name it .parquet, .jsonl, .json, .csv or .arrow)")
            ds = datasets.load_dataset(spec.dataset if spec.type == "datasets" else builder,
                                       data_files=[str(f) for f in files], split=spec.split or "train")
            where, revision = _files_where(spec, files), files_digest(files)
        else:
            name = spec.dataset or named.dataset
            ds = datasets.load_dataset(name, spec.subset or (named.subset if named else None),
                                       split=spec.split or (named.split if named else "train"),
                                       revision=spec.revision,
                                       data_files=named.hub_files if named and not spec.dataset else None)
            where = name
            revision = f"revision:{spec.revision}" if spec.revision else f"datasets-fingerprint:{ds._fingerprint}"
    except InputError:
        raise
    except Exception as e:  # datasets raises many types; the user needs one line, about the cause
        while e.__cause__ is not None or e.__context__ is not None:
            e = e.__cause__ or e.__context__
        first = str(e).splitlines()[0] if str(e) else ""
        if isinstance(e, UnicodeDecodeError):
            first = f"not UTF-8 (byte {e.start})"
        what = ", ".join(map(str, files)) if files else spec.dataset or named.dataset
        raise InputError(f"{key}: cannot load {what} ({type(e).__name__}: {first})")
    if len(ds) == 0:
        raise InputError(f"{key}: {where} has no rows")
    wanted = _columns(fields)
    missing = sorted(set(wanted) - set(ds.column_names))
    if missing:
        raise InputError(f"{key}: {where} has no column {', '.join(missing)} "
                         f"(its columns: {', '.join(ds.column_names)}); fix {key}.fields")
    if not isinstance(ds, ParquetRows):
        ds = ds.select_columns(wanted)
    return OpenedSource(spec=spec, fields=fields, dataset=ds, where=where, revision=revision)


def _columns(fields: FieldMap) -> list[str]:
    """The columns a field mapping reads."""
    return list(dict.fromkeys(c for c in (fields.prompt, fields.messages, fields.language, fields.id,
                                          fields.flagged.split(".")[0] if fields.flagged else None) if c))


def _files_where(spec: SourceSpec, files: list[Path]) -> str:
    where = ", ".join(spec.data_files)
    return f"{spec.package}=={data_package(spec.package).version}: {where}" if spec.package else where
