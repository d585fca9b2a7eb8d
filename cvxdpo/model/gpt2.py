"""GPT-2 in Flax NNX, numerically the model Hugging Face ships.

Layer parameters are stacked on a leading "layers" axis and the blocks run under
`jax.lax.scan`, so a 24-layer model compiles as fast as a 2-layer one and
rematerialization is one flag. Every parameter carries logical axis names
(cvxdpo.mesh.LOGICAL_RULES maps them to the mesh), and the vocabulary is padded
to a multiple of `vocab_multiple` so that it divides over the tensor axis; the
padded logits are pinned to the dtype's minimum and never win a softmax.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from cvxdpo import mesh as mesh_lib
from cvxdpo.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Shape and numerics of a GPT-2. Field names follow Hugging Face's GPT2Config."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    dropout: float = 0.0  # residual, embedding and attention dropout (GPT-2 trains with 0.1; we fine-tune with 0)
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    vocab_multiple: int = 128  # pad the embedding rows to a multiple of this (50257 -> 50304)
    dtype: str = "float32"  # compute dtype: float32 on CPU, bfloat16 on accelerators
    param_dtype: str = "float32"
    remat: bool = False  # recompute each block's activations in the backward pass

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "vocab_multiple"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"GPT2Config.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"GPT2Config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16", "float64"):
                raise ConfigError(f"GPT2Config.{name}={getattr(self, name)!r} is not a float dtype name")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"GPT2Config.dropout must be in [0, 1), got {self.dropout}")

    @property
    def d_mlp(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return int(math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple)

    def num_params(self) -> int:
        """Parameters of the unpadded model (embedding counted once, as it is tied)."""
        e, m, n = self.n_embd, self.d_mlp, self.n_layer
        block = 4 * e + (e * 3 * e + 3 * e) + (e * e + e) + (e * m + m) + (m * e + e)
        return self.vocab_size * e + self.n_positions * e + n * block + 2 * e

    def replace(self, **changes) -> "GPT2Config":
        return dataclasses.replace(self, **changes)


PRESETS = {
    "distilgpt2": dict(n_layer=6, n_embd=768, n_head=12),
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20),
    # Small shapes for tests and the offline quickstart (trained from scratch).
    "tiny": dict(n_layer=2, n_embd=64, n_head=4, n_positions=128),
    "small": dict(n_layer=4, n_embd=128, n_head=4, n_positions=256),
}


def preset(name: str, **overrides) -> GPT2Config:
    """A GPT2Config from a preset name; keyword overrides win (e.g. vocab_size for a trained BPE)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return GPT2Config(**{**PRESETS[name], **overrides})


class GPT2Output(NamedTuple):
    logits: jax.Array  # (batch, length, padded_vocab); padded entries hold the dtype's minimum
    hidden: jax.Array  # (batch, length, n_embd), the final hidden states after ln_f
    cache: dict | None  # updated KV cache when one was passed in


def _param(rngs: nnx.Rngs, init, shape, logical, dtype):
    return nnx.Param(nnx.with_partitioning(init, logical)(rngs.params(), shape, dtype))


def _layer_norm(x, scale, bias, eps):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def _dropout(x, rate, rng):
    if rate == 0.0 or rng is None:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


# Per-layer parameters of a block: logical axes (after the leading "layers" axis) and initializer kind.
BLOCK_PARAMS = {
    "ln_1_scale": ((None,), "ones"),
    "ln_1_bias": ((None,), "zeros"),
    "qkv_kernel": (("embed", None, "heads", "kv"), "normal"),
    "qkv_bias": ((None, "heads", "kv"), "zeros"),
    "attn_out_kernel": (("heads", "kv", "embed"), "proj"),
    "attn_out_bias": ((None,), "zeros"),
    "ln_2_scale": ((None,), "ones"),
    "ln_2_bias": ((None,), "zeros"),
    "fc_kernel": (("embed", "mlp"), "normal"),
    "fc_bias": (("mlp",), "zeros"),
    "mlp_out_kernel": (("mlp", "embed"), "proj"),
    "mlp_out_bias": ((None,), "zeros"),
}


def _block_shapes(cfg: GPT2Config) -> dict[str, tuple[int, ...]]:
    E, H, D, M = cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.d_mlp
    return {"ln_1_scale": (E,), "ln_1_bias": (E,), "qkv_kernel": (E, 3, H, D), "qkv_bias": (3, H, D),
            "attn_out_kernel": (H, D, E), "attn_out_bias": (E,), "ln_2_scale": (E,), "ln_2_bias": (E,),
            "fc_kernel": (E, M), "fc_bias": (M,), "mlp_out_kernel": (M, E), "mlp_out_bias": (E,)}


def _gathered(value: jax.Array, logical) -> jax.Array:
    """FSDP: a parameter is stored split over "embed" and used whole (all-gathered just in time)."""
    return mesh_lib.constrain(value, tuple(None if a == "embed" else a for a in logical))


