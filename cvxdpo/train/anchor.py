"""The convex anchor of DPO-Convex: features, a rolling buffer, and an ADMM refit inside the train step.

Per step the policy's final hidden states are mean-pooled over each response's
tokens (stop-gradient) and mapped to `dim` dimensions by a fixed random
projection. A ring buffer keeps these RAW features of the last `buffer` pairs,
chosen rows labelled +1 and rejected rows -1. Every `refresh_every` steps (once
the buffer is full) a gated convex two-layer ReLU classifier is re-fitted on the
buffer by warm-started ADMM with at most `admm_iters` iterations, inside the
jitted step. The refit standardizes the buffer with the buffer's own mean and
standard deviation, so every row of a fit is on one scale however the policy's
features drifted while the buffer filled; those statistics are kept with the
classifier, so that `margin` at later steps sees features exactly as the fit did.

Its margin m = f(phi(y_w)) - f(phi(y_l)) is the anchor the DPO-Convex losses
use in place of a reference model. The refit also records the root mean square
of m over the buffer's pairs (`margin_scale`): dividing by it
(`signal.scale = "standardized"`) makes m O(1) whatever the features' scale,
so that the loss's `gamma` has one meaning. Everything here is a few small
arrays: no second copy of the policy.

Controls, which decide whether the convex anchor matters (same features,
buffer, refits and budget; each one config option):

- `probe = "linear"`: logistic regression instead of the gated ReLU network.
  It is the same model and solver with one gate vector h = 0, whose mask
  1[x.h >= 0] is 1 on every row, so f(x) = x.w. The group-lasso penalty
  `penalty * sum_i ||w_i||_2` of one group is `penalty * ||w||_2`: an L2
  penalty on the norm itself (not squared), whose solutions are ridge
  logistic regression's regularization path under another parametrization
  (and exactly 0 once `penalty >= ||X^T y|| / 2`). `num_gates` is unused.
- `control = "shuffled"`: the margins of a batch's pairs permuted among those
  pairs, a fresh permutation each step keyed by the train state's seed and
  step (so a resumed run draws the same one): the same values, no per-pair
  information.
- `control = "constant"`: every pair's margin replaced by the batch's mean
  |m|, a positive SimPO-like target of the anchor's size.
- `features = "frozen"`: the same probe on the frozen starting model's hidden
  states instead of the policy's. It needs what DPO's frozen reference needs (a
  parameter copy and one more forward pass per step), so it asks whether the
  anchor works better on features that do not drift with the policy.

Both controls act on m as it enters the loss, after `signal.scale`, so they
have exactly the real anchor's scale; padding pairs (weight 0) neither give
nor receive a margin. With `train.micro_batches > 1` the objective sees one
micro-batch at a time, and the controls act within each micro-batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from cvxdpo.convex import admm
from cvxdpo.convex import gated_relu as gr
from cvxdpo.errors import ConfigError

VARIANCE_FLOOR = 1e-6  # added to a feature's variance: a constant feature standardizes to 0, not to NaN
PROBES = ("convex", "linear")
CONTROLS = ("none", "shuffled", "constant")
FEATURES = ("policy", "frozen")
SHUFFLE_STREAM = 1  # folded into the train state's key, so the shuffle's draws are its own
ROW_AXIS = "data"  # the mesh axis a refit splits the buffer's rows over


@dataclasses.dataclass(frozen=True)
class AnchorConfig:
    dim: int = 32  # feature dimension after the random projection
    buffer: int = 256  # pairs kept for the refit
    refresh_every: int = 10  # steps between refits
    num_gates: int = 16  # gates of the convex probe (the linear probe has one, h = 0)
    reg: float = 0.01  # group-lasso strength per buffer row (see `penalty`)
    loss: str = "logistic"
    admm_iters: int = 100  # ADMM iterations per refit (warm-started)
    probe: str = "convex"  # convex (gated ReLU network) | linear (logistic regression), see the module docstring
    control: str = "none"  # none | shuffled | constant: what replaces m in the loss, see the module docstring
    features: str = "policy"  # policy | frozen: whose hidden states the probe reads, see the module docstring

    def __post_init__(self):
        for name in ("dim", "buffer", "refresh_every", "num_gates", "admm_iters"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"anchor.{name} must be positive, got {getattr(self, name)}")
        if self.reg <= 0:
            raise ConfigError(f"anchor.reg must be positive, got {self.reg}")
        for name, options in (("loss", gr.LOSSES), ("probe", PROBES), ("control", CONTROLS),
                              ("features", FEATURES)):
            if getattr(self, name) not in options:
                raise ConfigError(f"anchor.{name}={getattr(self, name)!r} is not one of {', '.join(options)}")

    @property
    def penalty(self) -> float:
        """The group-lasso weight on the summed loss of the 2 * buffer rows (the solver's `beta`, not DPO's)."""
        return self.reg * 2 * self.buffer

    def admm_config(self) -> admm.ADMMConfig:
        # The buffer is small (2 * buffer x dim x num_gates), so the exact per-gate blocks cost next to
        # nothing, and they are the stronger preconditioner on features no gate cuts in half.
        return admm.ADMMConfig(loss=self.loss, variant="gated", beta=self.penalty, max_iter=self.admm_iters,
                               gap_tol=1e-6, preconditioner="jacobi")


@struct.dataclass
class AnchorState:
    projection: jax.Array  # (E, dim) fixed
    buffer: jax.Array  # (2 * buffer, dim) raw projected features, rows [c_0, r_0, c_1, r_1, ...]
    pairs_seen: jax.Array  # () pairs written into the buffer so far
    gates: jax.Array  # (dim, num_gates) fixed; (dim, 1) zeros for the linear probe
    admm: admm.ADMMState
    center: jax.Array  # (dim,) the buffer's feature mean at the last refit
    spread: jax.Array  # (dim,) the buffer's feature standard deviation at the last refit
    margin_scale: jax.Array  # () root mean square of the classifier's margins over the buffer at the last refit
    fit: dict  # the last refit's diagnostics


FIT_KEYS = ("objective", "accuracy", "primal_residual", "dual_residual", "duality_gap", "iterations")


def _gates(cfg: AnchorConfig, seed: int, dtype) -> jax.Array:
    """The probe's gate vectors as columns: random for the convex network; for the linear probe one zero
    vector, whose mask 1[x.0 >= 0] is 1 on every row, so the same solver fits f(x) = x.w."""
    if cfg.probe == "linear":
        return jnp.zeros((cfg.dim, 1), dtype)
    return gr.sample_gates(seed, cfg.dim, cfg.num_gates, dtype)


def init(cfg: AnchorConfig, n_embd: int, seed: int) -> AnchorState:
    """A fresh anchor: the projection from `seed`, the gates from `seed + 1`, an empty buffer.

    Until the first refit the classifier's weights are 0, so m = 0 whatever the (identity) standardization.
    """
    key = jax.random.key(seed)
    f32 = jnp.float32
    projection = jax.random.normal(key, (n_embd, cfg.dim), f32) / jnp.sqrt(n_embd)
    rows = 2 * cfg.buffer
    gates = _gates(cfg, seed + 1, f32)
    return AnchorState(
        projection=projection, buffer=jnp.zeros((rows, cfg.dim), f32), pairs_seen=jnp.zeros((), jnp.int32),
        gates=gates,
        admm=_without_slack(admm.init_state(rows, cfg.dim, gates.shape[1], "gated", cfg.admm_config().rho, f32)),
        center=jnp.zeros((cfg.dim,), f32), spread=jnp.ones((cfg.dim,), f32), margin_scale=jnp.ones((), f32),
        fit={k: jnp.zeros((), f32) for k in FIT_KEYS})


def _without_slack(st: admm.ADMMState) -> admm.ADMMState:
    """The gated model has no cone slack; its empty (n, 0) arrays are dropped so checkpoints can hold the state."""
    return st._replace(s=None, nu=None)


def labels(cfg: AnchorConfig, dtype=jnp.float32) -> jax.Array:
    """+1 for chosen rows, -1 for rejected rows, in the buffer's interleaved order."""
    return jnp.tile(jnp.array([1.0, -1.0], dtype), cfg.buffer)


