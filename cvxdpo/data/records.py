"""Pair records, and reading JSON-lines files row by row without losing a bad row silently.

Large files are never loaded whole: `JsonlIndex` streams a file once, keeps the
byte offset of each usable row (8 bytes a row), and reads rows back by offset,
so a Grain MapDataset over it has random access (global shuffle, exact resume)
in bounded memory. Bad rows (broken JSON, bad UTF-8, a missing or mistyped
field, empty text) are counted by reason and skipped with a warning naming the
file and line, or raise a `DataError` in strict mode.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import gzip
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from absl import logging

from cvxdpo.errors import DataError, MissingFileError

MAX_WARNINGS_PER_FILE = 10  # after this many warnings a file's bad rows are only counted


@dataclasses.dataclass(frozen=True)
class Pair:
    """One preference example. `rejected` is None for SFT-only examples (e.g. IMDb reviews)."""

    prompt: str
    chosen: str
    rejected: str | None = None
    sft_target: str | None = None  # what SFT trains on; defaults to `chosen`
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def target(self) -> str:
        return self.chosen if self.sft_target is None else self.sft_target


class BadRows:
    """Counts skipped rows by reason, warns (a bounded number of times) or raises in strict mode."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.counts: collections.Counter[str] = collections.Counter()
        self._warned: collections.Counter[str] = collections.Counter()

    def skip(self, where: str, line: int | None, reason: str) -> None:
        place = f"{where}:{line}" if line is not None else where
        if self.strict:
            raise DataError(f"{place}: {reason}")
        self.counts[reason.split(":")[0]] += 1
        if self._warned[where] < MAX_WARNINGS_PER_FILE:
            self._warned[where] += 1
            logging.warning("skipping %s: %s", place, reason)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "no rows skipped"
        return f"{self.total} rows skipped (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items())) + ")"


class FieldError(ValueError):
    """A row that parsed as JSON but lacks a usable field; the message is the reason."""


def require_text(row: Mapping, key: str, allow_empty: bool = False) -> str:
    if key not in row:
        raise FieldError(f"missing field: {key!r}")
    value = row[key]
    if not isinstance(value, str):
        raise FieldError(f"wrong type: {key!r} is {type(value).__name__}, not a string")
    if not allow_empty and not value.strip():
        raise FieldError(f"empty text: {key!r}")
    return value


def require_number(row: Mapping, key: str) -> float:
    if key not in row:
        raise FieldError(f"missing field: {key!r}")
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError(f"wrong type: {key!r} is {type(value).__name__}, not a number")
    return value


def check_file(path: str, what: str = "data file") -> str:
    if not os.path.exists(path):
        raise MissingFileError(f"{what} {path!r} does not exist")
    if not os.path.isfile(path):
        raise MissingFileError(f"{what} {path!r} is not a file")
    return path


def plain_copy(path: str, cache_dir: str | None = None) -> str:
    """`path` itself, or for `.gz` a decompressed copy (random access needs an uncompressed file)."""
    check_file(path)
    if not path.endswith(".gz"):
        return path
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "cvxdpo-cache")
    os.makedirs(cache_dir, exist_ok=True)
    stat = os.stat(path)
    out = os.path.join(cache_dir, f"{os.path.basename(path)[:-3]}.{stat.st_size}.{int(stat.st_mtime)}")
    if not os.path.exists(out):
        try:
            with gzip.open(path, "rb") as src, open(out + ".tmp", "wb") as dst:
                shutil.copyfileobj(src, dst)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: cannot decompress ({e})") from None
        os.replace(out + ".tmp", out)
    return out


def iter_json_lines(path: str, bad: BadRows, display: str | None = None) -> Iterator[tuple[int, int, Any]]:
    """(line number, byte offset, parsed JSON) for each parsable line; the rest go to `bad`."""
    display = display or path
    with open(path, "rb") as f:
        offset = 0
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.skip(display, lineno, f"not UTF-8: {e.reason} at byte {e.start}")
                continue
            try:
                yield lineno, start, json.loads(text)
            except json.JSONDecodeError as e:
                bad.skip(display, lineno, f"broken JSON: {e.msg}")


def read_json_line(path: str, offset: int) -> Any:
    with open(path, "rb") as f:
        f.seek(offset)
        return json.loads(f.readline().decode("utf-8"))


class JsonlIndex(Sequence):
    """Random access to the usable rows of JSON-lines files, parsed into records by `parse`.

    `parse(row) -> record` raises FieldError for an unusable row; it runs once
    while indexing (to find bad rows) and again on each read. `keep(file_id,
    offset, record)`, when given, decides which good rows are indexed.
    """

    def __init__(self, paths: Sequence[str], parse: Callable[[Mapping], Any], bad: BadRows,
                 cache_dir: str | None = None, keep: Callable[[int, int, Any], bool] | None = None):
        self.parse = parse
        self.bad = bad
        self.files: list[str] = []
        self._file_ids, self._offsets = array.array("i"), array.array("q")
        for path in paths:
            file_id = len(self.files)
            self.files.append(plain_copy(path, cache_dir))
            for lineno, offset, row in iter_json_lines(self.files[-1], bad, display=path):
                if not isinstance(row, dict):
                    bad.skip(path, lineno, f"wrong type: row is {type(row).__name__}, not an object")
                    continue
                try:
                    record = parse(row)
                except FieldError as e:
                    bad.skip(path, lineno, str(e))
                    continue
                if keep is None or keep(file_id, offset, record):
                    self._file_ids.append(file_id)
                    self._offsets.append(offset)

    def __len__(self) -> int:
        return len(self._offsets)

    def location(self, i: int) -> tuple[str, int]:
        return self.files[self._file_ids[i]], self._offsets[i]

    def __getitem__(self, i):
        return self.parse(read_json_line(*self.location(i)))


class Subset(Sequence):
    """A fixed selection of another sequence's items (e.g. a held-out split), read lazily."""

    def __init__(self, base: Sequence, indices: Sequence[int]):
        self.base, self.indices = base, array.array("q", indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.base[self.indices[i]]


def split_by_hash(base: Sequence, fraction: float, key: Callable[[int], str] = str) -> tuple[Subset, Subset]:
    """(train, held-out): an item is held out when a hash of key(index) falls under `fraction`."""
    held = [zlib.crc32(key(i).encode()) % 10_000 < fraction * 10_000 for i in range(len(base))]
    return (Subset(base, [i for i, h in enumerate(held) if not h]), Subset(base, [i for i, h in enumerate(held) if h]))
