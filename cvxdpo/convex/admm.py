"""ADMM for the convex two-layer ReLU network, with a preconditioned conjugate-gradient primal step.

Splitting z = F u, v = u (and s = G u, s >= 0 for the exact ReLU cone), penalty
rho, scaled duals (mu, lam, nu):

    u   <- solve (F^T F + I + G^T G) u = F^T (z - mu) + (v - lam) + G^T (s - nu)   (PCG, warm-started)
    z   <- prox_{loss / rho}(F u + mu)      closed form (squared) or Newton steps (logistic)
    v   <- group_soft_threshold(u + lam, beta / rho)
    s   <- max(0, G u + nu)
    mu  += F u - z;  lam += u - v;  nu += G u - s

Both constraint blocks share rho, so the u-system does not depend on rho and
its preconditioner survives rho changes. Each u-solve is a few warm-started CG
steps (the iterations that follow keep refining it), preconditioned by one
eigenbasis shared by all gate blocks; on float64 data those steps pass over X in
float32 while the residual they reduce is computed in float64. rho adapts by
residual balancing (Boyd et al. 2011, 3.4.1); the run stops on primal/dual
residuals (3.3) or, for the gated model, on the relative duality gap, which
certifies optimality without another solver.

Everything is a pure function of arrays usable inside `jax.jit` and
`lax.while_loop`. `make_solver` wraps it in `jax.shard_map` when a mesh is
given: gate columns split over one mesh axis (one all-reduce of an n-vector per
F-matvec, scalar all-reduces for inner products), rows optionally over another.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from cvxdpo.convex import gated_relu as gr
from cvxdpo.convex.gated_relu import Axes, psum
from cvxdpo.errors import ConfigError

PRECONDITIONERS = ("none", "shared", "jacobi", "nystrom")
RUNNING, CONVERGED, MAX_ITER, DIVERGED = 0, 1, 2, 3
STATUS = {RUNNING: "running", CONVERGED: "converged", MAX_ITER: "max_iter", DIVERGED: "diverged"}


@dataclasses.dataclass(frozen=True)
class ADMMConfig:
    loss: str = "squared"
    variant: str = "gated"
    beta: float = 1e-3
    # Initial penalty (the u = v block is weighted by kappa, so this is scale-free) and residual balancing.
    # None picks the measured defaults: 0.1 with balancing for the gated model; for the exact ReLU model,
    # whose cone constraints need a firm penalty (balancing lowers it and the cone stays violated), a fixed
    # 10 x the loss's curvature bound (1 squared, 1/4 logistic).
    rho: float | None = None
    max_iter: int = 500  # outer iterations per solve call
    abs_tol: float = 1e-8
    rel_tol: float = 1e-7
    gap_tol: float = 1e-7  # gated model: stop on this relative duality gap (0: on the residuals instead)
    # Inexact u-solves: each cuts its warm-started residual by cg_tol in at most cg_max_iter CG steps. None
    # picks the measured defaults. Gated: exactly 2 steps (cg_tol 0, so sharded and single-device runs take
    # the same steps); the ADMM iterations that follow keep refining the same solve, and this beat 10 steps
    # per iteration 3x in time to 1e-6 (docs/benchmarks.md). Exact ReLU, whose cone needs accurate solves:
    # up to 50 steps cutting the residual 100x.
    cg_max_iter: int | None = None
    cg_tol: float | None = None
    # "shared" (default): one eigenbasis for all gate blocks, built in n d^2; "jacobi": the exact d x d block
    # of every gate, n C d^2 to build (d / 2 passes over X: 13 s of a 22 s solve at n = 1e5, d = 128) and
    # slightly stronger on uncentered data; "nystrom": a low-rank sketch (single device); "none".
    preconditioner: str = "shared"
    nystrom_rank: int = 64
    adaptive_rho: bool | None = None
    balance: float = 10.0  # residual ratio that triggers a rho change
    rho_period: int = 25  # look at the residual ratio only every this many iterations (no oscillation)
    check_every: int = 5  # residuals, objective and duality gap are evaluated every this many iterations
    bisection_steps: int = 40  # logistic prox: bracket shrinks 2^-40, then 3 Newton steps
    relaxation: float = 1.6  # over-relaxation alpha in [1, 2) (Boyd 3.4.3); 1 = plain ADMM
    # dual points of past checks combined into a Celer-style extrapolated one (0: off, the default: with the
    # normalized dual point it certified nothing more, docs/benchmarks.md)
    extrapolation: int = 0
    # Newton steps moving the certificate's dual point onto the active constraints (0: off; each is a pass)
    normalize_steps: int = 2
    # dtype of the CG steps' passes over X: "float32" (no-op on float32 data) or None for X's own. On float64
    # data float32 halves their cost (2-4x less time per pass at n = 1e5). The u-solve's starting residual,
    # the objective and the certificate stay in float64: iterative refinement, the inexact solves only cut a
    # residual that is computed exactly, so runs still certify 1e-13 gaps. F u, which CG updates in float32,
    # is recomputed exactly at every check.
    pass_dtype: str | None = "float32"

    def __post_init__(self):
        gated = self.variant == "gated"
        if self.rho is None:
            object.__setattr__(self, "rho", 0.1 if gated else 10.0 * (1.0 if self.loss == "squared" else 0.25))
        if self.adaptive_rho is None:
            object.__setattr__(self, "adaptive_rho", gated)
        if self.cg_max_iter is None:
            object.__setattr__(self, "cg_max_iter", 2 if gated else 50)
        if self.cg_tol is None:
            object.__setattr__(self, "cg_tol", 0.0 if gated else 1e-2)
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
        if self.pass_dtype not in (None, "float32"):
            raise ConfigError(f"pass_dtype {self.pass_dtype!r} is not float32 or None (X's own dtype)")
        if self.normalize_steps < 0:
            raise ConfigError(f"normalize_steps must be 0 (off) or more, got {self.normalize_steps}")
        if self.extrapolation in (1, 2) or self.extrapolation < 0:
            raise ConfigError(f"extrapolation combines 0 (off) or at least 3 dual points, got {self.extrapolation}")


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
    gap: jax.Array  # relative duality gap (gated; NaN for relu): (objective - lower_bound) / |objective|
    lower_bound: jax.Array  # the best certified lower bound on the optimum seen (gated; NaN for relu)
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
    X_pass: jax.Array  # X in the dtype of the CG steps' passes (cfg.pass_dtype)
    M_pass: jax.Array  # M in that dtype


def block_weight(X, M, axes: Axes = Axes()) -> jax.Array:
    """Mean diagonal entry of F^T F. Weighting the u = v constraint by it balances it against F u = z,
    so that (F^T F + kappa I) is well conditioned whatever the scale of X."""
    diag = psum(jnp.einsum("nc,nd->", M, jnp.square(X)), axes.rows, axes.gates)
    count = psum(jnp.asarray(M.shape[1] * X.shape[1], X.dtype), axes.gates)
    return jnp.maximum(diag / count, 1e-12)


def _system(prob: Problem, cfg: ADMMConfig, axes: Axes):
    """The u-system operator: U -> (A U, F U), A U = F^T F U + kappa U (+ X^T X U for the cone). F U comes
    along so that CG can keep F of its iterate up to date."""

    dt, low = prob.X.dtype, prob.X_pass.dtype
    signs = prob.signs.astype(low)

    def apply(U):
        FU = gr.forward(prob.X_pass, prob.M_pass, signs, U.astype(low), axes)
        out = gr.adjoint(prob.X_pass, prob.M_pass, signs, FU, axes).astype(dt) + prob.kappa * U
        if cfg.variant == "relu":
            out = out + prob.XtX @ U
        return out, FU.astype(dt)

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


def _shared(prob: Problem, cfg: ADMMConfig, axes: Axes):
    """Block-Jacobi with one eigenbasis for every gate: block i, X^T D_i X, is replaced by c_i S with S the
    mean block X^T diag(mean_i M) X and c_i = tr(X^T D_i X) / tr(S) (+ X^T X for the cone), shifted by kappa.

    Building the exact blocks costs n P d^2, d / 2 passes over X (13 s at n = 1e5, d = 128, P = 64, more than
    the whole solve); S costs n d^2 and its eigendecomposition d^3, once. Applying it is two (d x d)(d x C)
    matmuls instead of C triangular solves. Random gates through the origin cut any symmetric distribution
    in half, so c_i S is close to the exact block on such data; elsewhere it is still a valid (positive
    definite) preconditioner, only a weaker one.
    """
    X, M = prob.X, prob.M
    active_N = psum(jnp.sum(M, axis=1), axes.gates) / psum(jnp.asarray(M.shape[1], X.dtype), axes.gates)
    mean_block = psum(X.T @ (X * active_N[:, None]), axes.rows)
    traces = psum(M.T @ jnp.sum(jnp.square(X), axis=1), axes.rows)  # (C,) tr(X^T D_i X)
    scale = traces / jnp.maximum(jnp.trace(mean_block), 1e-30)
    lam, Q = jnp.linalg.eigh(mean_block)
    lam = jnp.maximum(lam, 0.0)
    if cfg.variant == "relu":  # c_i S + X^T X is not diagonal in S's basis: keep only its diagonal there
        extra = jnp.einsum("di,de,ei->i", Q, prob.XtX, Q)
    else:
        extra = jnp.zeros_like(lam)
    inverse_DxC = 1.0 / (lam[:, None] * scale[None, :] + extra[:, None] + prob.kappa)

    def solve(R):
        return Q @ (inverse_DxC * (Q.T @ R))

    return solve


def _nystrom(prob: Problem, cfg: ADMMConfig, apply, shape, key):
    """Randomized Nystrom approximation of A - I, inverted under the identity shift (single device)."""
    size = shape[0] * shape[1]
    rank = min(cfg.nystrom_rank, size)
    omega, _ = jnp.linalg.qr(jax.random.normal(key, (size, rank), prob.X.dtype))
    sketch = jax.vmap(lambda o: (apply(o.reshape(shape))[0] - prob.kappa * o.reshape(shape)).reshape(-1),
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


def _pcg(apply, precond, r0, x0, Fx0, tol, max_iter, axes: Axes):
    """Preconditioned CG from x0, whose residual r0 = b - A x0 and image F x0 the caller has, until
    ||r|| <= tol ||r0||. `apply` returns (A p, F p); F x is updated alongside x, so the caller gets F of the
    solution without another pass over X. Returns (x, F x, iterations)."""
    z0 = precond(r0)
    r0_norm = jnp.sqrt(_vdot(r0, r0, axes))

    def cond(c):
        _, _, r, _, _, _, i = c
        return (i < max_iter) & (jnp.sqrt(_vdot(r, r, axes)) > tol * r0_norm)

    def body(c):
        x, Fx, r, z, p, rz, i = c
        Ap, Fp = apply(p)
        alpha = rz / _vdot(p, Ap, axes)
        x, Fx, r = x + alpha * p, Fx + alpha * Fp, r - alpha * Ap
        z = precond(r)
        rz_new = _vdot(r, z, axes)
        return x, Fx, r, z, z + (rz_new / rz) * p, rz_new, i + 1

    x, Fx, *_, i = jax.lax.while_loop(cond, body, (x0, Fx0, r0, z0, z0, _vdot(r0, z0, axes),
                                                  jnp.zeros((), jnp.int32)))
    return x, Fx, i


# --- one iteration, step by step -------------------------------------------------------------------
# The three constraint blocks F u = z, u = v, G u = s move in lockstep through every step, so each step
# below acts on a _Stack holding one array per block. Shapes are local blocks when sharded: n rows of
# this device, C gate columns of this device.

class _Stack(NamedTuple):
    """One point of the stacked constraint space of [F; sqrt(kappa) I; G] u = [z; sqrt(kappa) v; s].

    The images of u, the copies (z, v, s) and the scaled duals (mu, lam, nu) all live here, so the
    relaxation, the dual ascent and the residual norms are written once for the three blocks.
    """

    f_N: jax.Array  # F block: predictions (n,)
    w_DxC: jax.Array  # identity block: weights (d, C)
    g_NxC: jax.Array  # cone block: (n, C) for relu, (n, 0) for gated


class _Sizes(NamedTuple):
    """Global element counts of the primal and dual residual spaces (all-reduced once, before the loop)."""

    primal: jax.Array
    dual: jax.Array


class _Sweep(NamedTuple):
    """What one iteration produced, before the diagnostics look at it."""

    image: _Stack  # [F u; u; G u] at the new u, unrelaxed: the residuals are measured there
    copies: _Stack  # the new [z; v; s]
    duals: _Stack  # the new [mu; lam; nu], still scaled by the old rho
    cg_iterations: jax.Array


class _Diagnostics(NamedTuple):
    """The outputs of a check iteration (or the last ones, carried over between checks)."""

    r_pri: jax.Array
    r_dual: jax.Array
    objective: jax.Array
    gap: jax.Array
    lower_bound: jax.Array
    cone_violation: jax.Array
    converged: jax.Array


class _Certificate(NamedTuple):
    """What the duality-gap certificate keeps between checks (gated model)."""

    history_KxN: jax.Array  # dual directions -grad loss(z) of the last K checks, newest last; (0, n) when off
    lower: jax.Array  # the best lower bound so far: every dual value is one, so the maximum is too


def _copies(st: ADMMState) -> _Stack:
    return _Stack(st.z, st.v, st.s)


def _duals(st: ADMMState) -> _Stack:
    return _Stack(st.mu, st.lam, st.nu)


def _minus(a: _Stack, b: _Stack) -> _Stack:
    return jax.tree.map(lambda x, y: x - y, a, b)


def _sq_norm(a, *axes) -> jax.Array:
    """Squared norm of a local block, all-reduced over the mesh axes it is split over."""
    return psum(jnp.sum(jnp.square(a)), *axes)


def _stack_sq_norm(p: _Stack, kappa, axes: Axes) -> jax.Array:
    """||p_f||^2 + kappa ||p_w||^2 + ||p_g||^2: the kappa-weighted norm residuals and tolerances use."""
    return _sq_norm(p.f_N, axes.rows) + kappa * _sq_norm(p.w_DxC, axes.gates) \
        + _sq_norm(p.g_NxC, axes.rows, axes.gates)


def _images(prob: Problem, cfg: ADMMConfig, u_DxC, s_like_NxC, axes: Axes, Fu_N=None) -> _Stack:
    """[F u; u; G u]: what the copies z, v, s must equal at a solution. Gated has no cone: G u is (n, 0).
    F u is computed unless given (CG tracks it)."""
    Gu_NxC = gr.cone(prob.X, prob.M, u_DxC) if cfg.variant == "relu" else jnp.zeros_like(s_like_NxC)
    Fu_N = gr.forward(prob.X, prob.M, prob.signs, u_DxC, axes) if Fu_N is None else Fu_N
    return _Stack(Fu_N, u_DxC, Gu_NxC)


def _adjoint(prob: Problem, cfg: ADMMConfig, p: _Stack, axes: Axes, in_pass_dtype: bool = False) -> jax.Array:
    """F^T p_f + kappa p_w + G^T p_g: the stacked map transposed, back in weight space (d, C).

    It is the right-hand side of the u-system and the measure of the dual residual and its tolerance.
    in_pass_dtype: F^T p_f in cfg.pass_dtype, for a norm that only has to be right to a few digits.
    """
    if in_pass_dtype:
        low = prob.X_pass.dtype
        FtP = gr.adjoint(prob.X_pass, prob.M_pass, prob.signs.astype(low), p.f_N.astype(low), axes).astype(prob.X.dtype)
    else:
        FtP = gr.adjoint(prob.X, prob.M, prob.signs, p.f_N, axes)
    out_DxC = FtP + prob.kappa * p.w_DxC
    return out_DxC + (gr.cone_adjoint(prob.X, prob.M, p.g_NxC, axes) if cfg.variant == "relu" else 0.0)


def _preconditioner(prob: Problem, cfg: ADMMConfig, apply, shape_DxC, axes: Axes):
    """The u-system does not involve rho, so its preconditioner is built once per solve, outside the loop."""
    if cfg.preconditioner == "shared":
        return _shared(prob, cfg, axes)
    if cfg.preconditioner == "jacobi":
        return _jacobi(prob, cfg, axes)
    if cfg.preconditioner == "nystrom":
        return _nystrom(prob, cfg, apply, shape_DxC, jax.random.key(0))
    return lambda R: R


def _sizes(prob: Problem, state: ADMMState, axes: Axes) -> _Sizes:
    """sqrt(size) scales the absolute tolerances (Boyd 3.3.1); counted once, since shapes do not change."""
    dt = prob.X.dtype
    dual = psum(jnp.asarray(state.u.size, dt), axes.gates)
    primal = dual + psum(jnp.asarray(state.z.size, dt), axes.rows) + psum(jnp.asarray(state.s.size, dt),
                                                                          axes.rows, axes.gates)
    return _Sizes(primal, dual)


def _u_step(prob: Problem, cfg: ADMMConfig, apply, precond, st: ADMMState, image: _Stack, axes: Axes):
    """u <- (F^T F + kappa I + G^T G)^-1 [F^T (z - mu) + kappa (v - lam) + G^T (s - nu)].

    The one coupled step: the loss and the penalty were split off to z and v, leaving a quadratic
    solved inexactly by PCG, warm-started at the last u. Its starting residual b - A u is the stacked
    adjoint of (copies - duals - image of u): one pass over X, since the image [F u; u; G u] of the last u
    is known. CG then cuts that residual by cfg.cg_tol in at most cfg.cg_max_iter steps: the ADMM
    iterations that follow keep refining the same warm-started solve, so a few steps each suffice.
    Returns (u (d, C), F u (n,), CG iterations).
    """
    r0_DxC = _adjoint(prob, cfg, _minus(_minus(_copies(st), _duals(st)), image), axes)
    return _pcg(apply, precond, r0_DxC, st.u, image.f_N, cfg.cg_tol, cfg.cg_max_iter, axes)


def _relax(cfg: ADMMConfig, image: _Stack, copies: _Stack) -> _Stack:
    """Over-relaxation (Boyd 3.4.3): alpha [F u; u; G u] + (1 - alpha) [z; v; s] stands in for the images
    in the copy and dual steps; alpha in [1.5, 1.8] often speeds convergence, 1 is plain ADMM."""
    a = cfg.relaxation
    return jax.tree.map(lambda new, old: a * new + (1 - a) * old, image, copies)


def _z_step(prob: Problem, cfg: ADMMConfig, w_N, rho) -> jax.Array:
    """z <- prox_{loss / rho}(w): the only place the loss enters, separable per sample."""
    return prox_loss(w_N, prob.y, rho, cfg)


def _v_step(prob: Problem, cfg: ADMMConfig, w_DxC, rho) -> jax.Array:
    """v <- prox of beta sum_i ||v_i|| under the kappa-weighted penalty rho kappa / 2 ||v - w||^2.

    It zeroes whole gate columns, which makes v (not u) the group-sparse solution.
    """
    return group_soft_threshold(w_DxC, cfg.beta / (rho * prob.kappa))


def _s_step(w_NxC) -> jax.Array:
    """s <- max(0, w): the projection onto s >= 0, so the relu cone G u >= 0 is held by the copy."""
    return jnp.maximum(0.0, w_NxC)


def _copy_step(prob: Problem, cfg: ADMMConfig, relaxed: _Stack, duals: _Stack, rho) -> _Stack:
    """The copies, each the prox of its own term at relaxed image + scaled dual: the three are separable."""
    w = jax.tree.map(lambda x, y: x + y, relaxed, duals)
    return _Stack(_z_step(prob, cfg, w.f_N, rho), _v_step(prob, cfg, w.w_DxC, rho), _s_step(w.g_NxC))


def _dual_step(duals: _Stack, relaxed: _Stack, copies: _Stack) -> _Stack:
    """Scaled dual ascent: each dual accumulates its block's constraint violation, relaxed image - copy."""
    return jax.tree.map(lambda d, r, c: d + r - c, duals, relaxed, copies)


