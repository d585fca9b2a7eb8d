"""GPT-2 in Flax NNX, numerically the model Hugging Face ships.

One table, `PARAMS`, lists every parameter: its shape, logical axes,
initializer and Hugging Face tensor name. The model's parameters, the scan over
blocks, `check_fits_mesh` and cvxdpo.model.hub's file mapping are all read off
it. Layer parameters are stacked on a leading layer axis and the blocks run
under `jax.lax.scan`, so a 24-layer model compiles as fast as a 2-layer one and
rematerialization is one flag. Logical axis names map to the mesh through
cvxdpo.mesh.LOGICAL_RULES, and the vocabulary is padded to a multiple of
`vocab_multiple` so that it divides over the tensor axis; the padded logits are
pinned to the dtype's minimum and never win a softmax.

Arrays that are reshaped or sharded carry their shape in their name
(`x_BxLxE`): B batch, L length, S attended length (the cache's, or L), and the
letters of `DIMS` below.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from cvxdpo import mesh as mesh_lib
from cvxdpo.errors import ConfigError
from cvxdpo.model import logprobs


REMAT_POLICIES = {"dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                  "nothing": jax.checkpoint_policies.nothing_saveable}


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
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    vocab_multiple: int = 128  # pad the embedding rows to a multiple of this (50257 -> 50304)
    dtype: str = "float32"  # compute dtype: float32 on CPU, bfloat16 on accelerators
    param_dtype: str = "float32"
    remat: bool = False  # recompute each block's activations in the backward pass, as `remat_policy` says
    # What remat keeps: "dots" the matmul outputs (recomputing layer norms, GELU, softmax: measured on
    # distilgpt2 DPO, 256 tokens x 4 pairs on a CPU, -37% peak memory, step time within the noise), "nothing"
    # (every block's activations recomputed: -44% memory for +7% time). See docs/benchmarks.md.
    remat_policy: str = "dots"
    # Response log-probs for the losses: positions scored per chunk from the hidden states without forming the
    # (batch, length, vocab) logits (cvxdpo.model.logprobs); 0 scores from the full logits instead.
    logprob_chunk: int = 32

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "vocab_multiple"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"GPT2Config.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"GPT2Config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"GPT2Config.remat_policy={self.remat_policy!r} is not one of "
                              f"{', '.join(REMAT_POLICIES)}")
        if self.logprob_chunk < 0:
            raise ConfigError(f"GPT2Config.logprob_chunk must be >= 0, got {self.logprob_chunk}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16", "float64"):
                raise ConfigError(f"GPT2Config.{name}={getattr(self, name)!r} is not a float dtype name")

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
        """Parameters of the unpadded model (embedding counted once, as it is tied): a hub file's count."""
        return sum(math.prod(p.hf_shape(self)) * (self.n_layer if p.per_layer else 1) for p in PARAMS)

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
    """A GPT2Config from a preset name; keyword overrides win (e.g. vocab_size for a trained BPE), except
    None, which keeps the preset's value (an unset field of the config's `model.overrides`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return GPT2Config(**{**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}})


class GPT2Output(NamedTuple):
    logits: jax.Array  # (batch, length, padded_vocab); padded entries hold the dtype's minimum
    hidden: jax.Array  # (batch, length, n_embd), the final hidden states after ln_f
    cache: dict | None  # updated KV cache when one was passed in


# The letters that spell parameter shapes in PARAMS (and end array names): what each one counts.
DIMS: dict[str, tuple[str, Callable[[GPT2Config], int]]] = {
    "N": ("n_layer", lambda c: c.n_layer),
    "V": ("padded vocabulary", lambda c: c.padded_vocab_size),  # hub files hold c.vocab_size rows
    "P": ("n_positions", lambda c: c.n_positions),
    "E": ("n_embd", lambda c: c.n_embd),
    "H": ("n_head", lambda c: c.n_head),
    "D": ("head_dim", lambda c: c.head_dim),
    "M": ("MLP width", lambda c: c.d_mlp),
    "3": ("q, k, v", lambda c: 3),
}


class ParamSpec(NamedTuple):
    """One parameter of the model, and where it lives in a Hugging Face GPT-2 file."""

    name: str  # attribute of GPT2, or of GPT2.blocks for a per-layer parameter
    dims: str  # shape in DIMS letters; a Hugging Face file flattens each (group) into one dimension
    logical: tuple[str | None, ...]  # one logical axis per letter (cvxdpo.mesh.LOGICAL_RULES)
    init: str  # a key of _initializers
    hf_name: str  # hub tensor name without the "transformer." prefix; {i} is the layer

    @property
    def per_layer(self) -> bool:
        """Stacked on a leading "layers" axis; the hub stores one tensor per layer."""
        return self.logical[0] == "layers"

    @property
    def path(self) -> tuple[str, ...]:
        """Where the parameter sits in the model's nnx state."""
        return ("blocks", self.name) if self.per_layer else (self.name,)

    @property
    def groups(self) -> list[list[str]]:
        """The letters in their groups: "N (H D) E" -> [["N"], ["H", "D"], ["E"]]."""
        return [(group or letter).split() for group, letter in re.findall(r"\(([^()]*)\)|([^\s()]+)", self.dims)]

    @property
    def letters(self) -> list[str]:
        return [letter for group in self.groups for letter in group]

    def shape(self, cfg: GPT2Config) -> tuple[int, ...]:
        return tuple(DIMS[letter][1](cfg) for letter in self.letters)

    def hf_shape(self, cfg: GPT2Config, flat: bool = True) -> tuple[int, ...]:
        """One layer's tensor in a hub file (Conv1D weights are [in, out]; the vocabulary is unpadded).

        With flat=False each group stays split into its letters: the shape to
        reshape a hub tensor to before padding it into ours.
        """
        def size(letter):
            return cfg.vocab_size if letter == "V" else DIMS[letter][1](cfg)

        groups = [[size(letter) for letter in group] for group in self.groups if group != ["N"]]
        return tuple(math.prod(g) for g in groups) if flat else tuple(n for g in groups for n in g)

    def create(self, cfg: GPT2Config, rngs: nnx.Rngs) -> nnx.Param:
        init = nnx.with_partitioning(_initializers(cfg)[self.init], self.logical)
        return nnx.Param(init(rngs.params(), self.shape(cfg), jnp.dtype(cfg.param_dtype)))


