"""The convex two-layer ReLU network by ADMM: optimality against cvxpy (Clarabel), the duality-gap
certificate, sharding invariance, warm starts inside jit, bad input."""

import cvxpy as cp
import jax.numpy as jnp
import numpy as np
import pytest

from cvxdpo import mesh as mesh_lib
from cvxdpo.convex import admm
from cvxdpo.convex import gated_relu as gr
from cvxdpo.convex.classifier import ConvexReLUClassifier
from cvxdpo.errors import ConfigError, DataError

N, D, P, BETA = 200, 10, 50, 1.0


def problem(seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, D))
    y = np.sign(X @ rng.standard_normal(D) + 0.5 * rng.standard_normal(N))  # learnable, not separable
    return X, y


def cvxpy_optimum(clf, X, y):
    """The same problem written independently in cvxpy, solved by Clarabel."""
    M = np.asarray(gr.masks(jnp.asarray(X), clf.gates_))
    U = cp.Variable((D, P))
    if clf.variant == "gated":
        f, reg, cons = cp.sum(cp.multiply(M, X @ U), axis=1), cp.sum(cp.norm(U, 2, axis=0)), []
    else:
        V = cp.Variable((D, P))
        f = cp.sum(cp.multiply(M, X @ (U - V)), axis=1)
        reg = cp.sum(cp.norm(U, 2, axis=0)) + cp.sum(cp.norm(V, 2, axis=0))
        cons = [cp.multiply(2 * M - 1, X @ U) >= 0, cp.multiply(2 * M - 1, X @ V) >= 0]
    loss = 0.5 * cp.sum_squares(f - y) if clf.loss == "squared" else cp.sum(cp.logistic(-cp.multiply(y, f)))
    prob = cp.Problem(cp.Minimize(loss + BETA * reg), cons)
    try:
        prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    except cp.error.SolverError:  # the cone + exponential-cone problem can fail at those tolerances
        prob.solve(solver=cp.CLARABEL)
    return prob.value