def _iterate(prob: Problem, cfg: ADMMConfig, apply, precond, st: ADMMState, image: _Stack, axes: Axes) -> _Sweep:
    """One ADMM iteration from `st` whose u has the given image: the u-solve, over-relaxation, the copies'
    prox steps, the dual ascent."""
    u_DxC, Fu_N, cg_iterations = _u_step(prob, cfg, apply, precond, st, image, axes)
    image = _images(prob, cfg, u_DxC, st.s, axes, Fu_N)
    relaxed = _relax(cfg, image, _copies(st))
    copies = _copy_step(prob, cfg, relaxed, _duals(st), st.rho)
    return _Sweep(image, copies, _dual_step(_duals(st), relaxed, copies), cg_iterations)


# --- diagnostics, rho, stopping ----------------------------------------------------------------------

def _residuals(prob: Problem, cfg: ADMMConfig, st: ADMMState, sweep: _Sweep, axes: Axes):
    """Primal residual: how far the images are from the copies; dual residual: rho times how far the
    copies moved, mapped back to weight space (Boyd 3.3). Both vanish at a fixed point of the iteration."""
    r_pri = jnp.sqrt(_stack_sq_norm(_minus(sweep.image, sweep.copies), prob.kappa, axes))
    moved_DxC = _adjoint(prob, cfg, _minus(sweep.copies, _copies(st)), axes, in_pass_dtype=True)
    r_dual = st.rho * jnp.sqrt(_sq_norm(moved_DxC, axes.gates))
    return r_pri, r_dual


