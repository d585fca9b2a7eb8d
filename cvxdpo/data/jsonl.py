"""Any JSON-lines file of `{"prompt", "chosen", "rejected"}` rows (optionally gzipped)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cvxdpo.config import MAX_ROW_BYTES
from cvxdpo.data.records import BadRows, JsonlIndex, Pair, require_text


def _parse(row: Mapping) -> Pair:
    pair = Pair(prompt=require_text(row, "prompt"), chosen=require_text(row, "chosen"),
                rejected=require_text(row, "rejected"))
    if "sft_target" in row:
        pair = Pair(pair.prompt, pair.chosen, pair.rejected, sft_target=require_text(row, "sft_target"))
    return pair


def jsonl_source(paths: str | Sequence[str], strict: bool = False, cache_dir: str | None = None,
                 max_row_bytes: int = MAX_ROW_BYTES) -> JsonlIndex:
    paths = [paths] if isinstance(paths, str) else list(paths)
    return JsonlIndex(paths, _parse, BadRows(strict, max_row_bytes), cache_dir=cache_dir)