class Blocks(nnx.Module):
    """All transformer blocks, parameters stacked on a leading layer axis."""

    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        inits = {
            "ones": nnx.initializers.ones,
            "zeros": nnx.initializers.zeros,
            "normal": nnx.initializers.normal(0.02),
            # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer).
            "proj": nnx.initializers.normal(0.02 / math.sqrt(2 * cfg.n_layer)),
        }
        for name, shape in _block_shapes(cfg).items():
            logical, init = BLOCK_PARAMS[name]
            setattr(self, name, _param(rngs, inits[init], (cfg.n_layer, *shape), ("layers", *logical), pd))


def _block(cfg: GPT2Config, p: dict, x, mask, layer_cache, cache_index, rng):
    """One pre-LayerNorm block. `p` holds this layer's parameters (layer axis removed)."""
    dt = x.dtype
    r_attn, r_res1, r_res2 = (None, None, None) if rng is None else tuple(jax.random.split(rng, 3))

    h = _layer_norm(x, p["ln_1_scale"], p["ln_1_bias"], cfg.layer_norm_epsilon)
    qkv = jnp.einsum("bte,ezhd->btzhd", h, p["qkv_kernel"].astype(dt)) + p["qkv_bias"].astype(dt)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if layer_cache is not None:
        k = jax.lax.dynamic_update_slice_in_dim(layer_cache["k"], k.astype(layer_cache["k"].dtype), cache_index, 1)
        v = jax.lax.dynamic_update_slice_in_dim(layer_cache["v"], v.astype(layer_cache["v"].dtype), cache_index, 1)
        layer_cache = {"k": k, "v": v}
    if cfg.dropout and r_attn is not None:
        # Attention dropout needs the probabilities, so take the explicit path.
        logits = jnp.einsum("bthd,bshd->bhts", q, k.astype(dt)).astype(jnp.float32) / math.sqrt(cfg.head_dim)
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = _dropout(jax.nn.softmax(logits, axis=-1), cfg.dropout, r_attn).astype(dt)
        attn = jnp.einsum("bhts,bshd->bthd", probs, v.astype(dt))
    else:
        attn = jax.nn.dot_product_attention(q, k.astype(dt), v.astype(dt), mask=mask)
    attn = jnp.einsum("bthd,hde->bte", attn, p["attn_out_kernel"].astype(dt)) + p["attn_out_bias"].astype(dt)
    x = x + _dropout(attn, cfg.dropout, r_res1)

    h = _layer_norm(x, p["ln_2_scale"], p["ln_2_bias"], cfg.layer_norm_epsilon)
    h = jnp.einsum("bte,em->btm", h, p["fc_kernel"].astype(dt)) + p["fc_bias"].astype(dt)
    h = jax.nn.gelu(h, approximate=True)  # GPT-2's "gelu_new" (tanh form)
    h = jnp.einsum("btm,me->bte", h, p["mlp_out_kernel"].astype(dt)) + p["mlp_out_bias"].astype(dt)
    x = x + _dropout(h, cfg.dropout, r_res2)
    return x, layer_cache