def pool(hidden_2BxLxE: jax.Array, loss_mask_Bx2xL: jax.Array, projection_ExK: jax.Array) -> jax.Array:
    """Projected mean of the final hidden states over each response's tokens: (B, 2, K), no gradient.

    The hidden rows are in pair order [c_0, r_0, c_1, r_1, ...], as the pair forward pass returns them.
    """
    B, _, L = loss_mask_Bx2xL.shape
    mask_2BxL = loss_mask_Bx2xL.reshape(2 * B, L).astype(jnp.float32)
    pooled_2BxE = (jax.lax.stop_gradient(hidden_2BxLxE).astype(jnp.float32) * mask_2BxL[..., None]).sum(1)
    pooled_2BxE = pooled_2BxE / jnp.maximum(mask_2BxL.sum(1, keepdims=True), 1.0)
    return (pooled_2BxE @ projection_ExK).reshape(B, 2, -1)


def _buffer_statistics(buffer_NxK: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean, standard deviation) of each feature over the buffer's rows: the standardization of one refit."""
    return buffer_NxK.mean(0), jnp.sqrt(buffer_NxK.var(0) + VARIANCE_FLOOR)


def standardize(state: AnchorState, features: jax.Array) -> jax.Array:
    """Raw projected features (..., K) on the scale the current classifier was fitted on."""
    return (features - state.center) / state.spread


