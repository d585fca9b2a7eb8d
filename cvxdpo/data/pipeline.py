"""The Grain pipeline: Pair records -> token arrays of a few fixed shapes -> per-process batches.

    source (random access) -> shuffle(seed) -> repeat(epochs, reshuffled) -> shard by process
    -> tokenize + truncate + mask -> batch and pad to a length bucket -> (optional worker processes)

A pair batch holds `input_ids`, `attention_mask` and `loss_mask` of shape
(batch, 2, length): axis 1 is [chosen, rejected]. Keeping the two responses of
a pair next to each other (rather than [all chosen; all rejected]) means that
any split of the batch axis, over devices or over processes, keeps pairs whole;
the step reshapes to (2 * batch, length) for one forward pass. An SFT batch has
shape (batch, length). Every batch also has `weight` (batch,): 1 for a real
example, 0 for padding that fills the last batch of a finite pass, and `index`
(batch,), each example's position in the source (and `ref_logps` (batch, 2)
when precomputed reference log-probs are attached).

The iterator is a Grain DatasetIterator: `get_state()` / `set_state()` (and
`grain.checkpoint`) restore it so that a resumed run sees exactly the batches an
uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grain
import numpy as np

from cvxdpo.data.records import Pair
from cvxdpo.errors import ConfigError, DataError

TRUNCATION = ("keep_end", "keep_start")
# A generous bound on the characters of one token (GPT-2's longest token has 66, English averages about 4):
# a text cut to max_length * this many characters still holds more than the max_length tokens that
# `truncate` can keep of it, so the cut changes nothing but the cost of tokenizing a huge text.
MAX_CHARS_PER_TOKEN = 128


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    max_length: int = 512
    max_prompt_length: int = 256
    truncation: str = "keep_end"  # which end of an over-long prompt survives
    buckets: tuple[int, ...] = ()  # pad each batch to the smallest bucket that fits; () = max_length only

    def __post_init__(self):
        if self.truncation not in TRUNCATION:
            raise ConfigError(f"truncation {self.truncation!r} is not one of {', '.join(TRUNCATION)}")
        if not 0 < self.max_prompt_length < self.max_length:
            raise ConfigError(f"need 0 < max_prompt_length ({self.max_prompt_length}) < max_length ({self.max_length})")
        if any(b <= 0 or b > self.max_length for b in self.buckets):
            raise ConfigError(f"length buckets {self.buckets} must lie in (0, max_length={self.max_length}]")

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.buckets) | {self.max_length}))


def truncate(prompt: list[int], responses: list[list[int]], cfg: TokenizeConfig) -> tuple[list[int], list[list[int]]]:
    """The official DPO rule: shorten the prompt first (to max_prompt_length, keeping one end), then the responses."""
    longest = max(len(r) for r in responses)
    if len(prompt) + longest > cfg.max_length:
        keep = cfg.max_prompt_length
        prompt = prompt[:keep] if cfg.truncation == "keep_start" else prompt[-keep:]
    if len(prompt) + longest > cfg.max_length:
        room = cfg.max_length - len(prompt)
        responses = [r[:room] for r in responses]
    return prompt, responses


def _sequence(prompt: list[int], response: list[int]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(prompt + response, np.int32)
    loss = np.concatenate([np.zeros(len(prompt), np.int32), np.ones(len(response), np.int32)])
    return ids, loss


def clip_text(text: str, max_tokens: int, keep_end: bool = False) -> str:
    """`text` cut to max_tokens * MAX_CHARS_PER_TOKEN characters (keeping its start, or its end), so that
    tokenizing a huge text costs no more than tokenizing what `truncate` keeps of it."""
    limit = max_tokens * MAX_CHARS_PER_TOKEN
    if len(text) <= limit:
        return text
    return text[-limit:] if keep_end else text[:limit]


class Tokenize(grain.transforms.Map):
    """(index, Pair) -> unpadded token arrays: (2, n) for a pair, (n,) for SFT, with the response loss mask.

    `index` is the example's position in the source; with `ref_logps` (a
    (len(source), 2) table of precomputed reference log-probs) the example
    carries its row of it. Each text is cut by characters (`clip_text`) before
    it is tokenized and by tokens (`truncate`) after: no text can hold more than
    max_length tokens of the sequence, so time and memory per example are
    bounded by max_length, however long a row's text is.
    """

    def __init__(self, tokenizer, cfg: TokenizeConfig, mode: str, ref_logps: np.ndarray | None = None):
        self.tokenizer, self.cfg, self.mode, self.ref_logps = tokenizer, cfg, mode, ref_logps

    def _encode(self, text: str, keep_end: bool = False) -> list[int]:
        return self.tokenizer.encode(clip_text(text, self.cfg.max_length, keep_end))

    def map(self, element: tuple[int, Pair]) -> dict:
        index, pair = element
        eos = self.tokenizer.eos_id
        prompt = self._encode(pair.prompt, keep_end=self.cfg.truncation == "keep_end")
        extras = {"index": np.int32(index)}
        if self.ref_logps is not None:
            extras["ref_logps"] = np.asarray(self.ref_logps[index], np.float32)
        if self.mode == "sft":
            prompt, (target,) = truncate(prompt, [self._encode(pair.target) + [eos]], self.cfg)
            ids, loss = _sequence(prompt, target)
            return {"input_ids": ids, "loss_mask": loss, **extras}
        if pair.rejected is None:
            raise DataError(f"a preference batch needs rejected responses; this example has none: {pair.meta}")
        prompt, (chosen, rejected) = truncate(
            prompt, [self._encode(pair.chosen) + [eos], self._encode(pair.rejected) + [eos]], self.cfg)
        rows = [_sequence(prompt, chosen), _sequence(prompt, rejected)]
        return {"input_ids": [r[0] for r in rows], "loss_mask": [r[1] for r in rows], **extras}


class PadBatch:
    """Stacks examples and right-pads them to the smallest length bucket that fits the longest."""

    def __init__(self, cfg: TokenizeConfig, batch_size: int, pad_id: int):
        self.lengths, self.batch_size, self.pad_id = cfg.lengths, batch_size, pad_id

    def __call__(self, examples: Sequence[dict]) -> dict:
        def rows(e, key):
            return e[key] if isinstance(e[key], list) else [e[key]]

        longest = max(len(r) for e in examples for r in rows(e, "input_ids"))
        length = next(b for b in self.lengths if b >= longest)
        per = len(rows(examples[0], "input_ids"))
        shape = (self.batch_size, per, length)
        ids = np.full(shape, self.pad_id, np.int32)
        attn, loss = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
        for b, e in enumerate(examples):
            for k, (seq, lm) in enumerate(zip(rows(e, "input_ids"), rows(e, "loss_mask"))):
                ids[b, k, : len(seq)] = seq
                attn[b, k, : len(seq)] = 1
                loss[b, k, : len(seq)] = lm
        weight = (np.arange(self.batch_size) < len(examples)).astype(np.float32)
        batch = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}
        if not isinstance(examples[0]["input_ids"], list):  # SFT: no pair axis
            batch = {k: v[:, 0] for k, v in batch.items()}
        batch["weight"] = weight
        for key in examples[0].keys() - {"input_ids", "loss_mask"}:  # per-example values: index, ref_logps
            column = np.stack([e[key] for e in examples])
            batch[key] = np.concatenate([column, np.zeros((self.batch_size - len(examples),) + column.shape[1:],
                                                          column.dtype)])
        return batch


def make_dataset(source: Sequence[Pair], tokenizer, cfg: TokenizeConfig, batch_size: int, *, mode: str = "pairs",
                 seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                 shard_index: int | None = None, shard_count: int | None = None,
                 worker_count: int = 0, ref_logps: np.ndarray | None = None) -> grain.IterDataset:
    """The Grain dataset of one process's batches.

    `batch_size` is the global batch (over all processes); each process gets
    `batch_size / shard_count` rows of it. `num_epochs=None` repeats forever
    (reshuffled each epoch); a finite pass keeps the last partial batch,
    padded with weight-0 rows, so every batch has the same shape.
    """
    import jax

    if mode not in ("pairs", "sft"):
        raise ConfigError(f"pipeline mode {mode!r} is not 'pairs' or 'sft'")
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if batch_size % shard_count:
        raise ConfigError(f"global batch {batch_size} is not divisible by the {shard_count} processes feeding it")
    if len(source) == 0:
        raise DataError("the data source holds no usable examples")
    local = batch_size // shard_count
    ds = grain.MapDataset.source(source).map_with_index(lambda i, pair: (i, pair))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    ds = ds[shard_index::shard_count]
    ds = ds.map(Tokenize(tokenizer, cfg, mode, ref_logps))
    ds = ds.batch(local, drop_remainder=num_epochs is None, batch_fn=PadBatch(cfg, local, tokenizer.pad_id))
    it = ds.to_iter_dataset()
    if worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it


def batches_per_pass(num_examples: int, batch_size: int, shard_count: int) -> int:
    """Batches each process yields in one finite pass (the process with the most examples decides)."""
    per_process = -(-num_examples // shard_count)
    return -(-per_process // (batch_size // shard_count))


def padded_pass(dataset: grain.IterDataset, num_batches: int):
    """Exactly `num_batches` batches: a process that runs out repeats a weight-0 batch, so collective
    steps run the same number of times on every process."""
    it, last = iter(dataset), None
    for _ in range(num_batches):
        batch = next(it, None)
        if batch is None:
            if last is None:
                raise DataError("a finite pass over the data produced no batch")
            batch = {key: np.zeros_like(v) for key, v in last.items()}
        last = batch
        yield batch
