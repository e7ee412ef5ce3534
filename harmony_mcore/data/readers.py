"""Read a data file into raw rows, whatever its container: JSON lines, JSON array, CSV, Parquet, or a
directory written by HF `datasets` `save_to_disk`.

`save_to_disk` writes, per split, Arrow IPC *stream* files listed in `state.json` (plus
`dataset_info.json`), and for a DatasetDict a `dataset_dict.json` naming the split sub-directories. Any
shuffle/select index mapping is flattened before saving, so reading the Arrow files with pyarrow gives
exactly the dataset's rows; the `datasets` package is not needed.

Rows that cannot be parsed (a JSON line that is not valid JSON, a CSV record with the wrong number of
values) are kept as `RawRow`s with a `problem`, so the loader can report or skip them like any bad row.
Problems with the whole file (missing, unreadable, not UTF-8, corrupt Parquet) raise `DataError`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from harmony_mcore.data.errors import DataError
from harmony_mcore.data.fields import type_name

SUPPORTED = ".jsonl, .json, .csv, .parquet, .arrow, or a directory written by datasets.save_to_disk"
DEFAULT_SPLIT = "test"


@dataclass(frozen=True)
class RawRow:
    """One data row. index: 0-based among the data rows; location: "line 7" / "row 7" (1-based).

    Exactly one of `fields` (the parsed row) and `problem` (why it could not be parsed) is set.
    """

    index: int
    location: str
    fields: Mapping[str, object] | None = None
    problem: str | None = None


@dataclass(frozen=True)
class RawTable:
    """All rows of one file (or saved dataset); `columns` is the union of the column names seen."""

    path: Path
    rows: tuple[RawRow, ...]
    columns: frozenset[str]


def _table(path: Path, rows: Iterable[RawRow]) -> RawTable:
    rows = tuple(rows)
    columns = frozenset(key for row in rows if row.fields is not None for key in row.fields)
    return RawTable(path=path, rows=rows, columns=columns)


def _read_text(path: Path) -> str:
    """The file's text (UTF-8, a leading byte-order mark removed)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(path, f"not valid UTF-8 text ({error.reason} at byte {error.start})") from error
    except OSError as error:
        raise DataError(path, f"cannot read file: {error.strerror or error}") from error


def _object_row(index: int, location: str, value: object) -> RawRow:
    if not isinstance(value, dict):
        return RawRow(index, location, problem=f"expected a JSON object, got {type_name(value)}")
    return RawRow(index, location, fields=value)


def _json_lines_rows(text: str) -> Iterable[RawRow]:
    # Split on "\n" only: str.splitlines would also split on U+2028 inside unescaped JSON strings.
    lines = [(number, line) for number, line in enumerate(text.split("\n"), start=1) if line.strip()]
    for index, (number, line) in enumerate(lines):
        location = f"line {number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            yield RawRow(index, location, problem=f"invalid JSON: {error.msg} at column {error.colno}")
            continue
        except ValueError as error:  # an integer longer than Python reads (4300 digits)
            yield RawRow(index, location, problem=f"invalid JSON: {_too_long(error)}")
            continue
        yield _object_row(index, location, value)


def _read_json_lines(path: Path) -> RawTable:
    return _table(path, _json_lines_rows(_read_text(path)))


def _read_json(path: Path) -> RawTable:
    """A .json file: a JSON array of objects, or JSON lines (what `Dataset.to_json` writes)."""
    text = _read_text(path)
    if not text.lstrip().startswith("["):
        return _table(path, _json_lines_rows(text))
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            path, f"invalid JSON: {error.msg} at line {error.lineno}, column {error.colno}"
        ) from error
    except ValueError as error:
        raise DataError(path, f"invalid JSON: {_too_long(error)}") from error
    return _table(path, (_object_row(i, f"row {i + 1}", value) for i, value in enumerate(values)))


def _csv_row(index: int, record: dict[str | None, object]) -> RawRow:
    location = f"row {index + 1}"
    if None in record:
        return RawRow(index, location, problem="has more values than the header has columns")
    if any(value is None for value in record.values()):
        return RawRow(index, location, problem="has fewer values than the header has columns")
    return RawRow(index, location, fields={str(key): value for key, value in record.items()})


def _read_csv(path: Path) -> RawTable:
    """A CSV file with a header row (values are strings; quoted values may span lines)."""
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    try:
        records = list(reader)
    except csv.Error as error:
        raise DataError(path, f"malformed CSV at line {reader.line_num}: {error}") from error
    return _table(path, (_csv_row(index, record) for index, record in enumerate(records)))