def _tolerances(prob: Problem, cfg: ADMMConfig, sizes: _Sizes, rho, sweep: _Sweep, axes: Axes):
    """eps_pri, eps_dual (Boyd 3.3.1): absolute per element plus relative to the larger side of each
    residual (the duals for the dual one), so the test does not depend on the scale of the data."""
    eps_pri = jnp.sqrt(sizes.primal) * cfg.abs_tol + cfg.rel_tol * jnp.sqrt(jnp.maximum(
        _stack_sq_norm(sweep.image, prob.kappa, axes), _stack_sq_norm(sweep.copies, prob.kappa, axes)))
    eps_dual = jnp.sqrt(sizes.dual) * cfg.abs_tol + cfg.rel_tol * rho * jnp.sqrt(
        _sq_norm(_adjoint(prob, cfg, sweep.duals, axes, in_pass_dtype=True), axes.gates))
    return eps_pri, eps_dual


def _primal_objective(prob: Problem, cfg: ADMMConfig, sweep: _Sweep, axes: Axes) -> jax.Array:
    """The objective at the iterate its model can use: v for gated (exactly group-sparse, the better
    primal point), u for relu (the one the cone constraint is measured on)."""
    if cfg.variant == "relu":
        return gr.loss_value(sweep.image.f_N, prob.y, cfg.loss, axes) + gr.penalty(sweep.image.w_DxC, cfg.beta, axes)
    return gr.objective(prob.X, prob.y, prob.M, prob.signs, sweep.copies.w_DxC, cfg.beta, cfg.loss, axes)