def _initializers(cfg: GPT2Config) -> dict:
    return {
        "ones": nnx.initializers.ones,
        "zeros": nnx.initializers.zeros,
        "normal": nnx.initializers.normal(0.02),
        "small": nnx.initializers.normal(0.01),  # positions
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer).
        "proj": nnx.initializers.normal(0.02 / math.sqrt(2 * cfg.n_layer)),
    }


# Every parameter, in creation order (which fixes the random init). wte is also the output layer (tied).
PARAMS = tuple(ParamSpec(*row) for row in (
    # name               dims           logical axes                              init      hub tensor
    ("wte",             "V E",         ("vocab", "embed"),                       "normal", "wte.weight"),
    ("wpe",             "P E",         (None, "embed"),                          "small",  "wpe.weight"),
    ("ln_1_scale",      "N E",         ("layers", None),                         "ones",   "h.{i}.ln_1.weight"),
    ("ln_1_bias",       "N E",         ("layers", None),                         "zeros",  "h.{i}.ln_1.bias"),
    ("qkv_kernel",      "N E (3 H D)", ("layers", "embed", None, "heads", "kv"), "normal", "h.{i}.attn.c_attn.weight"),
    ("qkv_bias",        "N (3 H D)",   ("layers", None, "heads", "kv"),          "zeros",  "h.{i}.attn.c_attn.bias"),
    ("attn_out_kernel", "N (H D) E",   ("layers", "heads", "kv", "embed"),       "proj",   "h.{i}.attn.c_proj.weight"),
    ("attn_out_bias",   "N E",         ("layers", None),                         "zeros",  "h.{i}.attn.c_proj.bias"),
    ("ln_2_scale",      "N E",         ("layers", None),                         "ones",   "h.{i}.ln_2.weight"),
    ("ln_2_bias",       "N E",         ("layers", None),                         "zeros",  "h.{i}.ln_2.bias"),
    ("fc_kernel",       "N E M",       ("layers", "embed", "mlp"),               "normal", "h.{i}.mlp.c_fc.weight"),
    ("fc_bias",         "N M",         ("layers", "mlp"),                        "zeros",  "h.{i}.mlp.c_fc.bias"),
    ("mlp_out_kernel",  "N M E",       ("layers", "mlp", "embed"),               "proj",   "h.{i}.mlp.c_proj.weight"),
    ("mlp_out_bias",    "N E",         ("layers", None),                         "zeros",  "h.{i}.mlp.c_proj.bias"),
    ("ln_f_scale",      "E",           (None,),                                  "ones",   "ln_f.weight"),
    ("ln_f_bias",       "E",           (None,),                                  "zeros",  "ln_f.bias"),
))
_BY_NAME = {p.name: p for p in PARAMS}


def _layer_norm(x, scale, bias, eps):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def _gathered(value: jax.Array, logical) -> jax.Array:
    """FSDP: a parameter is stored split over "embed" and used whole (all-gathered just in time)."""
    return mesh_lib.constrain(value, tuple(None if a == "embed" else a for a in logical))