def _scores(state: AnchorState, z_NxK: jax.Array) -> jax.Array:
    """The current classifier's output f on standardized rows: (N,)."""
    return gr.forward(z_NxK, gr.masks(z_NxK, state.gates), jnp.ones(state.gates.shape[1], z_NxK.dtype), state.admm.v)


def _chosen_minus_rejected(f_N: jax.Array) -> jax.Array:
    """f(chosen) - f(rejected) of outputs in pair order [c_0, r_0, c_1, r_1, ...]: (N / 2,)."""
    f_Px2 = f_N.reshape(-1, 2)
    return f_Px2[:, 0] - f_Px2[:, 1]


def margin(state: AnchorState, features_Bx2xK: jax.Array) -> jax.Array:
    """m = f(phi(y_w)) - f(phi(y_l)) of the current classifier on raw projected features: (B,), no gradient."""
    z_2BxK = standardize(state, features_Bx2xK).reshape(-1, features_Bx2xK.shape[-1])
    return jax.lax.stop_gradient(_chosen_minus_rejected(_scores(state, z_2BxK)))


def _row_axes(rows: int) -> gr.Axes:
    """Rows over the mesh's data axis when a mesh with several data shards is set (as the train step is
    traced) and they divide the buffer's rows; otherwise no sharding: every device refits the whole buffer."""
    mesh = jax.sharding.get_abstract_mesh()
    shards = 1 if mesh.empty else dict(mesh.shape).get(ROW_AXIS, 1)
    return gr.Axes(rows=ROW_AXIS) if shards > 1 and rows % shards == 0 else gr.Axes()


