"""ADMM for the convex two-layer ReLU network, with a preconditioned conjugate-gradient primal step.

Splitting z = F u, v = u (and s = G u, s >= 0 for the exact ReLU cone), penalty
rho, scaled duals (mu, lam, nu):

    u   <- solve (F^T F + I + G^T G) u = F^T (z - mu) + (v - lam) + G^T (s - nu)   (PCG, warm-started)
    z   <- prox_{loss / rho}(F u + mu)      closed form (squared) or Newton steps (logistic)
    v   <- group_soft_threshold(u + lam, beta / rho)
    s   <- max(0, G u + nu)
    mu  += F u - z;  lam += u - v;  nu += G u - s

Both constraint blocks share rho, so the u-system does not depend on rho and
its preconditioner survives rho changes. The inner CG tolerance shrinks as
(1 + k)^-1.2; rho adapts by residual balancing (Boyd et al. 2011, 3.4.1); the
run stops on primal/dual residuals (3.3) or, for the gated model, on the
relative duality gap, which certifies optimality without another solver.

Everything is a pure function of arrays usable inside `jax.jit` and
`lax.while_loop`. `make_solver` wraps it in `jax.shard_map` when a mesh is
given: gate columns split over one mesh axis (one all-reduce of an n-vector per
F-matvec, scalar all-reduces for inner products), rows optionally over another.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from cvxdpo.convex import gated_relu as gr
from cvxdpo.convex.gated_relu import Axes, psum
from cvxdpo.errors import ConfigError

PRECONDITIONERS = ("none", "jacobi", "nystrom")
RUNNING, CONVERGED, MAX_ITER, DIVERGED = 0, 1, 2, 3
STATUS = {RUNNING: "running", CONVERGED: "converged", MAX_ITER: "max_iter", DIVERGED: "diverged"}


@dataclasses.dataclass(frozen=True)
class ADMMConfig:
    loss: str = "squared"
    variant: str = "gated"
    beta: float = 1e-3
    # Initial penalty (the u = v block is weighted by kappa, so this is scale-free) and residual balancing.
    # None picks the measured defaults: 0.03 with balancing for the gated model; for the exact ReLU model,
    # whose cone constraints need a firm penalty (balancing lowers it and the cone stays violated), a fixed
    # 10 x the loss's curvature bound (1 squared, 1/4 logistic).
    rho: float | None = None
    max_iter: int = 500  # outer iterations per solve call
    abs_tol: float = 1e-8
    rel_tol: float = 1e-7
    gap_tol: float = 1e-7  # gated model: stop on this relative duality gap (0: on the residuals instead)
    cg_max_iter: int = 50
    cg_tol: float = 1e-2  # inner tolerance at k = 0, shrinking as (1 + k)^-1.2
    cg_min_tol: float = 1e-12
    preconditioner: str = "jacobi"
    nystrom_rank: int = 64
    adaptive_rho: bool | None = None
    balance: float = 10.0  # residual ratio that triggers a rho change
    rho_period: int = 25  # look at the residual ratio only every this many iterations (no oscillation)
    check_every: int = 5  # residuals, objective and duality gap are evaluated every this many iterations
    bisection_steps: int = 40  # logistic prox: bracket shrinks 2^-40, then 3 Newton steps
    relaxation: float = 1.6  # over-relaxation alpha in [1, 2) (Boyd 3.4.3); 1 = plain ADMM

    def __post_init__(self):
        gated = self.variant == "gated"
        if self.rho is None:
            object.__setattr__(self, "rho", 0.03 if gated else 10.0 * (1.0 if self.loss == "squared" else 0.25))
        if self.adaptive_rho is None:
            object.__setattr__(self, "adaptive_rho", gated)
        if self.loss not in gr.LOSSES:
            raise ConfigError(f"convex loss {self.loss!r} is not one of {', '.join(gr.LOSSES)}")
        if self.variant not in gr.VARIANTS:
            raise ConfigError(f"convex variant {self.variant!r} is not one of {', '.join(gr.VARIANTS)}")
        if self.preconditioner not in PRECONDITIONERS:
            raise ConfigError(f"preconditioner {self.preconditioner!r} is not one of {', '.join(PRECONDITIONERS)}")
        if not self.beta > 0:
            raise ConfigError(f"convex beta must be positive, got {self.beta}")
        if not self.rho > 0 or self.max_iter <= 0 or self.cg_max_iter <= 0:
            raise ConfigError("ADMM needs rho > 0, max_iter > 0 and cg_max_iter > 0")


class ADMMState(NamedTuple):
    u: jax.Array  # (d, C) primal weights, C = P (gated) or 2P (relu)
    v: jax.Array  # (d, C) group-sparse copy of u
    lam: jax.Array  # (d, C) scaled dual of u = v
    z: jax.Array  # (n,) copy of F u
    mu: jax.Array  # (n,) scaled dual of F u = z
    s: jax.Array  # (n, C) cone slack (relu) or (n, 0)
    nu: jax.Array  # (n, C) scaled dual of G u = s (relu) or (n, 0)
    rho: jax.Array  # ()
    k: jax.Array  # () outer iterations done over all calls (drives the CG tolerance)


class SolveInfo(NamedTuple):
    iterations: jax.Array  # outer iterations in this call
    cg_iterations: jax.Array  # inner CG iterations in this call
    primal_residual: jax.Array
    dual_residual: jax.Array
    objective: jax.Array  # at v (gated: the group-sparse iterate) or u (relu: the cone-feasible one)
    gap: jax.Array  # relative duality gap (gated; NaN for relu)
    cone_violation: jax.Array  # max(0, -G u) relative to max |X u| (relu; 0 for gated)
    status: jax.Array  # RUNNING / CONVERGED / MAX_ITER / DIVERGED


def init_state(n: int, d: int, num_gates: int, variant: str, rho: float = 1.0, dtype=jnp.float32) -> ADMMState:
    cols = num_gates * (1 if variant == "gated" else 2)
    slack = cols if variant == "relu" else 0
    zeros = lambda *shape: jnp.zeros(shape, dtype)  # noqa: E731
    return ADMMState(u=zeros(d, cols), v=zeros(d, cols), lam=zeros(d, cols), z=zeros(n), mu=zeros(n),
                     s=zeros(n, slack), nu=zeros(n, slack), rho=jnp.asarray(rho, dtype), k=jnp.zeros((), jnp.int32))


# --- pieces ----------------------------------------------------------------------------------------

def group_soft_threshold(W, t):
    norms = gr.group_norms(W)
    return W * jnp.maximum(0.0, 1.0 - t / jnp.maximum(norms, 1e-30))


def prox_loss(w, y, rho, cfg: ADMMConfig):
    """argmin_z loss(z, y) + rho/2 ||z - w||^2, per sample.

    Logistic: with t = y z the optimality condition rho (t - y w) = sigmoid(-t)
    is increasing in t and its root lies in [y w, y w + 1/rho]. Bisection
    shrinks that bracket (Newton alone overshoots on the flat, saturated side
    when rho is small), then a few Newton steps polish the root.
    """
    if cfg.loss == "squared":
        return (y + rho * w) / (1.0 + rho)
    c = y * w

    def g(t):
        return rho * (t - c) - jax.nn.sigmoid(-t)

    def bisect(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        below = g(mid) < 0
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    lo, hi = jax.lax.fori_loop(0, cfg.bisection_steps, bisect, (c, c + 1.0 / rho))

    def newton(_, t):
        return t - g(t) / (rho + jax.nn.sigmoid(t) * jax.nn.sigmoid(-t))

    return y * jax.lax.fori_loop(0, 3, newton, 0.5 * (lo + hi))


class Problem(NamedTuple):
    """The data of one solve, as local blocks when sharded."""

    X: jax.Array  # (n, d)
    y: jax.Array  # (n,) +-1
    M: jax.Array  # (n, C) masks, duplicated for relu
    signs: jax.Array  # (C,)
    XtX: jax.Array  # (d, d) all-reduced X^T X (relu) or (0, 0)
    kappa: jax.Array  # () penalty of the u = v block relative to rho: the mean diagonal of F^T F


def block_weight(X, M, axes: Axes = Axes()) -> jax.Array:
    """Mean diagonal entry of F^T F. Weighting the u = v constraint by it balances it against F u = z,
    so that (F^T F + kappa I) is well conditioned whatever the scale of X."""
    diag = psum(jnp.einsum("nc,nd->", M, jnp.square(X)), axes.rows, axes.gates)
    count = psum(jnp.asarray(M.shape[1] * X.shape[1], X.dtype), axes.gates)
    return jnp.maximum(diag / count, 1e-12)


def _system(prob: Problem, cfg: ADMMConfig, axes: Axes):
    """The u-system operator A(u) = F^T F u + u (+ X^T X u for the cone)."""

    def apply(U):
        out = gr.adjoint(prob.X, prob.M, prob.signs, gr.forward(prob.X, prob.M, prob.signs, U, axes), axes) \
            + prob.kappa * U
        if cfg.variant == "relu":
            out = out + prob.XtX @ U
        return out

    return apply


def _vdot(a, b, axes: Axes):
    """Inner product of two (d, C) arrays: columns split over gates, replicated over rows."""
    return psum(jnp.vdot(a, b), axes.gates)


def _jacobi(prob: Problem, cfg: ADMMConfig, axes: Axes):
    """Block-Jacobi: one d x d Cholesky per gate column, I + X^T D_i X (+ X^T X), local to its device."""
    blocks = psum(jnp.einsum("nd,nc,ne->cde", prob.X, prob.M, prob.X), axes.rows)
    d = prob.X.shape[1]
    blocks = blocks + prob.kappa * jnp.eye(d, dtype=prob.X.dtype) + (prob.XtX if cfg.variant == "relu" else 0.0)
    chol = jnp.linalg.cholesky(blocks)

    def solve(R):
        return jax.vmap(lambda c, r: jax.scipy.linalg.cho_solve((c, True), r), in_axes=(0, 1), out_axes=1)(chol, R)

    return solve


def _nystrom(prob: Problem, cfg: ADMMConfig, apply, shape, key):
    """Randomized Nystrom approximation of A - I, inverted under the identity shift (single device)."""
    size = shape[0] * shape[1]
    rank = min(cfg.nystrom_rank, size)
    omega, _ = jnp.linalg.qr(jax.random.normal(key, (size, rank), prob.X.dtype))
    sketch = jax.vmap(lambda o: (apply(o.reshape(shape)) - prob.kappa * o.reshape(shape)).reshape(-1),
                      in_axes=1, out_axes=1)(omega)
    shift = jnp.finfo(prob.X.dtype).eps * jnp.linalg.norm(sketch)
    sketch = sketch + shift * omega
    chol = jnp.linalg.cholesky(omega.T @ sketch)
    B = jax.scipy.linalg.solve_triangular(chol, sketch.T, lower=True).T
    U, sigma, _ = jnp.linalg.svd(B, full_matrices=False)
    lam = jnp.maximum(sigma**2 - shift, 0.0)
    floor = lam[-1] + prob.kappa

    def solve(R):
        r = R.reshape(-1)
        coef = U.T @ r
        return (U @ (coef * floor / (lam + prob.kappa)) + (r - U @ coef) * floor / prob.kappa).reshape(shape)

    return solve


def _pcg(apply, precond, b, x0, tol, max_iter, axes: Axes):
    """Preconditioned CG from x0 until ||r|| <= tol ||b||; returns (x, iterations)."""
    r0 = b - apply(x0)
    z0 = precond(r0)
    b_norm = jnp.sqrt(_vdot(b, b, axes))

    def cond(c):
        _, r, _, _, _, i = c
        return (i < max_iter) & (jnp.sqrt(_vdot(r, r, axes)) > tol * b_norm)

    def body(c):
        x, r, z, p, rz, i = c
        Ap = apply(p)
        alpha = rz / _vdot(p, Ap, axes)
        x, r = x + alpha * p, r - alpha * Ap
        z = precond(r)
        rz_new = _vdot(r, z, axes)
        return x, r, z, z + (rz_new / rz) * p, rz_new, i + 1

    x, *_, i = jax.lax.while_loop(cond, body, (x0, r0, z0, z0, _vdot(r0, z0, axes), jnp.zeros((), jnp.int32)))
    return x, i


# --- the solve loop --------------------------------------------------------------------------------

def _relative_gap(prob, cfg, f, primal, axes):
    """Relative duality gap of `primal` against the dual point built from predictions f (gated model)."""
    if cfg.variant != "gated":
        return jnp.asarray(jnp.nan, prob.X.dtype)
    dual = gr.dual_value(prob.X, prob.y, prob.M, prob.signs, f, cfg.beta, cfg.loss, axes)
    return (primal - dual) / jnp.maximum(jnp.abs(primal), 1e-30)


def solve_local(prob: Problem, state: ADMMState, cfg: ADMMConfig, axes: Axes = Axes()) -> tuple[ADMMState, SolveInfo]:
    """Up to cfg.max_iter ADMM iterations from `state` (warm start) on local blocks."""
    X, y, M, signs, _, kappa = prob
    dt = X.dtype
    relu = cfg.variant == "relu"
    apply = _system(prob, cfg, axes)
    if cfg.preconditioner == "jacobi":
        precond = _jacobi(prob, cfg, axes)
    elif cfg.preconditioner == "nystrom":
        precond = _nystrom(prob, cfg, apply, state.u.shape, jax.random.key(0))
    else:
        precond = lambda R: R  # noqa: E731
    n_dual = psum(jnp.asarray(state.u.size, dt), axes.gates)
    n_pri = n_dual + psum(jnp.asarray(state.z.size, dt), axes.rows) + psum(jnp.asarray(state.s.size, dt),
                                                                              axes.rows, axes.gates)

    def sq(a, *ax):
        return psum(jnp.sum(jnp.square(a)), *ax)

    def G(U):
        return gr.cone(X, M, U) if relu else jnp.zeros_like(state.s)

    def Gt(S):
        return gr.cone_adjoint(X, M, S, axes) if relu else 0.0

    def step(carry):
        st, info = carry
        tol = jnp.maximum(cfg.cg_tol * (1.0 + st.k.astype(dt)) ** -1.2, cfg.cg_min_tol)
        b = gr.adjoint(X, M, signs, st.z - st.mu, axes) + kappa * (st.v - st.lam) + Gt(st.s - st.nu)
        u, cg_it = _pcg(apply, precond, b, st.u, tol, cfg.cg_max_iter, axes)
        Fu, Gu = gr.forward(X, M, signs, u, axes), G(u)
        a = cfg.relaxation  # over-relaxed copies of F u, u, G u
        Fu_r, u_r, Gu_r = a * Fu + (1 - a) * st.z, a * u + (1 - a) * st.v, a * Gu + (1 - a) * st.s
        z = prox_loss(Fu_r + st.mu, y, st.rho, cfg)
        v = group_soft_threshold(u_r + st.lam, cfg.beta / (st.rho * kappa))
        s = jnp.maximum(0.0, Gu_r + st.nu)
        mu, lam, nu = st.mu + Fu_r - z, st.lam + u_r - v, st.nu + Gu_r - s
        it = info.iterations + 1

        def diagnose(_):
            """Residuals (Boyd 3.3) of [F; sqrt(kappa) I; G] u = [z; sqrt(kappa) v; s], objective, gap, cone."""
            r_pri = jnp.sqrt(sq(Fu - z, axes.rows) + kappa * sq(u - v, axes.gates)
                             + sq(Gu - s, axes.rows, axes.gates))
            r_dual = st.rho * jnp.sqrt(sq(gr.adjoint(X, M, signs, z - st.z, axes) + kappa * (v - st.v)
                                          + Gt(s - st.s), axes.gates))
            eps_pri = jnp.sqrt(n_pri) * cfg.abs_tol + cfg.rel_tol * jnp.sqrt(jnp.maximum(
                sq(Fu, axes.rows) + kappa * sq(u, axes.gates) + sq(Gu, axes.rows, axes.gates),
                sq(z, axes.rows) + kappa * sq(v, axes.gates) + sq(s, axes.rows, axes.gates)))
            eps_dual = jnp.sqrt(n_dual) * cfg.abs_tol + cfg.rel_tol * st.rho * jnp.sqrt(
                sq(gr.adjoint(X, M, signs, mu, axes) + kappa * lam + Gt(nu), axes.gates))
            # v is exactly group-sparse and the better primal point; z gives the better dual point.
            primal = gr.objective(X, y, M, signs, v, cfg.beta, cfg.loss, axes) if not relu else \
                gr.loss_value(Fu, y, cfg.loss, axes) + gr.penalty(u, cfg.beta, axes)
            gap = _relative_gap(prob, cfg, z, primal, axes)
            if cfg.variant == "gated" and cfg.gap_tol > 0:
                converged = gap <= cfg.gap_tol  # the certificate is the stronger test
            else:
                converged = (r_pri <= eps_pri) & (r_dual <= eps_dual)
            if relu:
                scale = jnp.maximum(gr.pmax(jnp.max(jnp.abs(X @ u)), axes.rows, axes.gates), 1e-30)
                cone_violation = jnp.maximum(gr.pmax(jnp.max(-Gu), axes.rows, axes.gates), 0.0) / scale
            else:
                cone_violation = jnp.zeros((), dt)
            return r_pri, r_dual, primal, gap, cone_violation, converged

        def keep(_):
            return (info.primal_residual, info.dual_residual, info.objective, info.gap, info.cone_violation,
                    jnp.asarray(False))

        # The diagnostics cost about as much as the iteration itself: run them every check_every iterations.
        check = (it % cfg.check_every == 0) | (it >= cfg.max_iter)
        r_pri, r_dual, primal, gap, cone_violation, converged = jax.lax.cond(check, diagnose, keep, None)
        diverged = check & (~jnp.isfinite(r_pri) | ~jnp.isfinite(r_dual) | ~jnp.isfinite(primal))
        status = jnp.where(diverged, DIVERGED, jnp.where(converged, CONVERGED,
                                                          jnp.where(it >= cfg.max_iter, MAX_ITER, RUNNING)))
        status = status.astype(jnp.int32)

        rho = st.rho
        if cfg.adaptive_rho:
            balance_now = check & ((st.k + 1) % cfg.rho_period == 0)
            up = balance_now & (r_pri > cfg.balance * r_dual)
            down = balance_now & (r_dual > cfg.balance * r_pri)
            factor = jnp.where(up, 2.0, jnp.where(down, 0.5, 1.0)).astype(dt)
            rho, mu, lam, nu = rho * factor, mu / factor, lam / factor, nu / factor
        new = ADMMState(u, v, lam, z, mu, s, nu, rho, st.k + 1)
        return new, SolveInfo(it, info.cg_iterations + cg_it, r_pri, r_dual, primal, gap, cone_violation, status)

    zero = jnp.zeros((), dt)
    info0 = SolveInfo(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), zero, zero, zero, zero, zero,
                      jnp.asarray(RUNNING, jnp.int32))
    return jax.lax.while_loop(lambda c: c[1].status == RUNNING, step, (state, info0))


def _state_specs(axes: Axes) -> ADMMState:
    g, r = axes.gates, axes.rows
    return ADMMState(u=P(None, g), v=P(None, g), lam=P(None, g), z=P(r), mu=P(r), s=P(r, g), nu=P(r, g),
                     rho=P(), k=P())


def make_solver(cfg: ADMMConfig, mesh: jax.sharding.Mesh | None = None, axes: Axes = Axes()):
    """jit(solve(X, y, M, signs, state) -> (state, info)); under shard_map when a mesh is given.

    X (n, d), y (n,) as +-1, M (n, C) masks (duplicated for relu), signs (C,).
    """
    if mesh is not None and cfg.preconditioner == "nystrom" and axes.gates:
        raise ConfigError("the nystrom preconditioner needs all gates on one device; use jacobi with gate sharding")

    def solve(X, y, M, signs, state):
        XtX = psum(X.T @ X, axes.rows) if cfg.variant == "relu" else jnp.zeros((0, 0), X.dtype)
        return solve_local(Problem(X, y, M, signs, XtX, block_weight(X, M, axes)), state, cfg, axes)

    if mesh is not None:
        g, r = axes.gates, axes.rows
        solve = jax.shard_map(solve, mesh=mesh,
                              in_specs=(P(r, None), P(r), P(r, g), P(g), _state_specs(axes)),
                              out_specs=(_state_specs(axes), SolveInfo(*[P()] * len(SolveInfo._fields))),
                              check_vma=False)
    return jax.jit(solve)
