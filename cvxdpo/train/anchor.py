"""The convex anchor of DPO-Convex: features, a rolling buffer, and an ADMM refit inside the train step.

Per step the policy's final hidden states are mean-pooled over each response's
tokens (stop-gradient), mapped to `dim` dimensions by a fixed random
projection and standardized with running statistics. A ring buffer keeps the
features of the last `buffer` pairs, chosen rows labelled +1 and rejected rows
-1. Every `refresh_every` steps (once the buffer is full) a gated convex
two-layer ReLU classifier is re-fitted on the buffer by warm-started ADMM with
at most `admm_iters` iterations, inside the jitted step. Its margin
m = f(phi(y_w)) - f(phi(y_l)) is the anchor the DPO-Convex losses use in place
of a reference model. Everything here is a few small arrays: no second copy of
the policy.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from cvxdpo.convex import admm
from cvxdpo.convex import gated_relu as gr
from cvxdpo.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class AnchorConfig:
    dim: int = 32  # feature dimension after the random projection
    buffer: int = 256  # pairs kept for the refit
    refresh_every: int = 10  # steps between refits
    num_gates: int = 16
    reg: float = 0.01  # group-lasso strength per buffer row (see `penalty`)
    loss: str = "logistic"
    admm_iters: int = 100  # ADMM iterations per refit (warm-started)

    def __post_init__(self):
        for name in ("dim", "buffer", "refresh_every", "num_gates", "admm_iters"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"anchor.{name} must be positive, got {getattr(self, name)}")
        if self.reg <= 0:
            raise ConfigError(f"anchor.reg must be positive, got {self.reg}")
        if self.loss not in gr.LOSSES:
            raise ConfigError(f"anchor.loss={self.loss!r} is not one of {', '.join(gr.LOSSES)}")

    @property
    def penalty(self) -> float:
        """The group-lasso weight on the summed loss of the 2 * buffer rows (the solver's `beta`, not DPO's)."""
        return self.reg * 2 * self.buffer

    def admm_config(self) -> admm.ADMMConfig:
        return admm.ADMMConfig(loss=self.loss, variant="gated", beta=self.penalty, max_iter=self.admm_iters,
                               gap_tol=1e-6)


@struct.dataclass
class AnchorState:
    projection: jax.Array  # (E, dim) fixed
    mean: jax.Array  # (dim,) running mean of the projected features
    m2: jax.Array  # (dim,) running sum of squared deviations (Welford / Chan)
    count: jax.Array  # () features seen
    buffer: jax.Array  # (2 * buffer, dim) standardized features, rows [c_0, r_0, c_1, r_1, ...]
    pairs_seen: jax.Array  # () pairs written into the buffer so far
    gates: jax.Array  # (dim, num_gates) fixed
    admm: admm.ADMMState
    fit: dict  # the last refit's diagnostics


FIT_KEYS = ("objective", "accuracy", "primal_residual", "dual_residual", "duality_gap", "iterations")


def init(cfg: AnchorConfig, n_embd: int, seed: int) -> AnchorState:
    """A fresh anchor: the projection from `seed`, the gates from `seed + 1`, an empty buffer."""
    key = jax.random.key(seed)
    f32 = jnp.float32
    projection = jax.random.normal(key, (n_embd, cfg.dim), f32) / jnp.sqrt(n_embd)
    rows = 2 * cfg.buffer
    return AnchorState(
        projection=projection, mean=jnp.zeros((cfg.dim,), f32), m2=jnp.zeros((cfg.dim,), f32),
        count=jnp.zeros((), f32), buffer=jnp.zeros((rows, cfg.dim), f32), pairs_seen=jnp.zeros((), jnp.int32),
        gates=gr.sample_gates(seed + 1, cfg.dim, cfg.num_gates, f32),
        admm=_without_slack(admm.init_state(rows, cfg.dim, cfg.num_gates, "gated", cfg.admm_config().rho, f32)),
        fit={k: jnp.zeros((), f32) for k in FIT_KEYS})


def _without_slack(st: admm.ADMMState) -> admm.ADMMState:
    """The gated model has no cone slack; its empty (n, 0) arrays are dropped so checkpoints can hold the state."""
    return st._replace(s=None, nu=None)


def labels(cfg: AnchorConfig) -> jax.Array:
    """+1 for chosen rows, -1 for rejected rows, in the buffer's interleaved order."""
    return jnp.tile(jnp.array([1.0, -1.0], jnp.float32), cfg.buffer)


