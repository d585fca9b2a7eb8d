"""Pair records, and reading JSON-lines files row by row without losing a bad row silently.

Large files are never loaded whole: `JsonlIndex` streams a file once, keeps the
byte offset of each usable row (8 bytes a row), and reads rows back by offset,
so a Grain MapDataset over it has random access (global shuffle, exact resume)
in bounded memory. Bad rows (broken JSON, bad UTF-8, a missing or mistyped
field, empty text) are counted by reason and skipped with a warning naming the
file and line, or raise a `DataError` in strict mode. A row that was usable
when indexed but no longer reads back (the file changed under the run) is a
`DataError` naming the file and line in either mode.

No single row can exhaust memory either: a line longer than `max_row_bytes`
(the config's `data.max_row_bytes`, 1 MiB by default) is skipped and counted
after reading at most max_row_bytes + 1 bytes of it (the rest is read past in
small chunks), so loading holds one row of at most max_row_bytes bytes, its
decoded text and its parsed JSON at a time: O(max_row_bytes) memory per row,
whatever the file holds.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import gzip
import itertools
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from absl import logging

from cvxdpo.config import MAX_ROW_BYTES
from cvxdpo.errors import DataError, MissingFileError

MAX_WARNINGS_PER_FILE = 10  # after this many warnings a file's bad rows are only counted
_SKIP_CHUNK = 1 << 16  # the rest of an over-long line is read past in pieces of this size


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
    """The policy for unusable rows (the largest row read, whether a bad row stops the run) and their tally:
    counts skipped rows by reason, warns (a bounded number of times) or raises in strict mode."""

    def __init__(self, strict: bool = False, max_row_bytes: int = MAX_ROW_BYTES):
        self.strict = strict
        self.max_row_bytes = max_row_bytes
        self.counts: collections.Counter[str] = collections.Counter()
        self._warned: collections.Counter[str] = collections.Counter()

    def skip(self, where: str, line: int | None, reason: str, warn: bool = True) -> None:
        """Counts a skipped row (`reason` up to its first colon is the count's key) and warns, unless `warn`
        is False (the caller sums such rows up in one warning), or raises DataError in strict mode."""
        place = f"{where}:{line}" if line is not None else where
        if self.strict:
            raise DataError(f"{place}: {reason}")
        self.counts[reason.split(":")[0]] += 1
        if warn and self._warned[where] < MAX_WARNINGS_PER_FILE:
            self._warned[where] += 1
            logging.warning("skipping %s: %s", place, reason)

    def too_large(self, size: int) -> str:
        return f"row too large: {size} bytes > data.max_row_bytes={self.max_row_bytes}"

    def warn_too_large(self, where: str, lines: list[int]) -> None:
        """One warning for all the rows of a file skipped as too large."""
        if lines:
            shown = ", ".join(map(str, lines[:5])) + (", ..." if len(lines) > 5 else "")
            logging.warning("skipped %d rows of %s larger than data.max_row_bytes=%d bytes (lines %s)", len(lines),
                            where, self.max_row_bytes, shown)

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
    """`path` itself, or for `.gz` a decompressed copy (random access needs an uncompressed file).

    The copy goes to `cache_dir` (the config's `data.cache_dir`; a temporary
    folder when None), named after the file and a hash of its absolute path, and
    is made once: later runs reuse it until the source's size or time stamp
    changes, when it is replaced, so copies never pile up. It is written to a
    unique temporary name and renamed, so that processes unpacking at once never
    read a half-written copy.
    """
    check_file(path)
    if not path.endswith(".gz"):
        return path
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "cvxdpo-cache")
    os.makedirs(cache_dir, exist_ok=True)
    source = os.path.abspath(path)
    out = os.path.join(cache_dir, f"{os.path.basename(path)[:-3]}.{zlib.crc32(source.encode()):08x}")
    stat = os.stat(path)
    stamp = f"{source} {stat.st_size} {stat.st_mtime_ns}"
    if os.path.exists(out) and _read_text(out + ".source") == stamp:
        return out
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=os.path.basename(out) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as dst, gzip.open(path, "rb") as src:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, out)
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot decompress ({e})") from None
    finally:
        if os.path.exists(tmp):  # a failed or interrupted copy leaves nothing behind
            os.unlink(tmp)
    with open(out + ".source", "w") as f:
        f.write(stamp)
    return out


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _bounded_lines(f, limit: int) -> Iterator[tuple[int, int, bytes | None, int]]:
    """(line number, byte offset, the line or None when it is over `limit` bytes, its size in bytes) for each
    line of the binary file `f`, holding at most limit + 1 bytes of a line at once."""
    offset = 0
    for lineno in itertools.count(1):
        raw = f.readline(limit + 1)
        if not raw:
            return
        size = len(raw)
        if size > limit and not raw.endswith(b"\n"):  # more than `limit` bytes before the newline
            raw = None
            while True:
                chunk = f.readline(_SKIP_CHUNK)
                size += len(chunk)
                if not chunk or chunk.endswith(b"\n"):
                    break
        yield lineno, offset, raw, size
        offset += size


def iter_json_lines(path: str, bad: BadRows, display: str | None = None) -> Iterator[tuple[int, int, Any]]:
    """(line number, byte offset, parsed JSON) for each parsable line; the rest go to `bad` (rows over
    `bad.max_row_bytes` are summed up in one warning per file)."""
    display = display or path
    too_large = []
    with open(path, "rb") as f:
        for lineno, start, raw, size in _bounded_lines(f, bad.max_row_bytes):
            if raw is None:
                bad.skip(display, lineno, bad.too_large(size), warn=False)
                too_large.append(lineno)
                continue
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.skip(display, lineno, f"not UTF-8: {e.reason} at byte {e.start}")
                continue
            try:
                yield lineno, start, json.loads(text.rstrip("\r\n"))  # columns count within the line
            except json.JSONDecodeError as e:
                bad.skip(display, lineno, f"broken JSON: {e.msg.removesuffix(' at')} at column {e.colno}")
    bad.warn_too_large(display, too_large)


def _line_at(path: str, offset: int) -> int:
    """The number of the line that starts at byte `offset` (counted only for an error message)."""
    line, left = 1, offset
    with open(path, "rb") as f:
        while left > 0:
            chunk = f.read(min(left, _SKIP_CHUNK))
            if not chunk:
                break
            line, left = line + chunk.count(b"\n"), left - len(chunk)
    return line


def changed_row(path: str, offset: int, display: str, what: str) -> DataError:
    """The error for an indexed row that no longer reads back: it was usable when the file was indexed, so
    the file changed since. Strict or not, it cannot be skipped as at indexing (the index promised a row
    there): DataError naming the file (`display`: the user's name for it, `path` may be a decompressed copy)
    and the line."""
    return DataError(f"{display}:{_line_at(path, offset)}: the row indexed at this line {what}; the file "
                     "changed after it was loaded")


def read_json_line(path: str, offset: int, display: str | None = None) -> Any:
    """The parsed JSON row at byte `offset` of `path`; DataError (see `changed_row`) when it does not parse."""
    with open(path, "rb") as f:
        f.seek(offset)
        raw = f.readline()
    try:
        return json.loads(raw.decode("utf-8"))
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
        what = f"no longer parses ({type(e).__name__})" if raw else "is past the end of the file"
        raise changed_row(path, offset, display or path, what) from e


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
        self.files: list[str] = []  # what is read: the paths, or decompressed copies of .gz ones
        self.sources = list(paths)  # what errors name
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

    def row(self, file_id: int, offset: int) -> Any:
        """The parsed JSON row at `offset` of file `file_id`."""
        return read_json_line(self.files[file_id], offset, self.sources[file_id])

    def __getitem__(self, i):
        file_id, offset = self._file_ids[i], self._offsets[i]
        try:
            return self.parse(self.row(file_id, offset))
        except FieldError as e:
            what = f"is no longer usable ({e})"
            raise changed_row(self.files[file_id], offset, self.sources[file_id], what) from e


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
