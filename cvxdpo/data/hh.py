"""Anthropic HH-RLHF-style pairs: JSON lines of full `{"chosen", "rejected"}` transcripts.

The prompt is the shared prefix up to and including the last "\\n\\nAssistant:"
of the chosen transcript; the responses are what follows it in each transcript.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from cvxdpo.config import MAX_ROW_BYTES
from cvxdpo.data.hub_stream import stream_to_jsonl
from cvxdpo.data.records import BadRows, FieldError, JsonlIndex, Pair, require_text

HUB_NAME = "Anthropic/hh-rlhf"
ASSISTANT = "\n\nAssistant:"


def split_transcripts(chosen: str, rejected: str) -> Pair:
    """A Pair from two full transcripts; FieldError when they do not share the prompt."""
    cut = chosen.rfind(ASSISTANT)
    if cut < 0:
        raise FieldError("bad value: 'chosen' has no '\\n\\nAssistant:' turn")
    prompt = chosen[: cut + len(ASSISTANT)]
    if not rejected.startswith(prompt):
        raise FieldError("bad value: 'chosen' and 'rejected' do not share the prompt")
    chosen_response, rejected_response = chosen[len(prompt):], rejected[len(prompt):]
    if not chosen_response.strip() or not rejected_response.strip():
        raise FieldError("empty text: a response after the last '\\n\\nAssistant:' is empty")
    return Pair(prompt=prompt, chosen=chosen_response, rejected=rejected_response)


def _parse(row: Mapping) -> Pair:
    return split_transcripts(require_text(row, "chosen"), require_text(row, "rejected"))


def hh_source(paths: str | Sequence[str], strict: bool = False, cache_dir: str | None = None,
              max_row_bytes: int = MAX_ROW_BYTES) -> JsonlIndex:
    """Pairs from local `.jsonl` / `.jsonl.gz` files."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    return JsonlIndex(paths, _parse, BadRows(strict, max_row_bytes), cache_dir=cache_dir)


def hh_from_hub(cache_dir: str, split: str = "train", strict: bool = False,
                max_row_bytes: int = MAX_ROW_BYTES) -> JsonlIndex:
    path = stream_to_jsonl(HUB_NAME, split, os.path.join(cache_dir, "hh-rlhf", f"{split}.jsonl"))
    return hh_source(path, strict, max_row_bytes=max_row_bytes)
