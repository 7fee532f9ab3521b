"""Reading local data files (csv, tsv, jsonl, plain text; optionally .gz/.bz2) into plain Python records."""
from __future__ import annotations

import bz2
import csv
import gzip
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
_COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open}


def _suffix(path: Path) -> str:
    """The format suffix, looking through a compression suffix (``a.csv.bz2`` -> ``.csv``)."""
    suffixes = path.suffixes
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes = suffixes[:-1]
    return suffixes[-1].lower() if suffixes else ""


def _open(path: Path) -> IO[str]:
    opener = _COMPRESSED.get(path.suffix, open)
    return opener(path, "rt", encoding="utf-8", newline="")


def check_file(path: str | Path | None, role: str, suffixes: Sequence[str] = TABLE_SUFFIXES) -> Path | None:
    """Fail early when a data file is missing or has a format we cannot read; ``None`` passes through."""
    if path is None:
        return None
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"The {role} file '{path}' does not exist. Check the path given as {role}_file.")
    if _suffix(path) not in suffixes:
        raise ValueError(
            f"The {role} file '{path}' has an unsupported extension '{_suffix(path)}'; "
            f"use one of {', '.join(suffixes)}."
        )
    return path


def read_table(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of a csv/tsv/jsonl file as dicts, and the column names in file order."""
    suffix = _suffix(path)
    if suffix in (".csv", ".tsv"):
        # GLUE tsv files contain bare quote characters inside sentences: do not treat quotes specially there.
        options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if suffix == ".tsv" else {}
        with _utf8_errors(path), _open(path) as handle:
            reader = csv.DictReader(handle, **options)
            return list(reader), list(reader.fieldnames or [])
    text = read_text(path)
    if suffix == ".json" and text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    columns: dict[str, None] = {}
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ValueError(f"Line {number} of '{path}' is not a JSON object: {str(row)[:80]}")
        columns.update(dict.fromkeys(row))
    return rows, list(columns)


def read_text(path: Path) -> str:
    """The whole content of a text file."""
    with _utf8_errors(path), _open(path) as handle:
        return handle.read()


@contextmanager
def _utf8_errors(path: Path) -> Iterator[None]:
    """Turn a decoding error into one naming the file, the offending byte and the encoding to use."""
    try:
        yield
    except UnicodeDecodeError as error:
        raise ValueError(
            f"'{path}' is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start}). "
            f"Save it as UTF-8, e.g. iconv -f latin1 -t utf-8 '{path}' > converted{_suffix(path)}"
        ) from None


def require_columns(columns: Sequence[str], wanted: Sequence[str], path: Path | str, argument: str) -> None:
    """Raise when a requested column is not in the file, listing what exists."""
    missing = [name for name in wanted if name not in columns]
    if missing:
        raise KeyError(
            f"Column(s) {missing} not found in '{path}'. Columns that exist: {list(columns)}. "
            f"Set {argument} to one of those."
        )
