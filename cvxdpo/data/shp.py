"""Stanford Human Preferences (stanfordnlp/SHP) as DPO pairs, streamed.

Pair rules of the official DPO code: prompt "\\n\\nHuman: " + history +
"\\n\\nAssistant:", responses " " + human_ref_A/B, a row is kept only if
max(score_A/score_B, score_B/score_A) >= 2, `labels` = 1 means A is preferred,
and the SFT target of a post is its best-scored response among the kept rows.
The dataset card suggests at most 5 pairs per post (`max_pairs_per_post`).

Local layout (the hub's): `<root>/<domain>/{train,validation,test}.json`, JSON
lines. Rows are never all in memory: one streaming pass keeps the byte offset
of each kept row and, per post, where its best response lies.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

from absl import logging

from cvxdpo.config import MAX_ROW_BYTES
from cvxdpo.data.records import BadRows, FieldError, JsonlIndex, Pair, require_number, require_text
from cvxdpo.errors import ConfigError, MissingFileError

HUB_NAME = "stanfordnlp/SHP"
SPLITS = ("train", "validation", "test")
DOMAINS = ("askacademia", "askanthropology", "askbaking", "askcarguys", "askculinary", "askdocs", "askengineers",
           "askhistorians", "askhr", "askphilosophy", "askphysics", "askscience", "asksciencefiction",
           "asksocialscience", "askvet", "changemyview", "explainlikeimfive", "legaladvice")
FIELDS = ("post_id", "domain", "upvote_ratio", "history", "c_root_id_A", "c_root_id_B", "created_at_utc_A",
          "created_at_utc_B", "score_A", "score_B", "human_ref_A", "human_ref_B", "labels", "seconds_difference",
          "score_ratio")
MIN_SCORE_RATIO = 2.0


def prompt_of(history: str) -> str:
    return "\n\nHuman: " + history + "\n\nAssistant:"


def _parse(row: Mapping) -> dict:
    """The fields the pair rules use, validated; FieldError otherwise."""
    out = {k: require_text(row, k) for k in ("post_id", "history", "human_ref_A", "human_ref_B")}
    out["score_A"], out["score_B"] = require_number(row, "score_A"), require_number(row, "score_B")
    label = require_number(row, "labels")
    if label not in (0, 1):
        raise FieldError(f"bad value: 'labels' is {label!r}, not 0 or 1")
    out["labels"] = int(label)
    if out["score_A"] <= 0 or out["score_B"] <= 0:
        raise FieldError("bad value: scores must be positive")
    return out


def score_ratio(row: Mapping) -> float:
    return max(row["score_A"] / row["score_B"], row["score_B"] / row["score_A"])


class SHPSource(Sequence):
    """Random access to the kept SHP pairs of some domains and one split of a local copy."""

    def __init__(self, root: str, split: str = "train", domains: Sequence[str] | None = None,
                 max_pairs_per_post: int | None = None, min_score_ratio: float = MIN_SCORE_RATIO,
                 strict: bool = False, max_row_bytes: int = MAX_ROW_BYTES):
        if split not in SPLITS:
            raise ConfigError(f"SHP split {split!r} is unknown; choose one of {', '.join(SPLITS)}")
        if not os.path.isdir(root):
            raise MissingFileError(f"SHP directory {root!r} does not exist")
        present = sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, f"{split}.json")))
        domains = list(domains) if domains else present
        unknown = [d for d in domains if d not in DOMAINS and d not in present]
        if unknown:
            raise ConfigError(f"SHP domain(s) {', '.join(unknown)} unknown; known: {', '.join(DOMAINS)}")
        missing = [d for d in domains if d not in present]
        if missing:
            raise MissingFileError(f"SHP directory {root!r} has no {split}.json for domain(s) {', '.join(missing)}")
        if not domains:
            raise MissingFileError(f"SHP directory {root!r} holds no <domain>/{split}.json files")
        self.bad = BadRows(strict, max_row_bytes)
        self.min_score_ratio = min_score_ratio
        self._per_post: dict[str, int] = {}
        self._best: dict[str, tuple[float, int, int, str]] = {}  # post -> (score, file, offset, "A"/"B")

        def keep(file_id: int, offset: int, rec: dict) -> bool:
            if score_ratio(rec) < min_score_ratio:
                return False
            post = rec["post_id"]
            for side in ("A", "B"):
                if post not in self._best or rec[f"score_{side}"] > self._best[post][0]:
                    self._best[post] = (rec[f"score_{side}"], file_id, offset, side)
            count = self._per_post.get(post, 0)
            if max_pairs_per_post is not None and count >= max_pairs_per_post:
                return False
            self._per_post[post] = count + 1
            return True

        paths = [os.path.join(root, d, f"{split}.json") for d in domains]
        self.index = JsonlIndex(paths, _parse, self.bad, keep=keep)
        logging.info("SHP %s (%d domains): %d pairs kept; %s", split, len(domains), len(self.index),
                     self.bad.summary())

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i) -> Pair:
        rec = self.index[i]
        chosen, rejected = ("A", "B") if rec["labels"] == 1 else ("B", "A")
        _, file_id, offset, side = self._best[rec["post_id"]]
        best = self.index.row(file_id, offset)
        return Pair(prompt=prompt_of(rec["history"]), chosen=" " + rec[f"human_ref_{chosen}"],
                    rejected=" " + rec[f"human_ref_{rejected}"], sft_target=" " + best[f"human_ref_{side}"],
                    meta={"post_id": rec["post_id"], "score_ratio": score_ratio(rec)})


def download(cache_dir: str, split: str = "train", domains: Sequence[str] | None = None) -> str:
    """Streams stanfordnlp/SHP from the hub (through `datasets`) into the local layout; returns the root.

    Rows go straight to disk, so memory stays bounded; the local reader then
    indexes the files like any local copy.
    """
    try:
        import datasets
    except ImportError:
        raise ConfigError("reading SHP from the hub needs the `datasets` package: pip install 'cvxdpo[hub-data]'")
    root = os.path.join(cache_dir, "shp")
    wanted = list(domains or DOMAINS)
    todo = [d for d in wanted if not os.path.exists(os.path.join(root, d, f"{split}.json"))]
    if not todo:
        return root
    try:
        stream = datasets.load_dataset(HUB_NAME, split=split, streaming=True)
        files = {}
        for row in stream:
            domain = row["domain"].rsplit("_", 1)[0]
            if domain not in todo:
                continue
            if domain not in files:
                os.makedirs(os.path.join(root, domain), exist_ok=True)
                files[domain] = open(os.path.join(root, domain, f"{split}.json.tmp"), "w")
            files[domain].write(json.dumps(row) + "\n")
    except Exception as e:  # network or hub errors
        raise MissingFileError(f"could not stream {HUB_NAME} from the hub ({type(e).__name__}: {e}); "
                               "pass a local copy in the hub's layout instead") from None
    for domain, f in files.items():
        f.close()
        os.replace(f.name, f.name[:-4])
    return root