def refit(state: AnchorState, cfg: AnchorConfig) -> AnchorState:
    """Warm-started ADMM on the buffer standardized by its own statistics, at most cfg.admm_iters iterations.

    On a mesh with several data shards the buffer's rows are split over them (`jax.shard_map`; each
    F-product all-reduces an n-vector or a (d, P) block), so each device works on its share of the rows.
    Every output keeps the dtype of the field it replaces (float32 in training; a float64 copy of the state
    refits in float64, as the tests that compare with an independent solver do).
    """
    center, spread = _buffer_statistics(state.buffer)
    state = state.replace(center=center, spread=spread)
    X = standardize(state, state.buffer)
    y = labels(cfg, X.dtype)
    M = gr.masks(X, state.gates)
    signs = jnp.ones((state.gates.shape[1],), X.dtype)
    empty = jnp.zeros((X.shape[0], 0), X.dtype)
    solve = admm.sharded_solve(cfg.admm_config(), axes=_row_axes(X.shape[0]))
    new, info = solve(X, y, M, signs, state.admm._replace(s=empty, nu=empty), jnp.asarray(-jnp.inf, X.dtype))
    state = state.replace(admm=_without_slack(new))
    f = _scores(state, X)
    rms = jnp.sqrt(jnp.mean(jnp.square(_chosen_minus_rejected(f))))
    fit = {"objective": info.objective, "accuracy": jnp.mean((f * y > 0).astype(jnp.float32)),
           "primal_residual": info.primal_residual, "dual_residual": info.dual_residual, "duality_gap": info.gap,
           "iterations": info.iterations.astype(jnp.float32)}
    return state.replace(margin_scale=jnp.where(rms > 0, rms, 1.0).astype(state.margin_scale.dtype),
                         fit={k: v.astype(state.fit[k].dtype) for k, v in fit.items()})


def update(state: AnchorState, features_Bx2xK: jax.Array, step: jax.Array, cfg: AnchorConfig) -> AnchorState:
    """After a train step: write the batch's raw features into the buffer; refit when due."""
    B = features_Bx2xK.shape[0]
    rows_2BxK = features_Bx2xK.reshape(2 * B, -1).astype(state.buffer.dtype)
    start = (state.pairs_seen % cfg.buffer) * 2
    state = state.replace(buffer=jax.lax.dynamic_update_slice_in_dim(state.buffer, rows_2BxK, start, 0),
                          pairs_seen=state.pairs_seen + B)
    due = ((step + 1) % cfg.refresh_every == 0) & (state.pairs_seen >= cfg.buffer)
    return jax.lax.cond(due, lambda s: refit(s, cfg), lambda s: s, state)


def weighted_mean(x_B: jax.Array, weight_B: jax.Array) -> jax.Array:
    """Mean over a batch's real pairs (padding pairs have weight 0; an all-padding batch gives 0, not NaN)."""
    return (x_B * weight_B).sum() / jnp.maximum(weight_B.sum(), 1.0)


def shuffle_key(rng: jax.Array, step: jax.Array) -> jax.Array:
    """The shuffle's key at `step`, from the train state's raw key data: a checkpoint holds both, so a resumed
    run draws exactly the straight run's permutations."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(rng), SHUFFLE_STREAM), step)


def _shuffled(margin_B: jax.Array, weight_B: jax.Array, key: jax.Array) -> jax.Array:
    """The real pairs' margins in a random order over the real pairs' slots; padding pairs keep their own."""
    real_B = weight_B > 0
    sources_B = jnp.argsort(jnp.where(real_B, jax.random.uniform(key, margin_B.shape), 2.0))  # real in random order
    slots_B = jnp.argsort(~real_B, stable=True)  # real in batch order, then padding (in order on both sides)
    return margin_B.at[slots_B].set(margin_B[sources_B])


def control(cfg: AnchorConfig, margin_B: jax.Array, weight_B: jax.Array, key: jax.Array) -> jax.Array:
    """The margin that enters the loss under `cfg.control` (see the module docstring), from the margin on the
    loss's scale; `key` (from `shuffle_key`) is used by "shuffled" only."""
    if cfg.control == "shuffled":
        return _shuffled(margin_B, weight_B, key)
    if cfg.control == "constant":
        return jnp.full_like(margin_B, weighted_mean(jnp.abs(margin_B), weight_B))
    return margin_B
