"""Response log-probs straight from final hidden states, never holding the (batch, length, vocab) logits.

Preference and SFT losses need only log pi(token) at response positions. Forming
the full float32 logits costs B x L x V floats (3.3 GB for 8 sequences of 256
tokens at GPT-2's 50,304 rows) plus as much again for their gradient, and half
of those positions are prompt or padding that no loss reads.

`response_logprobs` therefore:

1. moves each row's scored positions to its front (a stable per-row sort, so a
   batch split over devices by rows stays local), so that the scored tokens fill
   the first ceil(max_count / chunk) chunks of positions;
2. runs only those chunks, one (B, chunk, V) block at a time: log-softmax of the
   target = h . w_target - logsumexp(h W^T), saving only the logsumexp;
3. has its own backward (`jax.custom_vjp`), which recomputes each chunk's logits
   and forms the gradient (onehot - softmax) * g chunk by chunk: dh = dlogits W and
   dW += dlogits^T h, the table's gradient accumulated in float32.

Memory: one chunk's logits instead of the whole batch's. Compute: the head's
matmuls run on the scored positions only (plus one recompute of those in the
backward), where the full path runs them on every position. The loops have a
data-dependent trip count, so a batch of short responses costs less.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cvxdpo import mesh as mesh_lib


def shift_left(x_BxL):
    """Position t - 1 scores token t: targets and weights move one step left, the last position scores nothing."""
    return jnp.concatenate([x_BxL[:, 1:], jnp.zeros_like(x_BxL[:, :1])], axis=1)


def _chunk_logits(h_BxCxE, table_VxE, vocab_size):
    """Float32 logits of one chunk; rows past `vocab_size` (padding of the table) never win a softmax."""
    logits_BxCxV = jnp.einsum("bce,ve->bcv", h_BxCxE, table_VxE, preferred_element_type=jnp.float32)
    logits_BxCxV = mesh_lib.constrain(logits_BxCxV, ("batch", "length", "vocab"))
    if table_VxE.shape[0] > vocab_size:
        valid_V = jnp.arange(table_VxE.shape[0]) < vocab_size
        logits_BxCxV = jnp.where(valid_V, logits_BxCxV, -jnp.inf)
    return logits_BxCxV


def _picked(h_BxCxE, table_VxE, t_BxC):
    """The target's logit, h . w_target, from the gathered table rows (no gather from the sharded logits)."""
    return jnp.einsum("bce,bce->bc", h_BxCxE, table_VxE[t_BxC], preferred_element_type=jnp.float32)


def _slice(x, c, chunk):
    """Positions [c * chunk, (c + 1) * chunk) of every row, kept split over the batch like the whole array."""
    part = jax.lax.dynamic_slice_in_dim(x, c * chunk, chunk, axis=1)
    return mesh_lib.constrain(part, ("batch", "length") + (None,) * (x.ndim - 2))


def _forward(chunk, vocab_size, h_BxLxE, table_VxE, t_BxL, num_chunks):
    def body(c, acc):
        lse_BxL, logp_BxL = acc
        h_c, t_c = _slice(h_BxLxE, c, chunk), _slice(t_BxL, c, chunk)
        lse_c = jax.nn.logsumexp(_chunk_logits(h_c, table_VxE, vocab_size), axis=-1)
        lse_BxL = jax.lax.dynamic_update_slice_in_dim(lse_BxL, lse_c, c * chunk, axis=1)
        logp_BxL = jax.lax.dynamic_update_slice_in_dim(logp_BxL, _picked(h_c, table_VxE, t_c) - lse_c, c * chunk, 1)
        return lse_BxL, logp_BxL

    zeros = jnp.zeros(t_BxL.shape, jnp.float32)
    return jax.lax.fori_loop(0, num_chunks, body, (zeros, zeros))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _token_logprobs(chunk, vocab_size, h_BxLxE, table_VxE, t_BxL, num_chunks):
    """log softmax(h W^T)[target] at every position of the first `num_chunks` chunks (0 elsewhere)."""
    return _forward(chunk, vocab_size, h_BxLxE, table_VxE, t_BxL, num_chunks)[1]


