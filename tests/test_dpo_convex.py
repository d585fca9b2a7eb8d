"""DPO-Convex end to end: the in-step ADMM refit reaches an independent solver's optimum on the buffer's own
standardization, no second copy of the policy, exact resume with the convex state, mesh invariance, learning
on the tutor pairs, and an anchor that measurably changes the gradient against reference-free DPO. The
controls (linear probe, shuffled and constant margins) are what they claim to be."""

import dataclasses

import cvxpy as cp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvxdpo import losses
from cvxdpo import mesh as mesh_lib
from cvxdpo.train import anchor, objectives
from cvxdpo.train import step as step_lib
from cvxdpo.train.logs import read_metrics
from cvxdpo.train.state import TrainState
from cvxdpo.train.trainer import Trainer
from tiny_config import get_config, losses_on_one_device_and_2x2x2


def _config(pairs, **train):
    c = get_config(pairs)
    c.train.update(method="dpo_convex", **train)
    c.anchor.update(buffer=16, refresh_every=2, admm_iters=60)
    return c


def _as_float64(state: anchor.AnchorState) -> anchor.AnchorState:
    """The anchor's float arrays in float64, so that its refit can be held to an independent solver's 1e-4."""
    return jax.tree.map(lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, state)


def _drifting_batches(rng, pairs, dim):
    """Two batches of raw features on different scales (the policy drifted between them), each with chosen rows
    shifted from rejected ones, and badly scaled feature columns, so that only a fit on the buffer's own
    standardization is the problem written below."""
    columns = np.geomspace(0.1, 10.0, dim)
    batches = []
    for drift in (1.0, 3.0):
        f = rng.standard_normal((pairs, 2, dim))
        f[:, 0] += 0.7
        batches.append(f * columns * drift + 5.0 * drift)
    return batches


def _cvxpy_gated_optimum(X, y, gates, penalty):
    """min sum_j log(1 + exp(-y_j f_j)) + penalty * sum_i ||u_i||, f = sum_i 1[X h_i >= 0] X u_i, by Clarabel."""
    M = (X @ gates >= 0).astype(float)
    U = cp.Variable(gates.shape)
    f = cp.sum(cp.multiply(M, X @ U), axis=1)
    problem = cp.Problem(cp.Minimize(cp.sum(cp.logistic(-cp.multiply(y, f))) + penalty * cp.sum(cp.norm(U, 2, axis=0))))
    problem.solve(solver=cp.CLARABEL)
    return problem.value


def _numpy_objective(X, y, gates, U, penalty):
    f = ((X @ gates >= 0) * (X @ U)).sum(1)
    return np.logaddexp(0.0, -y * f).sum() + penalty * np.linalg.norm(U, axis=0).sum()