@pytest.mark.parametrize("loss", ["squared", "logistic"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gated_relu_reaches_the_global_optimum(loss, seed):
    X, y = problem(seed)
    clf = ConvexReLUClassifier(num_gates=P, beta=BETA, loss=loss, seed=seed, gap_tol=5e-7).fit(X, y)
    assert admm.STATUS[int(clf.info_.status)] == "converged"
    optimum = cvxpy_optimum(clf, X, y)
    assert abs(clf.objective() - optimum) <= 1e-6 * abs(optimum)
    assert 0 <= clf.duality_gap() <= 1e-6  # certified without the other solver


@pytest.mark.parametrize("loss", ["squared", "logistic"])
def test_gated_relu_in_float32_reaches_the_cvxpy_optimum(loss):
    """The same problem with float32 data: the solve runs in float32 (2 CG steps, the normalized dual
    point) and certifies a 1e-5 relative gap, about 100 float32 epsilons: the objective's 200-row sums round
    at a few 1e-7, which leaves a 1e-6 certificate little room. Its weights, scored in float64, are within
    the certified 1e-5 of Clarabel's optimum (measured 3e-10: the float32 certificate is the loose part)."""
    X, y = problem(0)
    clf = ConvexReLUClassifier(num_gates=P, beta=BETA, loss=loss, gap_tol=1e-5).fit(X.astype(np.float32), y)
    assert clf.weights_.dtype == jnp.float32 and admm.STATUS[int(clf.info_.status)] == "converged"
    assert 0 <= clf.duality_gap() <= 1e-5
    optimum = cvxpy_optimum(clf, X, y)
    Xj = jnp.asarray(X)
    scored = float(gr.objective(Xj, jnp.asarray(y), gr.masks(Xj, clf.gates_.astype(jnp.float64)), jnp.ones(P),
                                jnp.asarray(clf.weights_, jnp.float64), BETA, loss))
    assert abs(scored - optimum) <= 1e-5 * abs(optimum)


@pytest.mark.parametrize("loss", ["squared", "logistic"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_relu_matches_cvxpy_and_its_recovered_network(loss, seed):
    X, y = problem(seed)
    clf = ConvexReLUClassifier(num_gates=P, beta=BETA, loss=loss, variant="relu", seed=seed, max_iter=6000).fit(X, y)
    optimum = cvxpy_optimum(clf, X, y)
    assert abs(clf.objective() - optimum) <= 1e-3 * abs(optimum)
    assert float(clf.info_.cone_violation) < 1e-5
    W1, w2 = clf.to_relu_network()
    f = np.maximum(X @ W1, 0) @ w2
    yy = np.where(y > 0, 1.0, -1.0)
    fit = 0.5 * np.sum((f - yy) ** 2) if loss == "squared" else np.sum(np.logaddexp(0, -yy * f))
    nonconvex = fit + BETA / 2 * (np.sum(W1**2) + np.sum(w2**2))
    assert abs(nonconvex - clf.objective()) <= 1e-3 * abs(clf.objective())


def test_recovered_gated_network_reproduces_the_convex_model():
    X, y = problem(3)
    clf = ConvexReLUClassifier(num_gates=P, beta=BETA, loss="logistic").fit(X, y)
    W1, w2 = clf.to_relu_network()
    U = np.asarray(clf.weights_)
    active = np.linalg.norm(U, axis=0) > 0
    gates = np.asarray(clf.gates_)[:, active]
    f = ((X @ gates >= 0) * (X @ W1)) @ w2
    np.testing.assert_allclose(f, clf.decision_function(X), rtol=1e-9, atol=1e-9)
    assert BETA / 2 * (np.sum(W1**2) + np.sum(w2**2)) == pytest.approx(BETA * np.linalg.norm(U, axis=0).sum())
    assert (clf.predict(X) == np.where(clf.decision_function(X) > 0, 1, -1)).all()


@pytest.mark.parametrize("shape, rows", [("1,1,8", None), ("2,1,4", "data")], ids=["gates-8", "gates-4-rows-2"])
@pytest.mark.parametrize("loss, preconditioner, pass_dtype, tol", [
    ("squared", "jacobi", None, 1e-7), ("logistic", "shared", None, 1e-7), ("logistic", "shared", "float32", 1e-5)])
def test_sharded_iterates_equal_one_device(shape, rows, loss, preconditioner, pass_dtype, tol):
    X, y = problem(4)
    kwargs = dict(num_gates=64, beta=BETA, loss=loss, max_iter=60, gap_tol=0.0, preconditioner=preconditioner,
                  pass_dtype=pass_dtype)
    one = ConvexReLUClassifier(**kwargs).fit(X, y)
    many = ConvexReLUClassifier(**kwargs, mesh=mesh_lib.make_mesh(shape), gate_axis="tensor", row_axis=rows).fit(X, y)
    assert int(many.info_.iterations) == int(one.info_.iterations) == 60
    # The runs differ only by the order of the all-reduces' sums, which each run then amplifies. Measured on
    # one device, X changed by 1 ulp moves mu by 1e-14 (logistic), 1.2e-7 (squared, jacobi) and 2.6e-4
    # (squared, shared: its eigenbasis rounds differently), so the squared loss is compared under jacobi.
    # Exact passes: the sharded runs differ by 6.0e-8 in mu and 2.0e-8 in z (squared), 1.6e-15 (logistic).
    # float32 CG passes round each all-reduce at 1e-7 instead of 1e-16: the sharded runs differ by up to
    # 3.4e-6 (z), the size of a 1-ulp change of X on one device (1.7e-6). A missing or doubled all-reduce
    # moves them by O(1e-3) or more.
    for name in ("u", "v", "z", "mu", "lam"):
        a, b = np.asarray(getattr(one.state_, name)), np.asarray(getattr(many.state_, name))
        assert np.abs(a - b).max() <= tol * max(np.abs(a).max(), 1.0), name
    # the certificate's normalized dual point gathers every gate's column and sums over row shards
    assert abs(float(many.info_.lower_bound) - float(one.info_.lower_bound)) <= tol * abs(float(one.info_.lower_bound))


def test_warm_start_inside_jit_and_one_compilation():
    X, y = problem(5)
    cfg = admm.ADMMConfig(loss="logistic", beta=BETA, max_iter=20_000, gap_tol=1e-6)
    solver = admm.make_solver(cfg)
    gates = gr.sample_gates(0, D, P, jnp.float64)

    def run(X, state):
        Xj = jnp.asarray(X)
        return solver(Xj, jnp.asarray(y), gr.masks(Xj, gates), jnp.ones(P), state)

    cold_state, cold = run(X, admm.init_state(N, D, P, "gated", cfg.rho, jnp.float64))
    X2 = X + 1e-3 * np.random.default_rng(9).standard_normal(X.shape)  # the data change slightly
    _, warm = run(X2, cold_state)
    _, cold2 = run(X2, admm.init_state(N, D, P, "gated", cfg.rho, jnp.float64))
    assert int(warm.status) == int(cold2.status) == admm.CONVERGED
    # Measured: 3370 warm vs 5007 cold iterations to a 1e-6 gap; ADMM's slow tail, not the start, dominates.
    assert int(warm.iterations) <= 0.8 * int(cold2.iterations)
    assert solver._cache_size() == 1  # one compilation for the fixed shape, whatever the data and state


def test_normalized_dual_point_certifies_what_the_iterate_reached():
    """Stopped at 1e-7 of the optimum, the plain dual point (the residual, scaled into feasibility)
    certifies about the square root of that (measured 2.7e-4); the normalized one, moved onto the active
    constraints, certifies within a small factor of it (measured 4.9e-7 after one Newton step, 2.4e-7 after
    the default two, at 9.3e-8), from the same iterate."""
    X, y = problem(0)
    Xj = jnp.asarray(X)
    args = (Xj, jnp.asarray(y), gr.masks(Xj, gr.sample_gates(0, D, P, jnp.float64)), jnp.ones(P))
    state = admm.init_state(N, D, P, "gated", 0.1, jnp.float64)
    _, reference = admm.make_solver(admm.ADMMConfig(beta=BETA, max_iter=50_000, gap_tol=1e-12))(*args, state)
    f_star = float(reference.objective)
    # stops on the target only (gap_tol=0 also keeps the normalized point on at every check)
    config = dict(beta=BETA, max_iter=50_000, gap_tol=0.0, abs_tol=0.0, rel_tol=0.0)
    runs = {on: admm.make_solver(admm.ADMMConfig(**config, normalize_steps=2 if on else 0))(
        *args, state, f_star * (1 + 1e-7))[1] for on in (True, False)}
    assert int(runs[True].iterations) == int(runs[False].iterations)  # the certificate does not steer the run
    subopt = (float(runs[True].objective) - f_star) / f_star
    assert 0 < subopt <= 1e-7 < 100 * subopt < float(runs[False].gap)
    assert subopt <= float(runs[True].gap) <= 5 * subopt


def test_callback_stop_ends_the_run_at_the_first_check_it_allows():
    """stop(objective, lower_bound, iterations) is the benchmark contract's hook: a callback that asks for a
    1e-4 gap stops where gap_tol=1e-4 does, and one on the iteration count at that count."""
    X, y = problem(7)
    Xj = jnp.asarray(X)
    args = (Xj, jnp.asarray(y), gr.masks(Xj, gr.sample_gates(0, D, P, jnp.float64)), jnp.ones(P))
    cfg = admm.ADMMConfig(beta=BETA, max_iter=5000, gap_tol=0.0)
    state = admm.init_state(N, D, P, "gated", cfg.rho, jnp.float64)
    _, by_gap = admm.make_solver(admm.ADMMConfig(beta=BETA, max_iter=5000, gap_tol=1e-4))(*args, state)
    _, by_callback = admm.make_solver(cfg, stop=lambda objective, lower, it: objective - lower <= 1e-4 * objective)(
        *args, state)
    assert int(by_callback.status) == admm.CONVERGED and 0 < float(by_callback.gap) <= 1e-4
    assert int(by_callback.iterations) == int(by_gap.iterations) > 20
    _, at_20 = admm.make_solver(cfg, stop=lambda objective, lower, it: it >= 20)(*args, state)
    assert int(at_20.iterations) == 20 and int(at_20.status) == admm.CONVERGED


# --- bad input ---------------------------------------------------------------------------------

def test_bad_input_is_a_clear_error():
    X, y = problem(6)
    clf = ConvexReLUClassifier(num_gates=8, beta=BETA, max_iter=5)
    bad = X.copy()
    bad[3, 2] = np.nan
    with pytest.raises(DataError, match="X holds 1 NaN or infinite values"):
        clf.fit(bad, y)
    with pytest.raises(DataError, match=r"y has shape \(199,\) but X has 200 rows"):
        clf.fit(X, y[:-1])
    with pytest.raises(DataError, match=r"labels must be \+-1 or 0/1"):
        clf.fit(X, y * 2)
    with pytest.raises(DataError, match="all labels are 1"):
        clf.fit(X, np.ones(N))
    with pytest.raises(ConfigError, match="convex beta must be positive, got 0"):
        ConvexReLUClassifier(beta=0.0).fit(X, y)
    with pytest.raises(ConfigError, match="num_gates=50 is not divisible by the mesh's tensor axis of size 8"):
        ConvexReLUClassifier(num_gates=50, mesh=mesh_lib.make_mesh("1,1,8")).fit(X, y)


def test_zero_one_labels_equal_pm1_labels():
    X, y = problem(7)
    a = ConvexReLUClassifier(num_gates=16, beta=BETA, loss="logistic").fit(X, y)
    b = ConvexReLUClassifier(num_gates=16, beta=BETA, loss="logistic").fit(X, (y > 0).astype(int))
    np.testing.assert_allclose(a.decision_function(X), b.decision_function(X))
    assert set(np.unique(b.predict(X))) <= {0, 1}


def test_diverging_run_stops_and_says_so():
    X, y = problem(8)
    with pytest.raises(DataError, match="ADMM diverged"):
        ConvexReLUClassifier(num_gates=8, beta=BETA).fit(X * 1e200, y)


@pytest.mark.parametrize("preconditioner", ["none", "jacobi", "nystrom"])
def test_every_preconditioner_reaches_the_same_optimum(preconditioner):
    X, y = problem(10)
    reference = ConvexReLUClassifier(num_gates=P, beta=BETA, gap_tol=1e-6).fit(X, y)
    other = ConvexReLUClassifier(num_gates=P, beta=BETA, gap_tol=1e-6, preconditioner=preconditioner).fit(X, y)
    assert admm.STATUS[int(other.info_.status)] == "converged"
    assert abs(other.objective() - reference.objective()) <= 2e-6 * reference.objective()
