"""Training losses on stacked batches, with the per-step metrics they report."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cvxdpo.model import gpt2


def sft_loss(model, batch: dict) -> tuple[jax.Array, dict]:
    """Next-token cross-entropy on the response tokens (`loss_mask`), averaged over those tokens."""
    out = model(batch["input_ids"], batch["attention_mask"])
    logp, count = gpt2.sequence_logprobs(out.logits, batch["input_ids"], batch["loss_mask"])
    tokens = jnp.maximum(count.sum(), 1.0)
    return -logp.sum() / tokens, {"tokens": count.sum()}
