"""The convex two-layer ReLU network (Pilanci & Ergen 2020): gates, masks, the operator F, objectives.

Features X (n, d), P gate vectors h_i sampled once from a seed, masks
D_i = diag(1[X h_i >= 0]) stored as an (n, P) 0/1 matrix M.

- gated ReLU: f(x) = sum_i 1[x.h_i >= 0] x.w_i, weights W (d, P).
- exact ReLU: pairs (u_i, u'_i) stacked as U = [U+, U-] (d, 2P) with column
  signs [+1.., -1..]; f = sum_i D_i X (u_i - u'_i) under the cone constraints
  (2 D_i - I) X u_i >= 0 (and the same for u'_i), when f is a real ReLU net.

F U = rowsum(M * (X U) * signs) and F^T r = X^T (M * r[:, None]) * signs: two
matmuls, F is never materialized. Every function takes an `Axes` naming the
mesh axes that gates and rows are split over, and all-reduces over them
(inside `jax.shard_map`); with no axes it is plain single-device code.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

LOSSES = ("squared", "logistic")
VARIANTS = ("gated", "relu")


class Axes(NamedTuple):
    gates: str | None = None  # mesh axis the gate columns are split over
    rows: str | None = None  # mesh axis the rows of X are split over


def psum(x, *axes):
    names = tuple(a for a in axes if a)
    return jax.lax.psum(x, names) if names else x


def pmax(x, *axes):
    names = tuple(a for a in axes if a)
    return jax.lax.pmax(x, names) if names else x


def sample_gates(seed: int, d: int, num_gates: int, dtype=jnp.float32) -> jax.Array:
    """P gate vectors h_i ~ N(0, I_d) as the columns of a (d, P) matrix."""
    return jax.random.normal(jax.random.key(seed), (d, num_gates), dtype)


def masks(X: jax.Array, gates: jax.Array) -> jax.Array:
    """(n, P) activation pattern 1[X h_i >= 0], in X's dtype (it multiplies X U)."""
    return (X @ gates >= 0).astype(X.dtype)


def column_signs(num_gates: int, variant: str, dtype) -> jax.Array:
    """+1 per gate (gated); [+1]*P + [-1]*P for the (u, u') pairs of the exact ReLU model."""
    ones = jnp.ones((num_gates,), dtype)
    return ones if variant == "gated" else jnp.concatenate([ones, -ones])


def expand_masks(M: jax.Array, variant: str) -> jax.Array:
    return M if variant == "gated" else jnp.concatenate([M, M], axis=1)


def forward(X, M, signs, U, axes: Axes = Axes()) -> jax.Array:
    """F U: the network's output on the rows of X, (n,)."""
    return psum(((X @ U) * M * signs).sum(axis=1), axes.gates)


def adjoint(X, M, signs, r, axes: Axes = Axes()) -> jax.Array:
    """F^T r: (d, P), all-reduced over row shards. r scales the narrower of X and M before the matmul
    (half the time of scaling M at d = 32, P = 64; the other way round at d = 128)."""
    scaled = (X * r[:, None]).T @ M if X.shape[1] < M.shape[1] else X.T @ (M * r[:, None])
    return psum(scaled, axes.rows) * signs


def cone(X, M, U) -> jax.Array:
    """G U = (2 M - 1) * (X U): nonnegative exactly when every D_i X u_i is a ReLU of X u_i."""
    return (2 * M - 1) * (X @ U)


def cone_adjoint(X, M, S, axes: Axes = Axes()) -> jax.Array:
    return psum(X.T @ ((2 * M - 1) * S), axes.rows)


def to_pm1(y: jax.Array) -> jax.Array:
    """Labels as +-1 (0/1 labels are mapped 0 -> -1)."""
    return jnp.where(y > 0, 1.0, -1.0).astype(y.dtype)


def loss_value(f, y, loss: str, axes: Axes = Axes()) -> jax.Array:
    if loss == "squared":
        return 0.5 * psum(jnp.sum(jnp.square(f - y)), axes.rows)
    return psum(jnp.sum(jnp.logaddexp(0.0, -y * f)), axes.rows)


def group_norms(U) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(U), axis=0))


def penalty(U, beta, axes: Axes = Axes()) -> jax.Array:
    return beta * psum(jnp.sum(group_norms(U)), axes.gates)