def _arrow_rows(table: pa.Table, start: int) -> Iterable[RawRow]:
    for offset, fields in enumerate(table.to_pylist()):
        yield RawRow(start + offset, f"row {start + offset + 1}", fields=fields)


def _read_parquet(path: Path) -> RawTable:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(path, f"cannot read Parquet file: {error}") from error
    return _table(path, _arrow_rows(table, 0))


def _read_arrow_file(path: Path) -> pa.Table:
    """One Arrow IPC file; `datasets` writes the stream format, the file format is accepted too."""
    errors: list[str] = []
    for open_ipc in (pa.ipc.open_stream, pa.ipc.open_file):
        try:
            with pa.memory_map(str(path)) as source:
                return open_ipc(source).read_all()
        except (pa.ArrowException, OSError) as error:
            errors.append(str(error))
    raise DataError(path, f"cannot read Arrow file: {errors[-1]}")


def _read_arrow_files(path: Path, files: list[Path]) -> RawTable:
    rows: list[RawRow] = []
    for file in files:
        rows.extend(_arrow_rows(_read_arrow_file(file), start=len(rows)))
    return _table(path, rows)


def _load_json_file(path: Path) -> object:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise DataError(path, f"invalid JSON: {error.msg} at line {error.lineno}") from error
    except ValueError as error:
        raise DataError(path, f"invalid JSON: {_too_long(error)}") from error


def _too_long(error: ValueError) -> str:
    """What json.loads' int() refusal of a huge number means to a user (its own text suggests a Python call)."""
    return f"a number too long to read ({str(error).split(':')[0]})"


def _string_list(value: object, path: Path, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise DataError(path, f"expected {what} to be a list of strings, got {type_name(value)}")
    return value


def _choose_split(directory: Path, splits: list[str], split: str | None) -> str:
    if split is not None:
        if split not in splits:
            raise DataError(directory, f"no split {split!r}; splits: {', '.join(splits)}")
        return split
    if DEFAULT_SPLIT in splits:
        return DEFAULT_SPLIT
    if len(splits) == 1:
        return splits[0]
    raise DataError(directory, f"holds several splits ({', '.join(splits)}); choose one with split / --split")


def _arrow_data_files(directory: Path) -> list[Path]:
    """The Arrow shards of one saved split, in order: from state.json, else every *.arrow file by name."""
    state_file = directory / "state.json"
    if not state_file.is_file():
        files = sorted(directory.glob("*.arrow"))
        if not files:
            raise DataError(directory, f"not a dataset saved by datasets.save_to_disk (expected {SUPPORTED})")
        return files
    state = _load_json_file(state_file)
    entries = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "filename" in e for e in entries):
        raise DataError(state_file, "expected '_data_files' to be a list of {'filename': ...} objects")
    return [directory / str(entry["filename"]) for entry in entries]


def _read_saved_dataset(directory: Path, split: str | None) -> RawTable:
    dict_file = directory / "dataset_dict.json"
    if dict_file.is_file():
        manifest = _load_json_file(dict_file)
        splits = _string_list(
            manifest.get("splits") if isinstance(manifest, dict) else None, dict_file, "splits"
        )
        directory = directory / _choose_split(directory, splits, split)
    elif split is not None:
        raise DataError(
            directory, f"split {split!r} given, but this is a single saved dataset, not a DatasetDict"
        )
    return _read_arrow_files(directory, _arrow_data_files(directory))


def _read_arrow(path: Path) -> RawTable:
    """A single Arrow shard, e.g. one file of a saved dataset."""
    return _read_arrow_files(path, [path])


_FILE_READERS: dict[str, Callable[[Path], RawTable]] = {
    ".jsonl": _read_json_lines,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
    ".arrow": _read_arrow,
}


def read_table(path: Path | str, *, split: str | None = None) -> RawTable:
    """All raw rows of a data file or saved-dataset directory. `split` picks a DatasetDict split
    (default: "test" if present, else the only split)."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "no such file or directory")
    if path.is_dir():
        return _read_saved_dataset(path, split)
    if split is not None:
        raise DataError(path, f"split {split!r} given, but splits exist only in saved-dataset directories")
    reader = _FILE_READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(path, f"unsupported file type {path.suffix!r}; expected {SUPPORTED}")
    return reader(path)