def _extrapolated(history_KxN, axes: Axes) -> jax.Array:
    """Dual extrapolation (Massias, Gramfort & Salmon 2018, "Celer"): near the solution the dual directions
    of successive checks follow a linear recursion, so the affine combination sum_k c_k theta_k (sum c = 1)
    that minimizes the norm of the combined differences lands much closer to theta* than the newest point.
    The residual-derived point is off by O(||theta - theta*||) after the feasibility scaling, which makes
    the plain gap decay like the square root of the suboptimality; the extrapolated one does not."""
    diffs_KxN = jnp.diff(history_KxN, axis=0)
    gram_KxK = psum(diffs_KxN @ diffs_KxN.T, axes.rows)
    ridge = 1e-10 * jnp.trace(gram_KxK) + jnp.finfo(gram_KxK.dtype).tiny
    coef = jnp.linalg.solve(gram_KxK + ridge * jnp.eye(gram_KxK.shape[0], dtype=gram_KxK.dtype),
                            jnp.ones(gram_KxK.shape[0], gram_KxK.dtype))
    return (coef / jnp.sum(coef)) @ history_KxN[1:]


def _normalized(prob: Problem, cfg: ADMMConfig, theta_N, Ft_theta_DxC, v_DxC, axes: Axes) -> jax.Array:
    """theta moved onto the boundary of every active constraint: a dual point whose gap falls like the
    suboptimality instead of its square root.

    The constraints are ||F_i^T theta|| <= beta. Near the optimum, theta's error e makes the active groups'
    ||F_i^T theta|| miss beta by O(e), and the uniform feasibility scaling then loses O(e). With g_i = v_i /
    ||v_i|| (v's active directions) and Z_i = F_i g_i, the step theta + sum_i t_i Z_i with K t = beta -
    ||F^T theta|| (K = Z^T Z, the Jacobian of those norms up to O(e)) puts them at beta up to O(e^2); each
    further step (cfg.normalize_steps) squares what is left, for one exact pass over X.

    Z and K are computed in the passes' dtype: t is O(e), so their rounding moves theta by O(1e-7 e). The
    norms, differences from beta of nearly equal numbers, come from exact passes; the bound computed from the
    result is exact whatever theta is.
    """
    dt, low = theta_N.dtype, prob.X_pass.dtype
    norms = gr.group_norms(v_DxC)
    active_C = norms > 0
    g_DxC = v_DxC * jnp.where(active_C, 1.0 / jnp.maximum(norms, 1e-300), 0.0)
    Z_NxC = prob.M_pass * (prob.X_pass @ g_DxC.astype(low)) * prob.signs.astype(low)

    def gathered(x, axis=0):  # K couples every pair of gates: gather the columns (n_local x C_total)
        return jax.lax.all_gather(x, axes.gates, axis=axis, tiled=True) if axes.gates else x

    Z_NxC, active_C = gathered(Z_NxC, axis=1), gathered(active_C)
    K_CxC = psum(Z_NxC.T @ Z_NxC, axes.rows).astype(dt)
    both = active_C[:, None] & active_C[None, :]
    ridge = 1e-12 * jnp.maximum(jnp.trace(K_CxC), 1e-300)
    K_CxC = jnp.where(both, K_CxC, 0.0) + jnp.where(active_C, ridge, 1.0) * jnp.eye(K_CxC.shape[0], dtype=dt)
    theta = theta_N
    for step in range(cfg.normalize_steps):
        Ft = Ft_theta_DxC if step == 0 else gr.adjoint(prob.X, prob.M, prob.signs, theta, axes)
        t_C = jnp.linalg.solve(K_CxC, jnp.where(active_C, cfg.beta - gathered(gr.group_norms(Ft)), 0.0))
        theta = theta + (Z_NxC @ t_C.astype(low)).astype(dt)
    return theta


