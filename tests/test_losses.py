"""DPO-family losses against hand-computed values (numpy, written out from the formulas)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvxdpo import losses
from cvxdpo.errors import ConfigError

# (B, 2) summed log-probs [chosen, rejected] and response lengths.
POLICY = np.array([[-10.0, -12.0], [-8.0, -7.0]])
REF = np.array([[-11.0, -11.5], [-7.5, -7.5]])
COUNTS = np.array([[4.0, 5.0], [2.0, 3.0]])


def _log_sigmoid(x):
    return -np.log1p(np.exp(-x))


def _terms(loss, **kw):
    cfg = losses.LossConfig(name=loss, **kw)
    return {k: np.asarray(v) for k, v in
            losses.preference_terms(jnp.asarray(POLICY), jnp.asarray(REF), jnp.asarray(COUNTS), cfg).items()}


def test_sigmoid_and_label_smoothing():
    beta = 0.5
    h = (POLICY[:, 0] - POLICY[:, 1]) - (REF[:, 0] - REF[:, 1])  # [1.5, -1.0]
    np.testing.assert_allclose(h, [1.5, -1.0])
    np.testing.assert_allclose(_terms("sigmoid", beta=beta)["loss"], -_log_sigmoid(beta * h), rtol=1e-6)
    eps = 0.2
    expected = -(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h)
    np.testing.assert_allclose(_terms("sigmoid", beta=beta, label_smoothing=eps)["loss"], expected, rtol=1e-6)
    t = _terms("sigmoid", beta=beta)
    np.testing.assert_allclose(t["rewards_chosen"], beta * (POLICY[:, 0] - REF[:, 0]))
    np.testing.assert_allclose(t["rewards_rejected"], beta * (POLICY[:, 1] - REF[:, 1]))


# IPO's h on summed log-probs (the default, as the official IPO) and per token:
# (-10/4 + 12/5) - (-11/4 + 11.5/5) = 0.35 and (-8/2 + 7/3) - (-7.5/2 + 7.5/3) = -5/12.
IPO_H = {False: np.array([1.5, -1.0]), True: np.array([0.35, -5 / 12])}


def test_ipo_summed_by_default_and_length_normalized_as_an_option():
    beta = 0.25  # 1 / (2 beta) = 2
    assert not losses.LossConfig(name="ipo").ipo_normalize_length
    np.testing.assert_allclose(_terms("ipo", beta=beta)["loss"], [0.25, 9.0], rtol=1e-6)  # (1.5 - 2)^2, (-1 - 2)^2
    np.testing.assert_allclose(_terms("ipo", beta=beta, ipo_normalize_length=True)["loss"],
                               [(0.35 - 2) ** 2, (29 / 12) ** 2], rtol=1e-6)


@pytest.mark.parametrize("normalize", [False, True])
def test_ipo_reward_margin_is_beta_h_of_its_loss(normalize):
    beta = 0.25
    t = _terms("ipo", beta=beta, ipo_normalize_length=normalize)
    np.testing.assert_allclose(t["rewards_chosen"] - t["rewards_rejected"], beta * IPO_H[normalize], rtol=1e-6)
    np.testing.assert_allclose(t["loss"], (IPO_H[normalize] - 1 / (2 * beta)) ** 2, rtol=1e-6)
    scale = COUNTS[:, 0] if normalize else 1.0
    np.testing.assert_allclose(t["rewards_chosen"], beta * (POLICY[:, 0] - REF[:, 0]) / scale, rtol=1e-6)
    m = losses.preference_metrics({k: jnp.asarray(v) for k, v in t.items()}, jnp.ones(2))
    assert float(m["rewards/margins"]) == pytest.approx(beta * IPO_H[normalize].mean())


def test_hinge_reference_free_and_simpo():
    beta = 0.5
    h = (POLICY[:, 0] - POLICY[:, 1]) - (REF[:, 0] - REF[:, 1])
    np.testing.assert_allclose(_terms("hinge", beta=beta)["loss"], np.maximum(0, 1 - beta * h), rtol=1e-6)
    d = POLICY[:, 0] - POLICY[:, 1]
    free = _terms("reference_free", beta=beta)
    np.testing.assert_allclose(free["loss"], -_log_sigmoid(beta * d), rtol=1e-6)
    np.testing.assert_allclose(free["rewards_chosen"], beta * POLICY[:, 0])
    gamma = 0.3
    d_norm = POLICY[:, 0] / COUNTS[:, 0] - POLICY[:, 1] / COUNTS[:, 1]  # [-2.5+2.4, -4+7/3]
    simpo = _terms("simpo", beta=beta, simpo_gamma=gamma)
    np.testing.assert_allclose(simpo["loss"], -_log_sigmoid(beta * d_norm - gamma), rtol=1e-6)
    np.testing.assert_allclose(simpo["rewards_chosen"], beta * POLICY[:, 0] / COUNTS[:, 0], rtol=1e-6)


def test_step_zero_is_log_two_with_zero_rewards():
    cfg = losses.LossConfig(name="sigmoid", beta=0.1)
    t = losses.preference_terms(jnp.asarray(POLICY), jnp.asarray(POLICY), jnp.asarray(COUNTS), cfg)
    np.testing.assert_allclose(np.asarray(t["loss"]), math.log(2), rtol=1e-7)
    m = losses.preference_metrics(t, jnp.ones(2))
    assert float(m["rewards/chosen"]) == float(m["rewards/rejected"]) == float(m["rewards/margins"]) == 0.0
    assert float(m["rewards/accuracies"]) == 0.0  # strict >, as the official code


def test_metrics_are_weighted_means():
    t = _terms("sigmoid", beta=1.0)
    m = losses.preference_metrics({k: jnp.asarray(v) for k, v in t.items()}, jnp.asarray([1.0, 0.0]))
    assert float(m["rewards/chosen"]) == pytest.approx(t["rewards_chosen"][0])
    assert float(m["rewards/accuracies"]) == 1.0  # pair 0: 1.0 > -0.5
    assert float(m["logps/rejected"]) == pytest.approx(-12.0)


# --- DPO-Convex signals --------------------------------------------------------------------------

MARGIN = np.array([0.8, -0.4])


def _signal(signal, beta, policy=POLICY, margin=MARGIN, **kw):
    cfg = losses.SignalConfig(name=signal, **kw)
    out = losses.convex_signal_terms(jnp.asarray(policy), jnp.asarray(COUNTS), jnp.asarray(margin), beta, cfg)
    return {k: np.asarray(v) for k, v in out.items()}


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_convex_signals_against_hand_values():
    beta, gamma, tau, eps = 0.5, 2.0, 0.5, 0.05
    D = POLICY[:, 0] - POLICY[:, 1]  # [2, -1]
    np.testing.assert_allclose(_signal("distill", beta=beta, gamma=gamma)["loss"], (beta * D - gamma * MARGIN) ** 2)
    np.testing.assert_allclose(_signal("margin", beta=beta, gamma=gamma)["loss"],
                               -_log_sigmoid(beta * D - gamma * MARGIN), rtol=1e-6)
    p = np.clip(1 / (1 + np.exp(-MARGIN / tau)), 0.5, 1 - eps)  # [0.832, 0.5]
    expected = -(p * _log_sigmoid(beta * D) + (1 - p) * _log_sigmoid(-beta * D))
    np.testing.assert_allclose(_signal("soft_label", beta=beta, tau=tau, eps=eps)["loss"], expected, rtol=1e-6)
    d_norm = POLICY[:, 0] / COUNTS[:, 0] - POLICY[:, 1] / COUNTS[:, 1]
    np.testing.assert_allclose(_signal("margin", beta=beta, gamma=gamma, normalize_length=True)["loss"],
                               -_log_sigmoid(beta * d_norm - gamma * MARGIN), rtol=1e-6)
    rewards = _signal("margin", beta=beta)
    np.testing.assert_allclose(rewards["rewards_chosen"], beta * POLICY[:, 0])  # reference-free rewards


def test_convex_margin_carries_no_gradient():
    cfg = losses.SignalConfig(name="distill")

    def total(margin):
        return losses.convex_signal_terms(jnp.asarray(POLICY), jnp.asarray(COUNTS), margin, 0.5, cfg)["loss"].sum()

    assert np.all(np.asarray(jax.grad(total)(jnp.asarray(MARGIN))) == 0)


def test_anchor_diagnostics_against_hand_values():
    """w = -dloss/d(beta D): margin sigmoid(gamma m - beta D), distill 2 (gamma m - beta D), soft_label
    p - sigmoid(beta D); the change is |w(m) - w(0)|, and the anchor term gamma m (soft_label: logit p)."""
    beta, gamma, tau, eps = 0.5, 2.0, 0.5, 0.05
    z = beta * (POLICY[:, 0] - POLICY[:, 1])  # [1, -0.5]
    margin = _signal("margin", beta=beta, gamma=gamma)
    np.testing.assert_allclose(margin["anchor_weight_change"], np.abs(_sigmoid(gamma * MARGIN - z) - _sigmoid(-z)),
                               rtol=1e-6)
    np.testing.assert_allclose(margin["anchor_term"], [1.6, -0.8])
    distill = _signal("distill", beta=beta, gamma=gamma)
    np.testing.assert_allclose(distill["anchor_weight_change"], [3.2, 1.6], rtol=1e-6)  # 2 gamma |m|
    np.testing.assert_allclose(distill["anchor_term"], [1.6, -0.8])
    soft = _signal("soft_label", beta=beta, tau=tau, eps=eps)  # m / tau = [1.6, -0.8]: p = [sigmoid(1.6), 0.5]
    np.testing.assert_allclose(soft["anchor_weight_change"], [_sigmoid(1.6) - 0.5, 0.0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(soft["anchor_term"], [1.6, 0.0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("signal", ["margin", "distill", "soft_label"])
def test_anchor_weight_change_is_that_of_the_loss_gradient(signal):
    """The logged change equals |w(m) - w(0)| with w = -dloss/d(beta D) from central differences of the loss."""
    beta, h = 0.5, 1e-4

    def weight(margin):
        up, down = (_signal(signal, beta, policy=POLICY + [[s * h, 0.0]], margin=margin)["loss"] for s in (1, -1))
        return -(up - down) / (2 * h * beta)

    expected = np.abs(weight(MARGIN) - weight(np.zeros(2)))
    np.testing.assert_allclose(_signal(signal, beta)["anchor_weight_change"], expected, rtol=1e-5, atol=1e-8)


def test_signal_scale_is_checked():
    assert losses.SignalConfig().scale == "standardized"
    with pytest.raises(ConfigError, match="signal.scale='raw' is not one of none, standardized"):
        losses.SignalConfig(scale="raw")
