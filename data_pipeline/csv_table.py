"""Shared checks for the dataset label tables: required columns and paths that must stay inside the root."""
from __future__ import annotations

import csv
import gzip
import os
from typing import Iterator, Sequence


def read_table(path: str, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (row number, {column: value}) for each data row of a CSV file.

    Checks the header first and raises a one-line ValueError naming every missing column, so a
    wrong file fails before any long work. Row numbers count the header as row 1 (as a
    spreadsheet shows them). Headers that span two columns (NIH's
    `OriginalImage[Width,Height]`) are harmless: only the named columns are looked up.
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path}: label file not found")
    f = gzip.open(path, "rt", newline="", encoding="utf-8-sig") if path.endswith(".gz") else open(path, newline="", encoding="utf-8-sig")
    reader = csv.reader(f)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        f.close()
        raise ValueError(f"{path}: empty file, expected a header with columns {', '.join(required)}") from None
    except (UnicodeDecodeError, EOFError, OSError, csv.Error) as exc:   # EOFError/OSError: a broken .gz
        f.close()
        raise ValueError(f"{path}: {_unreadable(path, exc)}") from None
    missing = [c for c in required if c not in header]
    if missing:
        f.close()
        raise ValueError(f"{path}: missing required columns: {', '.join(missing)}")
    position = {c: header.index(c) for c in required}
    return _rows(path, f, reader, position)


def _unreadable(path: str, exc: Exception) -> str:
    """What is wrong with the file, naming the row of the first byte that is not UTF-8 (the text
    layer decodes ahead in blocks, so the row being parsed when the error surfaces is not it)."""
    if isinstance(exc, UnicodeDecodeError):
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as raw:
            data = raw.read()
        try:
            data.decode("utf-8")
            start = exc.start
        except UnicodeDecodeError as full:
            start = full.start
        row = data.count(b"\n", 0, start) + 1
        return f"not UTF-8 text (byte {data[start]:#04x} at row {row})"
    return f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''})"


def _rows(path: str, f, reader, position: dict[str, int]) -> Iterator[tuple[int, dict[str, str]]]:
    """The data rows; a decoding error names the file and the row. Raises ValueError for a table
    with a header but no data row: an empty dataset is never a silent success."""
    rows = 0
    with f:
        try:
            for row_number, row in enumerate(reader, start=2):
                if not row or not any(cell.strip() for cell in row):
                    continue
                rows += 1
                yield row_number, {c: (row[i].strip() if i < len(row) else "") for c, i in position.items()}
        except (UnicodeDecodeError, EOFError, OSError, csv.Error) as exc:
            raise ValueError(f"{path}: {_unreadable(path, exc)}") from None
    if rows == 0:
        raise ValueError(f"{path}: no data rows (only a header)")


def no_usable_rows(path: str, skipped: list[str]) -> ValueError:
    """The error of a table whose every row was skipped: a reader returning zero records would
    otherwise surface much later as an empty training set."""
    return ValueError(f"{path}: none of its {len(skipped)} rows is usable (first: {skipped[0]})")


def resolve_inside(root: str, base: str, relative: str, where: str) -> str:
    """Absolute path of `relative` joined to `base`; refuses (ValueError) one outside `root`.

    A label table is data from outside the program: a path such as `../../etc/passwd` or an
    absolute path must never make the loader read files beyond the dataset it was pointed at.
    """
    if os.path.isabs(relative):
        raise ValueError(f"{where}: refused absolute image path {relative!r} (must be inside {root})")
    real_root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(base, relative))
    if os.path.commonpath([real_root, path]) != real_root:
        raise ValueError(f"{where}: refused image path {relative!r}: it resolves outside the dataset root {root}")
    return path