def pool(hidden_2BxLxE: jax.Array, loss_mask_Bx2xL: jax.Array, projection_ExK: jax.Array) -> jax.Array:
    """Projected mean of the final hidden states over each response's tokens: (B, 2, K), no gradient.

    The hidden rows are in pair order [c_0, r_0, c_1, r_1, ...], as the pair forward pass returns them.
    """
    B, _, L = loss_mask_Bx2xL.shape
    mask_2BxL = loss_mask_Bx2xL.reshape(2 * B, L).astype(jnp.float32)
    pooled_2BxE = (jax.lax.stop_gradient(hidden_2BxLxE).astype(jnp.float32) * mask_2BxL[..., None]).sum(1)
    pooled_2BxE = pooled_2BxE / jnp.maximum(mask_2BxL.sum(1, keepdims=True), 1.0)
    return (pooled_2BxE @ projection_ExK).reshape(B, 2, -1)


def standardize(state: AnchorState, features: jax.Array) -> jax.Array:
    var = state.m2 / jnp.maximum(state.count, 1.0)
    return (features - state.mean) / jnp.sqrt(var + 1e-6)


def margin(state: AnchorState, features_Bx2xK: jax.Array) -> jax.Array:
    """m = f(phi(y_w)) - f(phi(y_l)) of the current classifier on raw projected features: (B,)."""
    z_Bx2xK = standardize(state, features_Bx2xK)
    B = z_Bx2xK.shape[0]
    z_2BxK = z_Bx2xK.reshape(2 * B, -1)
    f_2B = gr.forward(z_2BxK, gr.masks(z_2BxK, state.gates), jnp.ones(state.gates.shape[1], z_2BxK.dtype),
                      state.admm.v)
    f_Bx2 = f_2B.reshape(B, 2)
    return jax.lax.stop_gradient(f_Bx2[:, 0] - f_Bx2[:, 1])


def _update_stats(state: AnchorState, features: jax.Array) -> AnchorState:
    """Chan et al.'s parallel update of the running mean and squared deviations."""
    x = features.reshape(-1, features.shape[-1])
    n_b = jnp.asarray(x.shape[0], jnp.float32)
    mean_b = x.mean(0)
    m2_b = jnp.square(x - mean_b).sum(0)
    total = state.count + n_b
    delta = mean_b - state.mean
    return state.replace(mean=state.mean + delta * n_b / total,
                         m2=state.m2 + m2_b + jnp.square(delta) * state.count * n_b / total, count=total)


def refit(state: AnchorState, cfg: AnchorConfig) -> AnchorState:
    """Warm-started ADMM on the buffer, at most cfg.admm_iters iterations."""
    X, y = state.buffer, labels(cfg)
    M = gr.masks(X, state.gates)
    signs = jnp.ones((cfg.num_gates,), X.dtype)
    prob = admm.Problem(X, y, M, signs, jnp.zeros((0, 0), X.dtype), admm.block_weight(X, M))
    empty = jnp.zeros((X.shape[0], 0), X.dtype)
    new, info = admm.solve_local(prob, state.admm._replace(s=empty, nu=empty), cfg.admm_config())
    f = gr.forward(X, M, signs, new.v)
    fit = {"objective": info.objective, "accuracy": jnp.mean((f * y > 0).astype(jnp.float32)),
           "primal_residual": info.primal_residual, "dual_residual": info.dual_residual, "duality_gap": info.gap,
           "iterations": info.iterations.astype(jnp.float32)}
    return state.replace(admm=_without_slack(new), fit={k: v.astype(jnp.float32) for k, v in fit.items()})


def update(state: AnchorState, features: jax.Array, step: jax.Array, cfg: AnchorConfig) -> AnchorState:
    """After a train step: fold the batch's features into the statistics and the buffer; refit when due."""
    state = _update_stats(state, features)
    B = features.shape[0]
    rows = standardize(state, features).reshape(2 * B, -1)
    start = (state.pairs_seen % cfg.buffer) * 2
    state = state.replace(buffer=jax.lax.dynamic_update_slice_in_dim(state.buffer, rows, start, 0),
                          pairs_seen=state.pairs_seen + B)
    due = ((step + 1) % cfg.refresh_every == 0) & (state.pairs_seen >= cfg.buffer)
    return jax.lax.cond(due, lambda s: refit(s, cfg), lambda s: s, state)