def _normalize_now(cfg: ADMMConfig, primal, lower) -> jax.Array:
    """Whether the normalized dual point is worth its passes at this check. The plain point's gap is about
    the square root of the suboptimality (0.1-1.0 x in every benchmark cell), the normalized one's 1-15 x the
    suboptimality, so it can only certify gap_tol once the plain gap is within ~sqrt(gap_tol): with a 3x
    margin, it waits until then (always on when the run does not stop on the gap)."""
    if cfg.gap_tol <= 0:
        return jnp.asarray(True)
    return (primal - lower) <= 3.0 * cfg.gap_tol ** 0.5 * jnp.abs(primal)


def _certify(prob: Problem, cfg: ADMMConfig, cert: _Certificate, z_N, v_DxC, primal, axes: Axes) -> _Certificate:
    """The best lower bound so far, improved by the dual point -grad loss(z) (z is ADMM's copy of F u: its
    scaled dual rho mu equals grad loss(z) exactly), by that point normalized onto the active constraints
    and by its extrapolation over the last checks, each scaled optimally within feasibility (gr.dual_bound)."""
    bound = functools.partial(gr.dual_bound, prob.X, prob.y, prob.M, prob.signs, beta=cfg.beta, loss=cfg.loss,
                              axes=axes)
    theta_N = gr.dual_direction(z_N, prob.y, cfg.loss)
    theta_N = gr.dual_domain(theta_N, prob.y, cfg.loss)
    Ft_theta_DxC = gr.adjoint(prob.X, prob.M, prob.signs, theta_N, axes)
    lower = jnp.maximum(cert.lower, gr.dual_bound_given(Ft_theta_DxC, prob.y, theta_N, cfg.beta, cfg.loss, axes))
    if cfg.normalize_steps:
        normalized = jax.lax.cond(_normalize_now(cfg, primal, lower),
                                  lambda: bound(_normalized(prob, cfg, theta_N, Ft_theta_DxC, v_DxC, axes)),
                                  lambda: jnp.asarray(-jnp.inf, lower.dtype))
        lower = jnp.where(jnp.isfinite(normalized), jnp.maximum(lower, normalized), lower)
    if cfg.extrapolation == 0:
        return _Certificate(cert.history_KxN, lower)
    history_KxN = jnp.concatenate([cert.history_KxN[1:], theta_N[None]])
    extrapolated = bound(_extrapolated(history_KxN, axes))
    # K checks recorded (a dual direction is never all 0); decided on the all-reduced norms, so that every row
    # shard takes the same branch even if its own rows of one direction happen to be 0
    full = jnp.all(psum(jnp.sum(jnp.abs(history_KxN), axis=1), axes.rows) > 0)
    lower = jnp.where(full & jnp.isfinite(extrapolated), jnp.maximum(lower, extrapolated), lower)
    return _Certificate(history_KxN, lower)