def _attention(p: dict, h_BxLxE, mask_Bx1xLxS, layer_cache, cache_index):
    """Causal self-attention; with a cache, this step's keys and values are written at `cache_index`."""
    dt = h_BxLxE.dtype
    qkv_BxLx3xHxD = jnp.einsum("ble,ezhd->blzhd", h_BxLxE, p["qkv_kernel"].astype(dt)) + p["qkv_bias"].astype(dt)
    q_BxLxHxD, k_BxLxHxD, v_BxLxHxD = (qkv_BxLx3xHxD[:, :, i] for i in range(3))
    k_BxSxHxD, v_BxSxHxD = k_BxLxHxD, v_BxLxHxD  # without a cache, S = L
    if layer_cache is not None:
        def write(cached, new):
            return jax.lax.dynamic_update_slice_in_dim(cached, new.astype(cached.dtype), cache_index, 1)

        k_BxSxHxD, v_BxSxHxD = write(layer_cache["k"], k_BxLxHxD), write(layer_cache["v"], v_BxLxHxD)
        layer_cache = {"k": k_BxSxHxD, "v": v_BxSxHxD}
    out_BxLxHxD = jax.nn.dot_product_attention(q_BxLxHxD, k_BxSxHxD.astype(dt), v_BxSxHxD.astype(dt),
                                               mask=mask_Bx1xLxS)
    out_BxLxE = jnp.einsum("blhd,hde->ble", out_BxLxHxD, p["attn_out_kernel"].astype(dt))
    return out_BxLxE + p["attn_out_bias"].astype(dt), layer_cache


def _mlp(p: dict, h_BxLxE):
    dt = h_BxLxE.dtype
    h_BxLxM = jnp.einsum("ble,em->blm", h_BxLxE, p["fc_kernel"].astype(dt)) + p["fc_bias"].astype(dt)
    h_BxLxM = jax.nn.gelu(h_BxLxM, approximate=True)  # GPT-2's "gelu_new" (tanh form)
    return jnp.einsum("blm,me->ble", h_BxLxM, p["mlp_out_kernel"].astype(dt)) + p["mlp_out_bias"].astype(dt)


def _block(cfg: GPT2Config, p: dict, x_BxLxE, mask_Bx1xLxS, layer_cache, cache_index):
    """One pre-LayerNorm block. `p` holds this layer's parameters (layer axis removed)."""
    h_BxLxE = _layer_norm(x_BxLxE, p["ln_1_scale"], p["ln_1_bias"], cfg.layer_norm_epsilon)
    out_BxLxE, layer_cache = _attention(p, h_BxLxE, mask_Bx1xLxS, layer_cache, cache_index)
    x_BxLxE = x_BxLxE + out_BxLxE
    h_BxLxE = _layer_norm(x_BxLxE, p["ln_2_scale"], p["ln_2_bias"], cfg.layer_norm_epsilon)
    return x_BxLxE + _mlp(p, h_BxLxE), layer_cache


class Blocks(nnx.Module):
    """All transformer blocks: the per-layer PARAMS, each stacked on a leading layer axis."""


BLOCK_PARAMS = tuple(p for p in PARAMS if p.per_layer)  # a view of PARAMS, for the scan