def test_refit_standardizes_the_raw_buffer_and_reaches_the_cvxpy_optimum():
    """The refit fits the buffer's raw rows standardized by the buffer's own statistics and reaches the optimum
    an independent solver (cvxpy + Clarabel) finds for that problem, checked with a numpy objective.

    In float64 (the anchor state cast; ADMM stops on a 1e-6 relative duality gap, after 1500 iterations) the
    objective is within 1e-4 of cvxpy's (measured 3e-11). The anchor as trained runs in float32 with a bounded
    number of iterations: its weights, scored in float64, are within 1e-5 (float32's rounding of 64-row sums
    leaves room above 1e-7; measured 9e-9 after 200 iterations). Without the standardization the optimum
    would be 15.2, not 23.2."""
    cfg = anchor.AnchorConfig(dim=8, buffer=32, refresh_every=1, num_gates=8, admm_iters=5000)
    rng = np.random.default_rng(0)
    first, second = _drifting_batches(rng, 16, cfg.dim)
    state = _as_float64(anchor.init(cfg, n_embd=16, seed=0))
    update = jax.jit(lambda s, f: anchor.update(s, f, jnp.int32(0), cfg))
    state = update(update(state, jnp.asarray(first)), jnp.asarray(second))
    assert int(state.pairs_seen) == 32 and float(state.fit["iterations"]) > 0  # refitted once, when full

    raw = np.concatenate([first, second]).reshape(64, cfg.dim)  # rows c_0, r_0, c_1, r_1, ...
    np.testing.assert_array_equal(np.asarray(state.buffer), raw)  # the buffer keeps raw features
    X = (raw - raw.mean(0)) / np.sqrt(raw.var(0) + 1e-6)
    y = np.tile([1.0, -1.0], 32)
    gates, U = np.asarray(state.gates), np.asarray(state.admm.v)
    optimum = _cvxpy_gated_optimum(X, y, gates, cfg.penalty)
    assert abs(_numpy_objective(X, y, gates, U, cfg.penalty) - optimum) <= 1e-4 * optimum

    # Later margins see new features exactly as the fit saw its rows: the saved standardization, not new statistics.
    new = rng.standard_normal((5, 2, cfg.dim)) * 4.0 + 9.0
    z = (new.reshape(10, cfg.dim) - raw.mean(0)) / np.sqrt(raw.var(0) + 1e-6)
    f = ((z @ gates >= 0) * (z @ U)).sum(1).reshape(5, 2)
    np.testing.assert_allclose(np.asarray(anchor.margin(state, jnp.asarray(new))), f[:, 0] - f[:, 1], rtol=1e-9,
                               atol=1e-9)
    buffer_f = ((X @ gates >= 0) * (X @ U)).sum(1).reshape(32, 2)
    assert float(state.margin_scale) == pytest.approx(np.sqrt(np.mean((buffer_f[:, 0] - buffer_f[:, 1]) ** 2)))

    cfg32 = dataclasses.replace(cfg, admm_iters=200)
    state32 = anchor.init(cfg32, n_embd=16, seed=0)
    update32 = jax.jit(lambda s, f: anchor.update(s, f, jnp.int32(0), cfg32))
    state32 = update32(update32(state32, jnp.asarray(first, jnp.float32)), jnp.asarray(second, jnp.float32))
    assert state32.admm.v.dtype == jnp.float32
    assert abs(_numpy_objective(X, y, gates, np.asarray(state32.admm.v, np.float64), cfg.penalty) - optimum) \
        <= 1e-5 * optimum


def test_refit_on_a_data_mesh_splits_the_rows_and_equals_one_device():
    """On a mesh with several data shards (8 simulated devices) the refit traced inside a jitted step runs the
    row-sharded ADMM (a shard_map over the data axis) and lands on the single-device refit's weights to
    float32 tolerance: only the order of the row sums differs."""
    cfg = anchor.AnchorConfig(dim=8, buffer=32, refresh_every=1, num_gates=8, admm_iters=60)
    first, second = _drifting_batches(np.random.default_rng(1), 16, cfg.dim)

    def refit(mesh):
        state = anchor.init(cfg, n_embd=16, seed=0)
        update = jax.jit(lambda s, f: anchor.update(s, f, jnp.int32(0), cfg))
        with mesh_lib.use_mesh(mesh):
            traced = str(jax.make_jaxpr(lambda s: anchor.refit(s, cfg))(state))
            state = update(update(state, jnp.asarray(first, jnp.float32)), jnp.asarray(second, jnp.float32))
        return state, "shard_map" in traced

    one, one_sharded = refit(mesh_lib.make_mesh("1,1,1", devices=jax.devices()[:1]))
    many, many_sharded = refit(mesh_lib.make_mesh("8,1,1"))
    assert many_sharded and not one_sharded
    assert float(many.fit["iterations"]) == float(one.fit["iterations"]) > 0
    a, b = np.asarray(one.admm.v), np.asarray(many.admm.v)
    assert a.dtype == np.float32 and np.abs(a - b).max() <= 1e-4 * np.abs(a).max()
    assert float(many.fit["objective"]) == pytest.approx(float(one.fit["objective"]), rel=1e-5)


def test_state_holds_exactly_the_policy(tmp_path, pairs):
    trainer = Trainer(_config(pairs), str(tmp_path / "run"))
    state = trainer.state
    assert state.ref_params is None
    params = jax.tree.leaves(state.params)
    extra = jax.tree.leaves(state.extra)
    assert len(jax.tree.leaves(state)) == len(params) + len(jax.tree.leaves(state.opt_state)) + 2 + len(extra)
    param_shapes = {p.shape for p in params}
    assert not any(leaf.shape in param_shapes and leaf.ndim >= 2 for leaf in extra)  # no parameter copy
    assert sum(leaf.size for leaf in extra) < 0.1 * sum(p.size for p in params)


def _margins_of_a_batch(trainer) -> tuple[np.ndarray, np.ndarray]:
    """(classifier margins, margins that entered the loss) of the trainer's next batch, through its eval step."""
    terms = trainer.evaluator.step(trainer.state, step_lib.place_batch(next(trainer.train_iter), trainer.mesh))
    return np.asarray(terms["classifier_margin"]), np.asarray(terms["margin"])


