"""The paper's Educational-Tutor conversations and its *alternating* preference strategy.

A conversation is a list of utterances u_0, u_1, ... spoken in turn by two
agents. For a position i the pair is: prompt = u_i, chosen = u_{i+1} (the reply
that immediately follows), rejected = u_{i+2} (two steps on, spoken by the other
agent than the one that replied). The paper uses i = 0 only; `slide=True` takes
every i, and `with_history=True` prefixes the prompt with u_0..u_{i-1}. Pairs
whose chosen and rejected texts are equal are dropped and counted.

Files: the paper's Appendix-A schema (`sample_id, length, temperature,
initial_utterance, n, agent1, agent2, utterances=[[speaker, text], ...]`), one
conversation per JSON line (`.jsonl`, `.jsonl.gz`) or a JSON list; or the
common chat layout, `{"messages": [{"role", "content"}, ...]}` or a bare list
of such messages per line. A JSON list is one document, parsed whole, so it
may be at most `JSON_LIST_ROWS` rows' worth of `data.max_row_bytes` (16 MiB by
default); a larger file is refused with a request for JSON lines, which are read
one row at a time.

Held-out pairs (`load_tutor_split`) come from held-out conversations, and any
whose chosen or rejected text also occurs in a training pair is dropped: the
bundled conversations share many template lines.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.resources
import json
from collections.abc import Iterable, Iterator

from cvxdpo.config import MAX_ROW_BYTES
from cvxdpo.data.records import BadRows, FieldError, Pair, check_file, iter_json_lines, plain_copy, split_by_hash
from cvxdpo.errors import DataError

# The paper's list has 15 entries with literature twice: 14 distinct subjects.
PAPER_SUBJECTS = ("math", "science", "history", "literature", "art", "geography", "biology", "physics",
                  "chemistry", "music", "mythology", "astrology", "literature", "philosophy", "chess")
SUBJECTS = tuple(dict.fromkeys(PAPER_SUBJECTS))
SCHEMA_FIELDS = ("sample_id", "length", "temperature", "initial_utterance", "n", "agent1", "agent2", "utterances")
BUNDLED = "tutor_conversations.jsonl.gz"
JSON_LIST_ROWS = 16  # a whole-file JSON list may be this many times data.max_row_bytes (it is parsed whole)


def bundled_path() -> str:
    """The 4000 generated conversations shipped inside the package (made by tools/make_tutor_dataset.py)."""
    return str(importlib.resources.files("cvxdpo.data") / "bundled" / BUNDLED)


@dataclasses.dataclass
class Conversation:
    utterances: list[tuple[str, str]]  # (speaker, text)
    meta: dict


def parse_conversation(row) -> Conversation:
    """A Conversation from an Appendix-A row or a chat-layout row; FieldError names what is wrong."""
    if isinstance(row, list) or (isinstance(row, dict) and "messages" in row):
        messages = row if isinstance(row, list) else row["messages"]
        if not isinstance(messages, list):
            raise FieldError("wrong type: 'messages' is not a list")
        turns = []
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise FieldError(f"wrong type: message {k} is not {{'role': str, 'content': str}}")
            turns.append((m["role"], m["content"]))
        meta = {} if isinstance(row, list) else {k: v for k, v in row.items() if k != "messages"}
        return Conversation(turns, meta)
    if not isinstance(row, dict):
        raise FieldError(f"wrong type: conversation is {type(row).__name__}")
    if "utterances" not in row:
        raise FieldError("missing field: 'utterances'")
    utterances = row["utterances"]
    if not isinstance(utterances, list):
        raise FieldError("wrong type: 'utterances' is not a list")
    turns = []
    for k, u in enumerate(utterances):
        if not (isinstance(u, (list, tuple)) and len(u) == 2 and all(isinstance(x, str) for x in u)):
            raise FieldError(f"wrong type: utterance {k} is not [speaker, text]")
        turns.append((u[0], u[1]))
    return Conversation(turns, {k: v for k, v in row.items() if k != "utterances"})


def alternating_pairs(conv: Conversation, slide: bool = False, with_history: bool = False) -> tuple[list[Pair], int]:
    """The alternating pairs of one conversation, and how many were dropped (chosen == rejected)."""
    u = conv.utterances
    pairs, dropped = [], 0
    for i in range(len(u) - 2 if slide else min(1, len(u) - 2)):
        (_, prompt), (replier, chosen), (other, rejected) = u[i], u[i + 1], u[i + 2]
        if other == replier or not chosen.strip() or not rejected.strip() or not prompt.strip():
            dropped += 1
            continue
        if chosen.strip() == rejected.strip():
            dropped += 1
            continue
        if with_history and i:
            prompt = "\n\n".join(text for _, text in u[: i + 1])
        meta = {"position": i, **{k: conv.meta[k] for k in ("sample_id", "subject") if k in conv.meta}}
        pairs.append(Pair(prompt=prompt, chosen=chosen, rejected=rejected, meta=meta))
    return pairs, dropped


def read_conversations(path: str, bad: BadRows, cache_dir: str | None = None) -> Iterator[Conversation]:
    """Conversations from a JSON list or JSON lines (optionally gzipped: unpacked once into `cache_dir`, see
    `records.plain_copy`); bad ones go to `bad`."""
    check_file(path, "conversation file")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(64).lstrip()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot decompress ({e})") from None
    if head.startswith(b"["):  # one JSON document holding a list of conversations
        limit = JSON_LIST_ROWS * bad.max_row_bytes
        try:
            with opener(path, "rb") as f:
                document = f.read(limit + 1)  # never more than the limit in memory, gzipped or not
            if len(document) > limit:
                raise DataError(f"{path}: a JSON list is parsed whole and this one is over {limit} bytes "
                                f"({JSON_LIST_ROWS} x data.max_row_bytes={bad.max_row_bytes}); write one "
                                "conversation per line (JSONL), which is read a row at a time")
            rows = json.loads(document.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, EOFError) as e:
            bad.skip(path, None, f"broken JSON: {e}")
            return
        if not isinstance(rows, list):
            bad.skip(path, None, "wrong type: the document is not a list of conversations")
            return
        if rows and isinstance(rows[0], dict) and "role" in rows[0]:
            rows = [rows]  # the whole file is one chat
        numbered = ((k, row) for k, row in enumerate(rows, start=1))
    else:
        numbered = ((lineno, row) for lineno, _, row in iter_json_lines(plain_copy(path, cache_dir), bad,
                                                                        display=path))
    for where, row in numbered:
        try:
            yield parse_conversation(row)
        except FieldError as e:
            bad.skip(path, where, str(e))


@dataclasses.dataclass
class TutorPairs:
    pairs: list[Pair]
    conversations: int
    dropped_equal: int
    bad: BadRows

    def summary(self) -> str:
        return (f"{self.conversations} conversations -> {len(self.pairs)} pairs ({self.dropped_equal} dropped: "
                f"chosen == rejected); {self.bad.summary()}")


def _pairs_of(conversations: Iterable[Conversation], slide: bool, with_history: bool) -> tuple[list[Pair], int]:
    """The alternating pairs of all `conversations`, and how many were dropped (chosen == rejected)."""
    pairs, dropped = [], 0
    for conv in conversations:
        more, d = alternating_pairs(conv, slide=slide, with_history=with_history)
        pairs.extend(more)
        dropped += d
    return pairs, dropped


def _read_all(path: str | None, strict: bool, cache_dir: str | None,
              max_row_bytes: int) -> tuple[list[Conversation], BadRows]:
    bad = BadRows(strict, max_row_bytes)
    return list(read_conversations(path or bundled_path(), bad, cache_dir)), bad


def load_tutor_pairs(path: str | None = None, slide: bool = False, with_history: bool = False,
                     strict: bool = False, cache_dir: str | None = None,
                     max_row_bytes: int = MAX_ROW_BYTES) -> TutorPairs:
    """All alternating pairs of a conversation file (default: the bundled tutor set)."""
    conversations, bad = _read_all(path, strict, cache_dir, max_row_bytes)
    pairs, dropped = _pairs_of(conversations, slide, with_history)
    return TutorPairs(pairs, len(conversations), dropped, bad)


@dataclasses.dataclass
class TutorSplit:
    """Training and held-out pairs from disjoint conversations, the held-out ones free of training texts."""

    train: list[Pair]
    held_out: list[Pair]
    conversations: int
    held_out_conversations: int
    dropped_equal: int
    leaked: int  # held-out pairs dropped: their chosen or rejected text is also a training pair's text
    bad: BadRows

    def summary(self) -> str:
        return (f"{self.conversations} conversations ({self.held_out_conversations} held out) -> "
                f"{len(self.train)} train and {len(self.held_out)} held-out pairs; dropped: {self.dropped_equal} "
                f"with chosen == rejected, {self.leaked} held-out pairs whose chosen or rejected text a training "
                f"pair also has; {self.bad.summary()}")


def conversation_key(conv: Conversation, ordinal: int) -> str:
    """What the held-out split hashes: the conversation's sample_id (stable when the file is reordered), or
    its position in the file when it has none."""
    return str(conv.meta.get("sample_id", f"#{ordinal}"))


def _text_key(text: str) -> str:
    return " ".join(text.split())


def drop_leaked(train: Iterable[Pair], held_out: list[Pair]) -> tuple[list[Pair], int]:
    """The held-out pairs whose chosen and rejected texts occur nowhere in `train` (as a prompt, chosen or
    rejected text, whitespace aside), and how many were dropped."""
    seen = {_text_key(t) for p in train for t in (p.prompt, p.chosen, p.rejected)}
    kept = [p for p in held_out if _text_key(p.chosen) not in seen and _text_key(p.rejected) not in seen]
    return kept, len(held_out) - len(kept)


def load_tutor_split(path: str | None, eval_fraction: float, slide: bool = False, with_history: bool = False,
                     strict: bool = False, cache_dir: str | None = None,
                     max_row_bytes: int = MAX_ROW_BYTES) -> TutorSplit:
    """Training and held-out pairs of a conversation file, split by conversation and cleaned of shared texts.

    A conversation is held out when a hash of its `conversation_key` falls under
    `eval_fraction` (the same split on every run and every process), before any
    pair is made, so no conversation gives pairs to both sides. That is not
    enough: the bundled conversations are composed from templates, and student
    lines such as "Can you give me an example?" recur in hundreds of them. With
    slide=True and eval_fraction=0.05, 214 conversations are held out, and 1178
    of their 1422 pairs (83%; 51% of their chosen and rejected texts) share a
    chosen or rejected text with a training pair. No choice of sides can keep a
    line used by hundreds of conversations on one side, so those held-out pairs
    are dropped and counted (`leaked`): 244 clean held-out pairs remain (from
    132 conversations), against 24,922 training pairs.
    """
    conversations, bad = _read_all(path, strict, cache_dir, max_row_bytes)
    train_convs, held_convs = split_by_hash(conversations, eval_fraction,
                                            key=lambda i: conversation_key(conversations[i], i))
    train, train_dropped = _pairs_of(train_convs, slide, with_history)
    held, held_dropped = _pairs_of(held_convs, slide, with_history)
    held_out, leaked = drop_leaked(train, held)
    return TutorSplit(train, held_out, len(conversations), len(held_convs), train_dropped + held_dropped, leaked,
                      bad)
