"""Jitted sampling with a KV cache: greedy, temperature, top-k and top-p.

Prompts of different lengths are left-padded into one batch (positions come
from the attention mask, so padding changes nothing). The prompt is run once
to fill the cache, then a `lax.while_loop` emits one token per iteration and
ends when every row has produced EOS or `max_new_tokens` is reached. The
sampling knobs are traced values, so one compilation serves every setting for
a given (batch, prompt length, max_new_tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cvxdpo.errors import ConfigError
from cvxdpo.model.gpt2 import GPT2

PROMPT_BUCKET = 16  # prompt lengths are rounded up to a multiple of this to bound compilations


class Generated(NamedTuple):
    tokens: np.ndarray  # (batch, max_new_tokens) new tokens; pad after a row's EOS
    lengths: np.ndarray  # (batch,) tokens generated per row, EOS included


def sample_logits(logits: jax.Array, rng: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """One token per row. temperature <= 0 is greedy; top_k = 0 and top_p = 1 disable those filters."""
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    ordered = -jnp.sort(-scaled, axis=-1)  # descending
    kth = jnp.take(ordered, jnp.clip(top_k - 1, 0, vocab - 1), axis=-1)[:, None]
    drop_k = (top_k > 0) & (ordered < kth)
    ordered = jnp.where(drop_k, -jnp.inf, ordered)
    probs = jax.nn.softmax(ordered, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    filtered = jnp.where(scaled < cutoff, -jnp.inf, scaled)
    sampled = jax.random.categorical(rng, filtered, axis=-1)
    return jnp.where(temperature <= 0, greedy, sampled).astype(jnp.int32)


@nnx.jit(static_argnames=("max_new_tokens", "eos_id", "pad_id"))
def _decode(model: GPT2, ids, mask, rng, temperature, top_k, top_p, *, max_new_tokens, eos_id, pad_id):
    B, P = ids.shape
    cache = model.init_cache(B, P + max_new_tokens)
    full_mask = jnp.concatenate([mask, jnp.zeros((B, max_new_tokens), mask.dtype)], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    out = model(ids, full_mask, positions, cache=cache, cache_index=0)
    last_pos = positions[:, -1]

    def cond(carry):
        i, _, _, _, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, logits, cache, full_mask, done, tokens, rng = carry
        rng, step_rng = jax.random.split(rng)
        tok = sample_logits(logits, step_rng, temperature, top_k, top_p)
        tok = jnp.where(done, pad_id, tok)
        tokens = tokens.at[:, i].set(tok)
        done = done | (tok == eos_id)
        full_mask = full_mask.at[:, P + i].set(1)
        out = model(tok[:, None], full_mask, (last_pos + 1 + i)[:, None], cache=cache, cache_index=P + i)
        return i + 1, out.logits[:, -1], out.cache, full_mask, done, tokens, rng

    tokens = jnp.full((B, max_new_tokens), pad_id, jnp.int32)
    done = jnp.zeros((B,), bool)
    carry = (jnp.int32(0), out.logits[:, -1], out.cache, full_mask, done, tokens, rng)
    _, _, _, _, _, tokens, _ = jax.lax.while_loop(cond, body, carry)
    return tokens


def generate(
    model: GPT2,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
    pad_id: int | None = None,
) -> Generated:
    """Continues each token-id prompt; greedy when temperature is 0."""
    cfg = model.cfg
    eos_id = cfg.eos_token_id if eos_id is None else eos_id
    pad_id = eos_id if pad_id is None else pad_id
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("generate: every prompt needs at least one token")
    if max_new_tokens <= 0:
        raise ConfigError(f"generate: max_new_tokens must be positive, got {max_new_tokens}")
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ConfigError(f"generate: need temperature >= 0, top_k >= 0, 0 < top_p <= 1 "
                          f"(got {temperature}, {top_k}, {top_p})")
    longest = max(len(p) for p in prompts)
    length = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
    if longest + max_new_tokens > cfg.n_positions:
        raise ConfigError(f"generate: prompt length {longest} + max_new_tokens {max_new_tokens} exceeds the "
                          f"model's {cfg.n_positions} positions")
    length = min(length, cfg.n_positions - max_new_tokens)
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, p in enumerate(prompts):
        ids[row, length - len(p):] = p
        mask[row, length - len(p):] = 1
    tokens = np.asarray(_decode(model, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(seed),
                                jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
                                max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id))
    is_eos = tokens == eos_id
    lengths = np.where(is_eos.any(1), is_eos.argmax(1) + 1, max_new_tokens)
    return Generated(tokens, lengths)


def generate_text(model: GPT2, tokenizer, prompts: Sequence[str], max_new_tokens: int, **kwargs) -> list[str]:
    """Decoded continuations (EOS and what follows it removed)."""
    out = generate(model, [tokenizer.encode(p) for p in prompts], max_new_tokens,
                   eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, **kwargs)
    return [tokenizer.decode(t[:n]) for t, n in zip(out.tokens, out.lengths)]
