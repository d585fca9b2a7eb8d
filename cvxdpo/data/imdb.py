"""IMDb movie reviews: SFT examples and review-prefix prompts (2-8 tokens, as in the DPO paper).

Sources: a CSV with `text` and `label` columns (and optionally `is_valid`, as
the fastai sample has), an `aclImdb/` directory ({train,test}/{pos,neg}/*.txt),
or the hub's `stanfordnlp/imdb`. Labels are 1 = positive, 0 = negative.
Preference pairs sampled from a model and ranked by a sentiment scorer belong
to the evaluation code.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import gzip
import os
import random
from collections.abc import Sequence

from cvxdpo.config import MAX_ROW_BYTES
from cvxdpo.data.hub_stream import stream_to_jsonl
from cvxdpo.data.records import BadRows, Pair, check_file, iter_json_lines
from cvxdpo.errors import ConfigError, DataError, MissingFileError

HUB_NAME = "stanfordnlp/imdb"
LABELS = {"positive": 1, "pos": 1, "1": 1, "negative": 0, "neg": 0, "0": 0}
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class Review:
    text: str
    label: int  # 1 positive, 0 negative


def clean(text: str) -> str:
    return text.replace("<br /><br />", "\n").replace("<br />", " ").strip()


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"IMDb split {split!r} is unknown; choose one of {', '.join(SPLITS)}")


def _csv_rows(reader: csv.DictReader, path: str, bad: BadRows):
    """The rows of `reader`; a row the csv module refuses (a field over its size limit, a NUL byte) is
    skipped (the reader goes on after it), those over the limit summed up in one warning."""
    too_large = []
    while True:
        try:
            yield next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            if "field larger than field limit" in str(e):
                bad.skip(path, reader.line_num, f"row too large: a field over data.max_row_bytes={bad.max_row_bytes}",
                         warn=False)
                too_large.append(reader.line_num)
            else:
                bad.skip(path, reader.line_num, f"bad CSV: {e}")
    bad.warn_too_large(path, too_large)


def _first_non_utf8_line(path: str) -> int:
    """The line of a file's first byte that is not UTF-8. The csv reader cannot say: its line count lags
    behind the decoding, which reads ahead in blocks. Read in blocks too, so memory stays bounded whatever
    the lines' lengths."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    opener = gzip.open if path.endswith(".gz") else open
    line = 1
    with opener(path, "rb") as f:
        while block := f.read(1 << 16):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                return line + block[:e.start].count(b"\n")
            line += block.count(b"\n")
    return line


def from_csv(path: str, split: str | None = None, strict: bool = False,
             max_row_bytes: int = MAX_ROW_BYTES) -> tuple[list[Review], BadRows]:
    """Reviews of a CSV; with an `is_valid` column, split "train" keeps the rows where it is false.

    A field of more than `max_row_bytes` characters is skipped with its row (the csv module's own limit, set
    for the read; the module reads one physical line at a time, so a long unquoted line is still held whole).
    """
    check_file(path, "IMDb CSV")
    if split is not None:
        _check_split(split)
    bad = BadRows(strict, max_row_bytes)
    reviews = []
    opener = gzip.open if path.endswith(".gz") else open
    previous_limit = csv.field_size_limit(max_row_bytes)
    try:
        with opener(path, "rt", newline="", encoding="utf-8", errors="strict") as f:
            reader = csv.DictReader(f)
            missing = {"text", "label"} - set(reader.fieldnames or ())
            if missing:
                raise DataError(f"{path}: CSV lacks column(s) {', '.join(sorted(missing))} (it has "
                                f"{', '.join(reader.fieldnames or ()) or 'no header'}); IMDb needs text and label")
            for row in _csv_rows(reader, path, bad):
                text, label = row.get("text"), str(row.get("label", "")).strip().lower()
                if label not in LABELS:
                    bad.skip(path, reader.line_num, f"bad value: label {row.get('label')!r}")
                    continue
                if not text or not text.strip():
                    bad.skip(path, reader.line_num, "empty text: 'text'")
                    continue
                if split is not None and "is_valid" in row:
                    held = str(row["is_valid"]).strip().lower() in ("true", "1")
                    if held != (split == "test"):
                        continue
                reviews.append(Review(clean(text), LABELS[label]))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{_first_non_utf8_line(path)}: not UTF-8 ({e.reason})") from None
    except (OSError, EOFError) as e:  # e.g. a broken .gz
        raise DataError(f"{path}: cannot read ({e})") from None
    finally:
        csv.field_size_limit(previous_limit)
    return reviews, bad