def _token_logprobs_fwd(chunk, vocab_size, h_BxLxE, table_VxE, t_BxL, num_chunks):
    lse_BxL, logp_BxL = _forward(chunk, vocab_size, h_BxLxE, table_VxE, t_BxL, num_chunks)
    return logp_BxL, (h_BxLxE, table_VxE, t_BxL, num_chunks, lse_BxL)


def _token_logprobs_bwd(chunk, vocab_size, residuals, g_BxL):
    h_BxLxE, table_VxE, t_BxL, num_chunks, lse_BxL = residuals
    dt = h_BxLxE.dtype

    def body(c, acc):
        dh_BxLxE, dtable_VxE = acc
        h_c, t_c, g_c = _slice(h_BxLxE, c, chunk), _slice(t_BxL, c, chunk), _slice(g_BxL, c, chunk)
        probs_BxCxV = jnp.exp(_chunk_logits(h_c, table_VxE, vocab_size) - _slice(lse_BxL, c, chunk)[..., None])
        # d logp / d logits = onehot(target) - softmax; the onehot part is a row gather / scatter of the table.
        weighted_BxCxV = (probs_BxCxV * g_c[..., None]).astype(dt)
        dh_c = (g_c[..., None] * table_VxE[t_c].astype(jnp.float32)
                - jnp.einsum("bcv,ve->bce", weighted_BxCxV, table_VxE, preferred_element_type=jnp.float32))
        dtable_VxE = dtable_VxE - jnp.einsum("bcv,bce->ve", weighted_BxCxV, h_c, preferred_element_type=jnp.float32)
        dtable_VxE = dtable_VxE.at[t_c].add(g_c[..., None] * h_c.astype(jnp.float32))
        dh_c = mesh_lib.constrain(dh_c.astype(dt), ("batch", "length", None))
        dh_BxLxE = jax.lax.dynamic_update_slice_in_dim(dh_BxLxE, dh_c, c * chunk, axis=1)
        return dh_BxLxE, mesh_lib.constrain(dtable_VxE, ("vocab", "embed"))

    init = (jnp.zeros_like(h_BxLxE), mesh_lib.constrain(jnp.zeros(table_VxE.shape, jnp.float32), ("vocab", "embed")))
    dh_BxLxE, dtable_VxE = jax.lax.fori_loop(0, num_chunks, body, init)
    return dh_BxLxE, dtable_VxE.astype(table_VxE.dtype), None, None


_token_logprobs.defvjp(_token_logprobs_fwd, _token_logprobs_bwd)


def response_logprobs(hidden_BxLxE: jax.Array, table_VxE: jax.Array, tokens_BxL: jax.Array, loss_mask_BxL: jax.Array,
                      vocab_size: int, chunk: int = 64) -> tuple[jax.Array, jax.Array]:
    """Per-sequence summed log-probs of the tokens selected by `loss_mask` (scored by the position before each),
    and their counts: `gpt2.sequence_logprobs` of the model's logits, without forming them.

    `table_VxE` is the output embedding (GPT-2's tied `wte`, in the compute dtype); rows from `vocab_size` on
    are padding. `chunk` positions of every row are scored at a time.
    """
    B, L, _ = hidden_BxLxE.shape
    weights_BxL = shift_left(loss_mask_BxL).astype(jnp.float32)
    order_BxL = jnp.argsort(weights_BxL == 0, axis=1, stable=True)  # scored positions first, in order
    weights_BxL = jnp.take_along_axis(weights_BxL, order_BxL, axis=1)
    targets_BxL = jnp.take_along_axis(shift_left(tokens_BxL), order_BxL, axis=1)
    h_BxLxE = jnp.take_along_axis(hidden_BxLxE, order_BxL[..., None], axis=1)
    pad = -L % chunk
    if pad:
        h_BxLxE = jnp.pad(h_BxLxE, ((0, 0), (0, pad), (0, 0)))
        targets_BxL = jnp.pad(targets_BxL, ((0, 0), (0, pad)))
        weights_BxL = jnp.pad(weights_BxL, ((0, 0), (0, pad)))
    counts_B = weights_BxL.sum(-1)
    num_chunks = (jnp.max(counts_B).astype(jnp.int32) + chunk - 1) // chunk
    logp_BxL = _token_logprobs(chunk, vocab_size, h_BxLxE, table_VxE, targets_BxL, num_chunks)
    return (logp_BxL * weights_BxL).sum(-1), counts_B
