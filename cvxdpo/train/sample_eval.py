"""Samples from a policy and the log-probs of those samples under the policy and a reference.

K completions per prompt at one temperature, batched through the KV-cache
sampler (one compilation per shape), then one forward pass per model over
prompt + sample to score the sampled tokens: the per-sequence
sum of log pi - log ref is the KL estimate of `cvxdpo.eval.metrics`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx

from cvxdpo.model import generate
from cvxdpo.train.objectives import sequence_forward


class Samples(NamedTuple):
    prompt_index: np.ndarray  # (S,) which prompt each sample continues
    tokens: list[list[int]]  # sampled tokens, EOS excluded
    texts: list[str]
    policy_logps: np.ndarray  # (S,) summed log pi of the sampled tokens (EOS included when sampled)
    reference_logps: np.ndarray | None  # (S,) the same under the reference


@functools.partial(jax.jit, static_argnums=0)
def _sample_logps(graphdef, params, batch):
    return sequence_forward(graphdef, params, batch)[0]


def _score(model, prompts: list[list[int]], generated: generate.Generated, pad_id: int) -> np.ndarray:
    """Summed log-probs of each row's generated tokens given its prompt, under `model` (lengths rounded up to
    the sampler's prompt bucket, so that one compilation serves many batches)."""
    longest = -(-max(len(p) for p in prompts) // generate.PROMPT_BUCKET) * generate.PROMPT_BUCKET
    length = longest + generated.tokens.shape[1]
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask, loss_mask = np.zeros_like(ids), np.zeros_like(ids)
    for row, (p, toks, n) in enumerate(zip(prompts, generated.tokens, generated.lengths)):
        ids[row, :len(p) + n] = [*p, *toks[:n]]
        mask[row, :len(p) + n] = 1
        loss_mask[row, len(p):len(p) + n] = 1
    graphdef, params = nnx.split(model)
    return np.asarray(_sample_logps(graphdef, params, {"input_ids": ids, "attention_mask": mask,
                                                       "loss_mask": loss_mask}))


def sample(model, tokenizer, prompts: list[list[int]], k: int, temperature: float, max_new_tokens: int,
           seed: int = 0, reference=None, batch_size: int = 64) -> Samples:
    """`k` samples for each tokenized prompt, in batches of `batch_size` rows."""
    rows = [p for p in prompts for _ in range(k)]
    index = np.repeat(np.arange(len(prompts)), k)
    tokens, texts, policy, ref = [], [], [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        out = generate.generate(model, chunk, max_new_tokens, temperature=temperature, seed=seed + start,
                                eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        for toks, n in zip(out.tokens, out.lengths):
            kept = [int(t) for t in toks[:n] if t != tokenizer.eos_id]
            tokens.append(kept)
            texts.append(tokenizer.decode(kept))
        policy.append(_score(model, chunk, out, tokenizer.pad_id))
        if reference is not None:
            ref.append(_score(reference, chunk, out, tokenizer.pad_id))
    return Samples(index, tokens, texts, np.concatenate(policy), np.concatenate(ref) if ref else None)