class GPT2(nnx.Module):
    """GPT-2 language model with tied input/output embedding.

    Build it with `create` (sharded on a mesh) or `hub.load_pretrained`. Call it
    with token ids and an attention mask (1 = real token).
    """

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = jnp.dtype(cfg.param_dtype)
        normal = nnx.initializers.normal(0.02)
        self.wte = _param(rngs, normal, (cfg.padded_vocab_size, cfg.n_embd), ("vocab", "embed"), pd)
        self.wpe = _param(rngs, nnx.initializers.normal(0.01), (cfg.n_positions, cfg.n_embd), (None, "embed"), pd)
        self.blocks = Blocks(cfg, rngs)
        self.ln_f_scale = _param(rngs, nnx.initializers.ones, (cfg.n_embd,), (None,), pd)
        self.ln_f_bias = _param(rngs, nnx.initializers.zeros, (cfg.n_embd,), (None,), pd)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        *,
        cache: dict | None = None,
        cache_index: jax.Array | int = 0,
        dropout_rng: jax.Array | None = None,
    ) -> GPT2Output:
        """Logits and final hidden states for `input_ids` (batch, length).

        Without a cache, `attention_mask` is (batch, length) and positions default
        to the running count of real tokens, so left- and right-padded batches
        both get GPT-2's positions. With a cache (see `init_cache`), the new
        tokens are written at `cache_index`, `attention_mask` covers the whole
        cache (batch, cache_length), and the caller passes `positions`.
        """
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((B, T if cache is None else cache["k"].shape[2]), jnp.int32)
        key_mask = attention_mask.astype(bool)
        if positions is None:
            if cache is not None:
                raise ConfigError("GPT2: positions must be given when decoding with a cache")
            positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
        S = key_mask.shape[1]
        q_pos = jnp.asarray(cache_index) + jnp.arange(T) if cache is not None else jnp.arange(T)
        causal = q_pos[:, None] >= jnp.arange(S)[None, :]
        mask = (causal[None, None] & key_mask[:, None, None, :])  # (B, 1, T, S)

        wte = _gathered(self.wte[...], ("vocab", "embed"))
        # The lookup reads a whole copy of the table (a gather from a vocab-split table makes XLA
        # replicate its output anyway); the output projection below keeps the vocab split.
        table = mesh_lib.constrain(wte, (None, None)).astype(dt)
        x = (table[input_ids] + _gathered(self.wpe[...], (None, "embed")).astype(dt)[positions]).astype(dt)
        rngs = (None,) * 2 if dropout_rng is None else tuple(jax.random.split(dropout_rng, 2))
        x = mesh_lib.constrain(_dropout(x, cfg.dropout, rngs[0]), ("batch", "length", None))

        params = {k: getattr(self.blocks, k)[...] for k in BLOCK_PARAMS}
        layer_rngs = None if rngs[1] is None else jax.random.split(rngs[1], cfg.n_layer)

        def body(carry, scanned):
            p, layer_cache, rng = scanned
            p = {k: _gathered(v, BLOCK_PARAMS[k][0]) for k, v in p.items()}
            y, layer_cache = _block(cfg, p, carry, mask, layer_cache, cache_index, rng)
            return mesh_lib.constrain(y, ("batch", "length", None)), layer_cache

        if cfg.remat:
            body = jax.checkpoint(body, prevent_cse=False)
        x, new_cache = jax.lax.scan(body, x, (params, cache, layer_rngs))

        hidden = _layer_norm(x, self.ln_f_scale[...], self.ln_f_bias[...], cfg.layer_norm_epsilon)
        logits = jnp.einsum("bte,ve->btv", hidden, wte.astype(dt))
        valid = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
        logits = jnp.where(valid, logits, jnp.finfo(logits.dtype).min)
        return GPT2Output(mesh_lib.constrain(logits, ("batch", "length", "vocab")), hidden, new_cache)

    def init_cache(self, batch: int, length: int, dtype=None) -> dict:
        """An empty KV cache of `length` slots for `batch` sequences."""
        cfg = self.cfg
        shape = (cfg.n_layer, batch, length, cfg.n_head, cfg.head_dim)
        dt = jnp.dtype(dtype or cfg.dtype)
        return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)}


def check_fits_mesh(cfg: GPT2Config, mesh: jax.sharding.Mesh) -> None:
    """Every sharded dimension must divide by its mesh axis; says which one does not."""
    tensor, fsdp = mesh.shape["tensor"], mesh.shape["fsdp"]
    for what, n, axis, size in (("n_head", cfg.n_head, "tensor", tensor), ("MLP width", cfg.d_mlp, "tensor", tensor),
                                ("padded vocabulary", cfg.padded_vocab_size, "tensor", tensor),
                                ("n_embd", cfg.n_embd, "fsdp", fsdp)):
        if n % size:
            raise ConfigError(f"model {what}={n} is not divisible by the mesh's {axis} axis of size {size}")


def abstract_model(cfg: GPT2Config, mesh: jax.sharding.Mesh, seed: int = 0):
    """(graphdef, abstract state) whose leaves carry their NamedShardings on `mesh`."""
    check_fits_mesh(cfg, mesh)
    with mesh_lib.use_mesh(mesh):
        return nnx.get_abstract_model(lambda: GPT2(cfg, rngs=nnx.Rngs(params=seed)), mesh)


def create(cfg: GPT2Config, seed: int = 0, mesh: jax.sharding.Mesh | None = None) -> GPT2:
    """A randomly initialized GPT-2 (GPT-2's own init), created already sharded on `mesh`.

    The initializer runs under `jax.jit` with the parameters' shardings as
    out_shardings, so no device ever holds a whole copy of a sharded tensor.
    """
    mesh = mesh or mesh_lib.make_mesh()
    graphdef, abstract = abstract_model(cfg, mesh, seed)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    with mesh_lib.use_mesh(mesh):
        state = jax.jit(lambda: nnx.state(GPT2(cfg, rngs=nnx.Rngs(params=seed))), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def sequence_logprobs(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-sequence summed log-probs of the tokens selected by `loss_mask`, and their counts.

    `loss_mask[b, t] = 1` marks token t as a response token; it is scored by the
    logits at position t - 1. Only the logits array itself is (batch, length,
    vocab): the log-softmax is formed as gathered logit minus logsumexp, both
    (batch, length), computed in float32.
    """
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    weights = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0].astype(jnp.float32)
    return ((picked - lse) * weights).sum(-1), weights.sum(-1)
