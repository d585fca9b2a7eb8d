"""Chunked response log-probs (cvxdpo.model.logprobs) against the full-logits path: values, gradients, meshes, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cvxdpo import mesh as mesh_lib
from cvxdpo.model import gpt2

# vocab 300 pads to 384 rows, so the padded rows' masking is exercised; length 21 is not a multiple of the chunks.
CFG = gpt2.GPT2Config(vocab_size=300, n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_multiple=128)


def _batch(seed=0, B=4, L=21):
    """Right-padded rows with prompts of different lengths; one row has no response token at all."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CFG.vocab_size, size=(B, L)).astype(np.int32)
    lengths, prompts = [21, 15, 9, 6], [3, 7, 2, 6]
    mask = (np.arange(L)[None] < np.array(lengths)[:, None]).astype(np.int32)
    loss_mask = mask * (np.arange(L)[None] >= np.array(prompts)[:, None])
    return jnp.asarray(ids * mask), jnp.asarray(mask), jnp.asarray(loss_mask.astype(np.int32))


def _value_and_grad(model, chunk, batch, g_B):
    """Summed log-probs, counts and the gradient of sum(g * logps) with `model`'s weights scored by `chunk`."""
    copy = nnx.merge(*nnx.split(model))
    copy.cfg = model.cfg.replace(logprob_chunk=chunk)
    graphdef, params = nnx.split(copy)

    def f(params):
        logps_B, counts_B, _ = nnx.merge(graphdef, params).response_logprobs(*batch)
        return (logps_B * g_B).sum(), (logps_B, counts_B)

    (_, (logps, counts)), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    return logps, counts, grads


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_chunked_logprobs_and_gradients_equal_the_full_logits(mesh1, chunk):
    model = gpt2.create(CFG, seed=1, mesh=mesh1)
    batch = _batch()
    g_B = jnp.asarray([0.7, -1.3, 2.0, 0.5])
    full = _value_and_grad(model, 0, batch, g_B)
    chunked = _value_and_grad(model, chunk, batch, g_B)
    np.testing.assert_allclose(np.asarray(chunked[0]), np.asarray(full[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(chunked[1]), np.asarray(full[1]))
    assert float(full[1][3]) == 0 and float(chunked[0][3]) == 0  # the empty response scores 0
    for (path, a), b in zip(jax.tree.leaves_with_path(full[2]), jax.tree.leaves(chunked[2])):
        scale = float(jnp.abs(a).max()) + 1e-6
        assert float(jnp.abs(a - b).max()) <= 2e-5 * scale, jax.tree_util.keystr(path)


def test_chunked_logprobs_equal_across_meshes(mesh1):
    """Vocabulary split over the tensor axis and embedding over fsdp give the one-device values and gradients."""
    batch, g_B = _batch(seed=3), jnp.asarray([1.0, -0.5, 0.25, 2.0])
    one = _value_and_grad(gpt2.create(CFG, seed=2, mesh=mesh1), 4, batch, g_B)
    mesh = mesh_lib.make_mesh("2,2,2")
    model = gpt2.create(CFG, seed=2, mesh=mesh)
    placed = mesh_lib.place_batch(dict(zip(("input_ids", "attention_mask", "loss_mask"), batch)), mesh)
    with mesh_lib.use_mesh(mesh):
        many = _value_and_grad(model, 4, (placed["input_ids"], placed["attention_mask"], placed["loss_mask"]), g_B)
    np.testing.assert_allclose(np.asarray(many[0]), np.asarray(one[0]), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(one[2]), jax.tree.leaves(many[2])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_chunked_gradient_never_holds_the_logits(mesh1):
    """XLA's own accounting of the compiled gradient: the full path's temporaries exceed the (B, L, V) float32
    logits (three times over); the chunked path's stay below half of them."""
    cfg = CFG.replace(vocab_size=8000, n_layer=1)
    B, L = 8, 128
    ids = jnp.zeros((B, L), jnp.int32)
    mask = jnp.ones((B, L), jnp.int32)
    loss_mask = mask.at[:, : L // 2].set(0)
    logits_bytes = B * L * cfg.padded_vocab_size * 4

    def temp_bytes(chunk):
        graphdef, params = nnx.split(gpt2.create(cfg.replace(logprob_chunk=chunk), mesh=mesh1))

        def f(params):
            return nnx.merge(graphdef, params).response_logprobs(ids, mask, loss_mask)[0].sum()

        return jax.jit(jax.grad(f)).lower(params).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(0) > logits_bytes
    assert temp_bytes(4) < logits_bytes / 2