def objective(X, y, M, signs, U, beta, loss: str, axes: Axes = Axes()) -> jax.Array:
    """loss(F U, y) + beta * sum_i ||u_i||_2."""
    return loss_value(forward(X, M, signs, U, axes), y, loss, axes) + penalty(U, beta, axes)


def _entropy(a):
    return -(jax.scipy.special.xlogy(a, a) + jax.scipy.special.xlogy(1 - a, 1 - a))


def dual_direction(f, y, loss: str) -> jax.Array:
    """-grad loss(f): the dual point the predictions f suggest, before it is scaled to be feasible."""
    return y - f if loss == "squared" else y * jax.nn.sigmoid(-y * f)


def dual_bound(X, y, M, signs, theta, beta, loss: str, axes: Axes = Axes(), bisection_steps: int = 40) -> jax.Array:
    """The best lower bound on the optimum along the ray s * theta: dual_bound_given with F^T theta computed
    here, after clipping a logistic theta into the entropy's domain."""
    theta = dual_domain(theta, y, loss)
    return dual_bound_given(adjoint(X, M, signs, theta, axes), y, theta, beta, loss, axes, bisection_steps)


def dual_domain(theta, y, loss: str) -> jax.Array:
    """theta clipped into the dual's domain: 0 <= theta y <= 1 for the logistic loss (the binary entropy's),
    unchanged for the squared loss. Clipping keeps any bound built from it valid."""
    return y * jnp.clip(theta * y, 0.0, 1.0) if loss == "logistic" else theta


def dual_bound_given(Ft_theta, y, theta, beta, loss: str, axes: Axes = Axes(), bisection_steps: int = 40):
    """The best lower bound on the optimum along the ray s * theta (s >= 0 for logistic), any theta (n,).

    The dual is max_theta -loss*(-theta) s.t. ||X^T D_i theta|| <= beta: theta.y - ||theta||^2 / 2 for the
    squared loss, sum_j H(theta_j y_j) (binary entropy, 0 <= theta_j y_j <= 1) for the logistic loss.
    Feasibility caps |s| at smax = beta / max_i ||X^T D_i theta||. Scaling by min(1, smax) alone loses a
    first-order amount whenever theta is off the optimum; the best s on the ray is closed form for the
    squared loss (clip(theta.y / ||theta||^2, -smax, smax)) and, for the logistic loss, the root of the
    decreasing derivative sum_j a_j log((1 - s a_j) / (s a_j)) (a = theta y), found by bisection.
    Ft_theta must be F^T theta computed exactly (it decides feasibility); a logistic theta must have
    0 <= theta y <= 1 (dual_domain).
    """
    worst = pmax(jnp.max(group_norms(Ft_theta)), axes.gates)
    smax = beta / jnp.maximum(worst, 1e-30)
    if loss == "squared":
        ty, tt = psum(jnp.dot(theta, y), axes.rows), psum(jnp.dot(theta, theta), axes.rows)
        s = jnp.clip(ty / jnp.maximum(tt, 1e-30), -smax, smax)
        return s * ty - 0.5 * s * s * tt
    a = theta * y
    top = jnp.minimum(smax, 1.0 / jnp.maximum(pmax(jnp.max(a), axes.rows), 1e-30))

    def slope(s):
        sa = s * a
        return psum(jnp.sum(jnp.where(a > 0, a * (jnp.log1p(-sa) - jnp.log(jnp.maximum(sa, 1e-300))), 0.0)),
                    axes.rows)

    def bisect(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        rising = slope(mid) > 0
        return jnp.where(rising, mid, lo), jnp.where(rising, hi, mid)

    lo, _ = jax.lax.fori_loop(0, bisection_steps, bisect, (jnp.zeros_like(top), top))
    return psum(jnp.sum(_entropy(lo * a)), axes.rows)


def dual_value(X, y, M, signs, f, beta, loss: str, axes: Axes = Axes()) -> jax.Array:
    """A lower bound on the optimum from the dual point built at predictions f, e.g. f = F U (gated model):
    -grad loss(f), scaled optimally within feasibility (see dual_bound)."""
    return dual_bound(X, y, M, signs, dual_direction(f, y, loss), beta, loss, axes)