def _initial_certificate(cfg: ADMMConfig, n: int, dt) -> _Certificate:
    return _Certificate(jnp.zeros((cfg.extrapolation, n), dt), jnp.asarray(-jnp.inf, dt))


def _cone_violation(prob: Problem, cfg: ADMMConfig, image: _Stack, axes: Axes) -> jax.Array:
    """max(0, -G u) relative to max |X u|: how far the relu iterate is from a real ReLU network (0 gated)."""
    if cfg.variant != "relu":
        return jnp.zeros((), prob.X.dtype)
    scale = jnp.maximum(gr.pmax(jnp.max(jnp.abs(prob.X @ image.w_DxC)), axes.rows, axes.gates), 1e-30)
    return jnp.maximum(gr.pmax(jnp.max(-image.g_NxC), axes.rows, axes.gates), 0.0) / scale


def _stops_on_gap(cfg: ADMMConfig) -> bool:
    return cfg.variant == "gated" and cfg.gap_tol > 0


def _converged(cfg: ADMMConfig, gap, r_pri, r_dual, eps_pri, eps_dual) -> jax.Array:
    """The gated model stops on its duality gap when gap_tol > 0: a certificate of optimality, the
    stronger test. Otherwise both residuals must be within their tolerances."""
    if _stops_on_gap(cfg):
        return gap <= cfg.gap_tol
    return (r_pri <= eps_pri) & (r_dual <= eps_dual)