@pytest.mark.parametrize("controls", [{}, {"probe": "linear", "control": "shuffled"}], ids=["convex", "controls"])
def test_resume_is_exact_with_the_convex_state(tmp_path, pairs, controls):
    """Exact resume, also with the linear probe's state and the shuffled control's per-step permutations; the
    trained step's loss sees the control's margins (a permutation of the classifier's, not their order)."""
    def config(**train):
        c = _config(pairs, **train)
        c.anchor.update(**controls)
        return c

    straight = Trainer(config(), str(tmp_path / "straight"))
    straight.run()
    Trainer(config(steps=6), str(tmp_path / "stopped")).run()
    resumed = Trainer(config(), str(tmp_path / "stopped"))
    assert resumed.start_step == 6 and int(resumed.state.extra.pairs_seen) == 6 * 8
    resumed.run()
    for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    train_rows = [[{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(str(w))
                   if "loss" in r] for w in (tmp_path / "straight", tmp_path / "stopped")]
    assert train_rows[0] == train_rows[1]
    assert any(r["convex/iterations"] > 0 for r in train_rows[0])  # refits happened on both sides of the stop
    classifier, entered = _margins_of_a_batch(straight)
    assert len(np.unique(classifier)) == len(classifier)
    np.testing.assert_array_equal(np.sort(entered), np.sort(classifier))
    assert np.array_equal(entered, classifier) == (controls.get("control", "none") == "none")


def test_frozen_features_read_the_starting_model_while_the_policy_moves(tmp_path, pairs):
    """`anchor.features = "frozen"`: the buffer holds the starting model's features. They must equal those a
    policy that does not move writes (a run at a negligible learning rate, same data and seed), while this
    run's own policy moves; with policy features the buffer differs."""
    def buffer_after(workdir, lr, features):
        c = _config(pairs, steps=4, learning_rate=lr, warmup_steps=1)
        c.anchor.features = features
        trainer = Trainer(c, str(tmp_path / workdir))
        start = [np.asarray(p) for p in jax.tree.leaves(trainer.state.params)]
        trainer.run()
        moved = max(float(np.abs(np.asarray(p) - q).max()) for p, q in zip(jax.tree.leaves(trainer.state.params), start))
        return np.asarray(trainer.state.extra.buffer), moved, trainer.state.ref_params

    still, still_moved, _ = buffer_after("still", 1e-12, "policy")
    frozen, frozen_moved, ref = buffer_after("frozen", 3e-2, "frozen")
    policy, _, no_ref = buffer_after("policy", 3e-2, "policy")
    assert still_moved < 1e-9 < 1e-3 < frozen_moved and ref is not None and no_ref is None
    np.testing.assert_allclose(frozen, still, rtol=1e-5, atol=1e-6)
    assert np.abs(policy - still).max() > 1e-3


def _logistic_regression(X, y, penalty):
    """argmin_w sum_j log(1 + exp(-y_j x_j.w)) + penalty * ||w||_2 by cvxpy + Clarabel: (w, optimum)."""
    w = cp.Variable(X.shape[1])
    problem = cp.Problem(cp.Minimize(cp.sum(cp.logistic(-cp.multiply(y, X @ w))) + penalty * cp.norm(w, 2)))
    problem.solve(solver=cp.CLARABEL)
    return w.value, problem.value


def test_linear_probe_is_the_logistic_regression_cvxpy_solves():
    """`probe="linear"` fits, on the same standardized buffer and in the trained float32 with the anchor's
    stopping rule (a 1e-6 relative duality gap), the L2-norm-penalized logistic regression cvxpy solves
    independently. Objective within 1e-6 relative (measured 6e-8, after 45 iterations). The weights are held
    to 1e-2 relative (measured 1.2e-3): the stopping rule bounds the objective, and the buffer's drift makes
    the problem flat in one direction (least Hessian eigenvalue 0.017), so that a 1e-6 objective gap allows
    0.056 = 1.5% of ||w*|| by strong convexity."""
    cfg = anchor.AnchorConfig(dim=8, buffer=32, refresh_every=1, probe="linear", admm_iters=200)
    rng = np.random.default_rng(0)
    first, second = _drifting_batches(rng, 16, cfg.dim)
    update = jax.jit(lambda s, f: anchor.update(s, f, jnp.int32(0), cfg))
    state = anchor.init(cfg, n_embd=16, seed=0)
    state = update(update(state, jnp.asarray(first, jnp.float32)), jnp.asarray(second, jnp.float32))
    assert state.admm.v.shape == (cfg.dim, 1) and float(state.fit["iterations"]) > 0

    raw = np.concatenate([first, second]).reshape(64, cfg.dim)
    X = (raw - raw.mean(0)) / np.sqrt(raw.var(0) + 1e-6)
    y = np.tile([1.0, -1.0], 32)
    w_star, optimum = _logistic_regression(X, y, cfg.penalty)
    assert np.linalg.norm(w_star) > 0.1  # the penalty leaves a real probe, not w = 0
    w = np.asarray(state.admm.v, np.float64)[:, 0]
    objective = np.logaddexp(0.0, -y * (X @ w)).sum() + cfg.penalty * np.linalg.norm(w)
    assert abs(objective - optimum) <= 1e-6 * optimum
    assert np.linalg.norm(w - w_star) <= 1e-2 * np.linalg.norm(w_star)

    new = rng.standard_normal((5, 2, cfg.dim)) * 4.0 + 9.0
    z = (new - raw.mean(0)) / np.sqrt(raw.var(0) + 1e-6)
    np.testing.assert_allclose(np.asarray(anchor.margin(state, jnp.asarray(new, jnp.float32))),
                               (z[:, 0] - z[:, 1]) @ w, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def refitted():
    """A convex anchor refitted in float32 on drifting features, and raw features of a new batch of 8 pairs."""
    cfg = anchor.AnchorConfig(dim=8, buffer=32, refresh_every=1, num_gates=8, admm_iters=200)
    rng = np.random.default_rng(1)
    update = jax.jit(lambda s, f: anchor.update(s, f, jnp.int32(0), cfg))
    state = anchor.init(cfg, n_embd=16, seed=0)
    for batch in _drifting_batches(rng, 16, cfg.dim):
        state = update(state, jnp.asarray(batch, jnp.float32))
    return state, jnp.asarray(_drifting_batches(rng, 8, cfg.dim)[0], jnp.float32)


def _under_control(refitted, control: str, step: int, weight_B) -> tuple[np.ndarray, np.ndarray]:
    """(classifier margins on the loss's scale, margins that enter the loss) of the new batch under `control`,
    for a train state at `step` holding the refitted anchor."""
    extra, features_Bx2xK = refitted
    objective = objectives.DPOConvexObjective(losses.LossConfig(), anchor_cfg=anchor.AnchorConfig(control=control))
    state = TrainState(step=jnp.int32(step), params=None, opt_state=None,
                       rng=jax.random.key_data(jax.random.key(0)), extra=extra)
    classifier_B = objective.classifier_margin(extra, features_Bx2xK)
    return np.asarray(classifier_B), np.asarray(objective.loss_margin(state, classifier_B, jnp.asarray(weight_B)))


def test_shuffled_control_permutes_the_margins_of_the_real_pairs(refitted):
    """The same multiset of margins in another order, the same order for the same state, a fresh order at
    another step; padding pairs (weight 0) neither give nor receive a margin."""
    full = np.ones(8, np.float32)
    classifier, shuffled = _under_control(refitted, "shuffled", 3, full)
    assert len(np.unique(classifier)) == 8
    np.testing.assert_array_equal(np.sort(shuffled), np.sort(classifier))
    assert not np.array_equal(shuffled, classifier)
    np.testing.assert_array_equal(_under_control(refitted, "shuffled", 3, full)[1], shuffled)
    assert not np.array_equal(_under_control(refitted, "shuffled", 4, full)[1], shuffled)

    padded = np.array([1, 0, 1, 1, 0, 1, 1, 1], np.float32)
    real = padded > 0
    for step in range(5):  # a permutation that ignored the padding would move it at some step
        _, shuffled = _under_control(refitted, "shuffled", step, padded)
        np.testing.assert_array_equal(shuffled[~real], classifier[~real])
        np.testing.assert_array_equal(np.sort(shuffled[real]), np.sort(classifier[real]))
        assert not np.array_equal(shuffled[real], classifier[real])


def test_constant_control_is_the_mean_size_of_the_standardized_margin(refitted):
    """Every pair gets the real pairs' mean |m|, m the classifier's margin after its standardization by the
    buffer RMS (so the control has the anchor's scale, not the raw margin's)."""
    extra, features_Bx2xK = refitted
    padded = np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32)
    _, constant = _under_control(refitted, "constant", 3, padded)
    standardized = np.asarray(anchor.margin(extra, features_Bx2xK)) / float(extra.margin_scale)
    assert abs(float(extra.margin_scale) - 1.0) > 0.1  # the standardization matters on this batch
    np.testing.assert_allclose(constant, np.full(8, np.abs(standardized[:6]).mean()), rtol=1e-6)
    assert constant[0] > 0


def test_same_losses_on_one_device_and_a_2x2x2_mesh(tmp_path, pairs):
    one, eight = losses_on_one_device_and_2x2x2(_config(pairs, steps=6), tmp_path)
    # The first losses agree to 1e-5; after a few refits the float32 ADMM (60 iterations) amplifies reduction-order
    # differences of the features (measured up to 1.4e-4 relative with jax 0.12).
    np.testing.assert_allclose(eight[:3], one[:3], rtol=1e-5)
    np.testing.assert_allclose(eight, one, rtol=1e-3)


def _tutor_config(**train):
    c = get_config("")
    c.data.update(source="tutor", path="", eval_fraction=0.05, max_length=64, max_prompt_length=32,
                  truncation="keep_start")
    c.tokenizer.vocab_size = 512
    c.train.update(method="dpo_convex", steps=120, batch_size=16, checkpoint_every=1000)
    c.train.update(**train)
    c.anchor.update(buffer=64, refresh_every=5)
    return c


@pytest.fixture(scope="module")
def tutor_runs(tmp_path_factory):
    """DPO-Convex with the default signal for 120 steps, and reference-free DPO, the same run with m = 0, for 40:
    (DPO-Convex's report, {name: logged train rows})."""
    root = tmp_path_factory.mktemp("tutor")
    report = Trainer(_tutor_config(), str(root / "convex"), devices=jax.devices()[:1]).run()
    free = _tutor_config(method="dpo", steps=40)
    free.loss.name = "reference_free"
    Trainer(free, str(root / "free"), devices=jax.devices()[:1]).run()
    return report, {name: [r for r in read_metrics(str(root / name)) if "loss" in r] for name in ("convex", "free")}


def test_learns_the_tutor_preference(tutor_runs):
    report, _ = tutor_runs
    assert 0.3 <= report["eval_before"]["eval/preference_accuracy"] <= 0.7  # a fresh model: chance
    assert report["eval_after"]["eval/preference_accuracy"] >= 0.85  # measured 0.97 after 120 steps


def test_the_anchor_changes_the_gradient_weights(tutor_runs):
    """The anchor acts, measured against reference-free DPO, which is DPO-Convex with m = 0.

    Until the first refit the classifier is 0 and the two runs are the same step for step (the comparison is
    controlled). After it, on pairs it was not fitted on, the classifier's margin picks the chosen response
    (it carries the preference), it changes the per-pair gradient weight sigmoid(gamma m - beta D) against
    reference-free DPO's sigmoid(-beta D) by more than 0.1 on average (measured 0.116; 0.12 +- 0.005 over
    seeds 0-2; 0.03 with gamma = 1), and the policy's own margins beta D leave reference-free DPO's
    (measured 0.26 on average over steps 5-39). With m forced to 0 (anchor.margin patched) the last three
    assertions fail (0.0 each); with gamma = 0 the last two do (0.0), the classifier still at 0.84.
    """
    _, rows = tutor_runs
    convex, free = rows["convex"], rows["free"]
    first_refit = next(i for i, r in enumerate(convex) if r["convex/iterations"] > 0)
    assert first_refit == 4  # the 64-pair buffer is full after 4 batches of 16, and step 4 is a refresh step
    np.testing.assert_allclose([r["loss"] for r in convex[:first_refit + 1]],
                               [r["loss"] for r in free[:first_refit + 1]], rtol=1e-6)
    after = convex[first_refit + 1:]
    assert np.mean([r["convex/heldout_accuracy"] for r in after]) >= 0.75  # measured 0.82
    assert np.mean([r["convex/weight_change_mean"] for r in after]) >= 0.1
    margins = np.array([[r["rewards/margins"] for r in run[first_refit + 1:len(free)]] for run in (convex, free)])
    assert np.abs(margins[0] - margins[1]).mean() >= 0.1