def from_acl_directory(root: str, split: str = "train", strict: bool = False,
                       max_row_bytes: int = MAX_ROW_BYTES) -> tuple[list[Review], BadRows]:
    """Reviews of an aclImdb/ tree (reads every file of the split; 25,000 reviews is ~33 MB); a file over
    `max_row_bytes` is skipped."""
    _check_split(split)
    bad = BadRows(strict, max_row_bytes)
    reviews = []
    for name, label in (("pos", 1), ("neg", 0)):
        folder = os.path.join(root, split, name)
        if not os.path.isdir(folder):
            raise MissingFileError(f"IMDb directory {root!r} has no {split}/{name}/ folder")
        for fname in sorted(os.listdir(folder)):
            path = os.path.join(folder, fname)
            if os.path.getsize(path) > max_row_bytes:
                bad.skip(path, None, bad.too_large(os.path.getsize(path)))
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except UnicodeDecodeError as e:
                bad.skip(path, None, f"not UTF-8: {e.reason}")
                continue
            if not text.strip():
                bad.skip(path, None, "empty text")
                continue
            reviews.append(Review(clean(text), label))
    return reviews, bad


def from_hub(cache_dir: str, split: str = "train", strict: bool = False,
             max_row_bytes: int = MAX_ROW_BYTES) -> tuple[list[Review], BadRows]:
    _check_split(split)
    path = stream_to_jsonl(HUB_NAME, split, os.path.join(cache_dir, "imdb", f"{split}.jsonl"))
    bad = BadRows(strict, max_row_bytes)
    reviews = [Review(clean(row["text"]), int(row["label"])) for _, _, row in iter_json_lines(path, bad)]
    return reviews, bad


def load_reviews(source: str, split: str = "train", strict: bool = False, cache_dir: str | None = None,
                 max_row_bytes: int = MAX_ROW_BYTES) -> tuple[list[Review], BadRows]:
    """`source`: a .csv file, an aclImdb directory, or "hub"."""
    if source == "hub":
        return from_hub(cache_dir or os.path.join(os.getcwd(), ".cache"), split, strict, max_row_bytes)
    if os.path.isdir(source):
        return from_acl_directory(source, split, strict, max_row_bytes)
    if source.endswith((".csv", ".csv.gz")):
        return from_csv(source, split, strict, max_row_bytes)
    raise MissingFileError(f"IMDb source {source!r} is neither a .csv(.gz) file, an aclImdb directory, nor 'hub'")


def sft_examples(reviews: Sequence[Review]) -> list[Pair]:
    """Whole reviews as SFT targets (empty prompt)."""
    return [Pair(prompt="", chosen=r.text, sft_target=r.text, meta={"label": r.label}) for r in reviews]


def prefix_prompts(reviews: Sequence[Review], tokenizer, seed: int = 0, min_tokens: int = 2,
                   max_tokens: int = 8) -> list[tuple[str, int]]:
    """(prompt, label): the first k tokens of each review, k uniform in [min_tokens, max_tokens]."""
    if not 1 <= min_tokens <= max_tokens:
        raise ConfigError(f"prefix lengths must satisfy 1 <= min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    rng = random.Random(seed)
    out = []
    for r in reviews:
        ids = tokenizer.encode(r.text)
        k = rng.randint(min_tokens, max_tokens)
        out.append((tokenizer.decode(ids[:k]), r.label))
    return out



def labeled_pairs(reviews: Sequence[Review], tokenizer, seed: int = 0, min_tokens: int = 2,
                  max_tokens: int = 8) -> list[Pair]:
    """Sentiment pairs from labels alone: a positive review's prefix as the prompt, its continuation chosen,
    and the continuation of a negative review (after its own prefix) rejected.

    A crude stand-in for pairs sampled from the SFT model and ranked by a
    sentiment scorer, usable without any model.
    """
    rng = random.Random(seed)
    positive = [r for r in reviews if r.label == 1]
    negative = [r for r in reviews if r.label == 0]
    if not positive or not negative:
        raise ConfigError("IMDb labeled pairs need both positive and negative reviews")
    pairs = []
    for k, review in enumerate(positive):
        other = negative[rng.randrange(len(negative))]
        n = rng.randint(min_tokens, max_tokens)
        ids, other_ids = tokenizer.encode(review.text), tokenizer.encode(other.text)
        if len(ids) <= n or len(other_ids) <= n:
            continue
        pairs.append(Pair(prompt=tokenizer.decode(ids[:n]), chosen=tokenizer.decode(ids[n:]),
                          rejected=tokenizer.decode(other_ids[n:]), meta={"review": k}))
    return pairs