def _diagnose(prob: Problem, cfg: ADMMConfig, sizes: _Sizes, st: ADMMState, sweep: _Sweep, cert: _Certificate,
              target, stop, it, axes: Axes) -> tuple[_Diagnostics, _Certificate]:
    """Residuals, objective, duality gap and cone violation after one iteration from `st`; converged when
    the stopping test holds, the objective is at most `target` (a known optimum, say) or the caller's
    `stop(objective, lower_bound, iterations)` says so. The residual tolerances are computed only where
    they decide the stop (one pass over X saved otherwise)."""
    r_pri, r_dual = _residuals(prob, cfg, st, sweep, axes)
    primal = _primal_objective(prob, cfg, sweep, axes)
    if cfg.variant == "gated":
        cert = _certify(prob, cfg, cert, sweep.copies.f_N, sweep.copies.w_DxC, primal, axes)
        lower, gap = cert.lower, (primal - cert.lower) / jnp.maximum(jnp.abs(primal), 1e-30)
    else:
        lower = gap = jnp.asarray(jnp.nan, prob.X.dtype)
    if _stops_on_gap(cfg):
        converged = gap <= cfg.gap_tol
    else:
        converged = _converged(cfg, gap, r_pri, r_dual, *_tolerances(prob, cfg, sizes, st.rho, sweep, axes))
    converged = converged | (primal <= target)
    if stop is not None:
        converged = converged | jnp.asarray(stop(primal, lower, it), bool)
    return _Diagnostics(r_pri, r_dual, primal, gap, lower, _cone_violation(prob, cfg, sweep.image, axes),
                        converged), cert


def _carried(info: SolveInfo) -> _Diagnostics:
    """Between checks the last diagnostics are reported again, and never as converged."""
    return _Diagnostics(info.primal_residual, info.dual_residual, info.objective, info.gap, info.lower_bound,
                        info.cone_violation, jnp.asarray(False))


def _is_check(cfg: ADMMConfig, it) -> jax.Array:
    """The diagnostics cost about as much as an iteration: run them every check_every iterations, and
    on the last one, so that the caller always gets final values."""
    return (it % cfg.check_every == 0) | (it >= cfg.max_iter)


def _status(cfg: ADMMConfig, check, it, diag: _Diagnostics) -> jax.Array:
    """DIVERGED before CONVERGED before MAX_ITER: non-finite diagnostics must stop the loop whatever else holds."""
    diverged = check & (~jnp.isfinite(diag.r_pri) | ~jnp.isfinite(diag.r_dual) | ~jnp.isfinite(diag.objective))
    status = jnp.where(diverged, DIVERGED, jnp.where(diag.converged, CONVERGED,
                                                      jnp.where(it >= cfg.max_iter, MAX_ITER, RUNNING)))
    return status.astype(jnp.int32)


def _balance_rho(cfg: ADMMConfig, check, k, diag: _Diagnostics, rho, duals: _Stack, dt):
    """Residual balancing (Boyd 3.4.1): double rho when the primal residual dominates by cfg.balance,
    halve it when the dual one does, and rescale the scaled duals so the unscaled ones are unchanged.
    Only every rho_period iterations (k counts iterations done), so it cannot oscillate."""
    if not cfg.adaptive_rho:
        return rho, duals
    balance_now = check & (k % cfg.rho_period == 0)
    up = balance_now & (diag.r_pri > cfg.balance * diag.r_dual)
    down = balance_now & (diag.r_dual > cfg.balance * diag.r_pri)
    factor = jnp.where(up, 2.0, jnp.where(down, 0.5, 1.0)).astype(dt)
    return rho * factor, jax.tree.map(lambda d: d / factor, duals)


def _next_state(sweep: _Sweep, rho, duals: _Stack, k) -> ADMMState:
    return ADMMState(u=sweep.image.w_DxC, v=sweep.copies.w_DxC, lam=duals.w_DxC, z=sweep.copies.f_N,
                     mu=duals.f_N, s=sweep.copies.g_NxC, nu=duals.g_NxC, rho=rho, k=k)


def _next_info(info: SolveInfo, it, cg_iterations, diag: _Diagnostics, status) -> SolveInfo:
    return SolveInfo(it, info.cg_iterations + cg_iterations, diag.r_pri, diag.r_dual, diag.objective, diag.gap,
                     diag.lower_bound, diag.cone_violation, status)