class GPT2(nnx.Module):
    """GPT-2 language model with tied input/output embedding.

    Build it with `create` (sharded on a mesh) or `hub.load_pretrained`. Call it
    with token ids and an attention mask (1 = real token).
    """

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.blocks = Blocks()
        for p in PARAMS:
            setattr(self.blocks if p.per_layer else self, p.name, p.create(cfg, rngs))

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        *,
        cache: dict | None = None,
        cache_index: jax.Array | int = 0,
        logits: bool = True,
    ) -> GPT2Output:
        """Logits and final hidden states for `input_ids` (batch, length).

        Without a cache, `attention_mask` is (batch, length) and positions default
        to the running count of real tokens, so left- and right-padded batches
        both get GPT-2's positions. With a cache (see `init_cache`), the new
        tokens are written at `cache_index`, `attention_mask` covers the whole
        cache (batch, cache_length), and the caller passes `positions`.
        `logits=False` returns the hidden states only (logits None), for `response_logprobs`.
        """
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        B, L = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((B, L if cache is None else cache["k"].shape[2]), jnp.int32)
        keys_BxS = attention_mask.astype(bool)
        if positions is None:
            if cache is not None:
                raise ConfigError("GPT2: positions must be given when decoding with a cache")
            positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
        S = keys_BxS.shape[1]
        query_pos_L = jnp.asarray(cache_index) + jnp.arange(L) if cache is not None else jnp.arange(L)
        causal_LxS = query_pos_L[:, None] >= jnp.arange(S)[None, :]
        mask_Bx1xLxS = causal_LxS[None, None] & keys_BxS[:, None, None, :]

        wte_VxE = _gathered(self.wte[...], _BY_NAME["wte"].logical)
        # The lookup reads a whole copy of the table (a gather from a vocab-split table makes XLA
        # replicate its output anyway); the output projection below keeps the vocab split.
        table_VxE = mesh_lib.constrain(wte_VxE, (None, None)).astype(dt)
        wpe_PxE = _gathered(self.wpe[...], _BY_NAME["wpe"].logical).astype(dt)
        x_BxLxE = (table_VxE[input_ids] + wpe_PxE[positions]).astype(dt)
        x_BxLxE = mesh_lib.constrain(x_BxLxE, ("batch", "length", None))

        def body(x_BxLxE, scanned):
            stacked, layer_cache = scanned
            p = {s.name: _gathered(stacked[s.name], s.logical[1:]) for s in BLOCK_PARAMS}
            x_BxLxE, layer_cache = _block(cfg, p, x_BxLxE, mask_Bx1xLxS, layer_cache, cache_index)
            return mesh_lib.constrain(x_BxLxE, ("batch", "length", None)), layer_cache

        if cfg.remat:
            body = jax.checkpoint(body, prevent_cse=False, policy=REMAT_POLICIES[cfg.remat_policy])
        stacked = {s.name: getattr(self.blocks, s.name)[...] for s in BLOCK_PARAMS}
        x_BxLxE, new_cache = jax.lax.scan(body, x_BxLxE, (stacked, cache))

        hidden_BxLxE = _layer_norm(x_BxLxE, self.ln_f_scale[...], self.ln_f_bias[...], cfg.layer_norm_epsilon)
        if not logits:
            return GPT2Output(None, hidden_BxLxE, new_cache)
        logits_BxLxV = jnp.einsum("ble,ve->blv", hidden_BxLxE, wte_VxE.astype(dt))
        valid_V = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
        logits_BxLxV = jnp.where(valid_V, logits_BxLxV, jnp.finfo(logits_BxLxV.dtype).min)
        return GPT2Output(mesh_lib.constrain(logits_BxLxV, ("batch", "length", "vocab")), hidden_BxLxE, new_cache)

    def response_logprobs(self, input_ids: jax.Array, attention_mask: jax.Array,
                          loss_mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Summed log-probs of the response tokens (`loss_mask` = 1) per sequence, their counts and the final
        hidden states: by chunks of `cfg.logprob_chunk` positions without the full logits
        (`cvxdpo.model.logprobs`), or from the logits when it is 0."""
        cfg = self.cfg
        if not cfg.logprob_chunk:
            out = self(input_ids, attention_mask)
            return (*sequence_logprobs(out.logits, input_ids, loss_mask), out.hidden)
        hidden_BxLxE = self(input_ids, attention_mask, logits=False).hidden
        table_VxE = _gathered(self.wte[...], _BY_NAME["wte"].logical).astype(cfg.dtype)
        logps_B, counts_B = logprobs.response_logprobs(hidden_BxLxE, table_VxE, input_ids, loss_mask,
                                                       cfg.vocab_size, cfg.logprob_chunk)
        return logps_B, counts_B, hidden_BxLxE

    def init_cache(self, batch: int, length: int, dtype=None) -> dict:
        """An empty KV cache of `length` slots for `batch` sequences."""
        cfg = self.cfg
        shape_NxBxSxHxD = (cfg.n_layer, batch, length, cfg.n_head, cfg.head_dim)
        dt = jnp.dtype(dtype or cfg.dtype)
        return {"k": jnp.zeros(shape_NxBxSxHxD, dt), "v": jnp.zeros(shape_NxBxSxHxD, dt)}


def check_fits_mesh(cfg: GPT2Config, mesh: jax.sharding.Mesh) -> None:
    """Every parameter dimension must divide by the mesh axes LOGICAL_RULES split it over; says which one does not."""
    for p in PARAMS:
        for letter, n, logical in zip(p.letters, p.shape(cfg), p.logical):
            axes = [a for a in mesh_lib.mesh_axes(logical) if a in mesh.axis_names]
            size = mesh_lib.axis_size(mesh, *axes)
            if n % size:
                raise ConfigError(f"model {DIMS[letter][0]}={n} is not divisible by the mesh's {' x '.join(axes)} "
                                  f"{'axes' if len(axes) > 1 else 'axis'} of size {size}")


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
    targets_BxL = logprobs.shift_left(tokens)
    weights_BxL = logprobs.shift_left(loss_mask).astype(jnp.float32)
    lse_BxL = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    picked_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0].astype(jnp.float32)
    return ((picked_BxL - lse_BxL) * weights_BxL).sum(-1), weights_BxL.sum(-1)