def _initial_info(dt) -> SolveInfo:
    zero = jnp.zeros((), dt)
    return SolveInfo(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), zero, zero, zero, zero, zero, zero,
                     jnp.asarray(RUNNING, jnp.int32))


# --- the solve loop --------------------------------------------------------------------------------

def solve_local(prob: Problem, state: ADMMState, cfg: ADMMConfig, axes: Axes = Axes(),
                target=None, stop=None) -> tuple[ADMMState, SolveInfo]:
    """Up to cfg.max_iter ADMM iterations from `state` (warm start) on local blocks.

    `target` (optional, traced): also stop once the objective is at most this value, e.g. a known optimum
    times (1 + tolerance). `stop` (optional): a JAX-traceable callback stop(objective, lower_bound,
    iterations) -> bool, evaluated at every check on global values (so every shard agrees); the run stops
    when it returns True. The operator, its preconditioner and the problem sizes are loop-invariant: built
    once, outside the loop; the image of u is carried between iterations (CG keeps F u up to date).
    """
    dt = prob.X.dtype
    apply = _system(prob, cfg, axes)
    precond = _preconditioner(prob, cfg, apply, state.u.shape, axes)
    sizes = _sizes(prob, state, axes)
    target = jnp.asarray(-jnp.inf if target is None else target, dt)

    def step(carry):
        st, info, image, cert = carry
        sweep = _iterate(prob, cfg, apply, precond, st, image, axes)
        it, k = info.iterations + 1, st.k + 1
        check = _is_check(cfg, it)
        diag, cert = jax.lax.cond(check, lambda: _diagnose(prob, cfg, sizes, st, sweep, cert, target, stop, it, axes),
                                  lambda: (_carried(info), cert))
        rho, duals = _balance_rho(cfg, check, k, diag, st.rho, sweep.duals, dt)
        status = _status(cfg, check, it, diag)
        image = sweep.image
        if prob.X_pass.dtype != dt:  # CG kept F u up to date in the passes' precision: make it exact again
            image = jax.lax.cond(check, lambda: _images(prob, cfg, image.w_DxC, st.s, axes), lambda: image)
        return (_next_state(sweep, rho, duals, k), _next_info(info, it, sweep.cg_iterations, diag, status),
                image, cert)

    start = (state, _initial_info(dt), _images(prob, cfg, state.u, state.s, axes),
             _initial_certificate(cfg, state.z.shape[0], dt))
    state, info, _, _ = jax.lax.while_loop(lambda c: c[1].status == RUNNING, step, start)
    return state, info


def _state_specs(axes: Axes) -> ADMMState:
    g, r = axes.gates, axes.rows
    return ADMMState(u=P(None, g), v=P(None, g), lam=P(None, g), z=P(r), mu=P(r), s=P(r, g), nu=P(r, g),
                     rho=P(), k=P())


def sharded_solve(cfg: ADMMConfig, mesh=None, axes: Axes = Axes(), stop=None):
    """solve(X, y, M, signs, state, target) -> (state, info), not jitted: under `jax.shard_map` over `mesh`
    (a Mesh, an AbstractMesh, or None for the mesh set by `jax.set_mesh` when called inside a traced
    function) with gate columns split over axes.gates and rows over axes.rows; plain single-device code
    when no axis is named. `stop`: see solve_local."""
    if cfg.preconditioner == "nystrom" and axes.gates:
        raise ConfigError("the nystrom preconditioner needs all gates on one device; "
                          "use shared or jacobi with gate sharding")

    def solve(X, y, M, signs, state, target):
        XtX = psum(X.T @ X, axes.rows) if cfg.variant == "relu" else jnp.zeros((0, 0), X.dtype)
        low = jnp.dtype(cfg.pass_dtype or X.dtype)
        prob = Problem(X, y, M, signs, XtX, block_weight(X, M, axes), X.astype(low), M.astype(low))
        return solve_local(prob, state, cfg, axes, target, stop)

    if not (axes.gates or axes.rows):
        return solve
    g, r = axes.gates, axes.rows
    return jax.shard_map(solve, mesh=mesh, in_specs=(P(r, None), P(r), P(r, g), P(g), _state_specs(axes), P()),
                         out_specs=(_state_specs(axes), SolveInfo(*[P()] * len(SolveInfo._fields))),
                         check_vma=False)


def make_solver(cfg: ADMMConfig, mesh: jax.sharding.Mesh | None = None, axes: Axes = Axes(), stop=None):
    """jit(solve(X, y, M, signs, state, target=-inf) -> (state, info)); under shard_map when a mesh is given.

    X (n, d), y (n,) as +-1, M (n, C) masks (duplicated for relu), signs (C,); the run also stops once the
    objective is at most `target` (a known optimum, say), or when the callback `stop(objective, lower_bound,
    iterations)` (JAX-traceable, summed-loss scaling) returns True at a check.
    """
    solve = sharded_solve(cfg, mesh, axes if mesh is not None else Axes(), stop)

    def solve_until(X, y, M, signs, state, target=-jnp.inf):
        return solve(X, y, M, signs, state, jnp.asarray(target, X.dtype))

    return jax.jit(solve_until)
