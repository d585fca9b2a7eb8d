"""Evaluation metrics against hand-computed values, and the bootstrap's statistical behaviour."""

import numpy as np
import pytest

from cvxdpo.eval import metrics

# Three pairs: summed log-probs, response lengths, reference log-probs.
C, R = np.array([-10.0, -8.0, -6.0]), np.array([-12.0, -7.0, -9.0])
NC, NR = np.array([5, 2, 3]), np.array([4, 4, 3])
REF_C, REF_R = np.array([-11.0, -9.0, -5.0]), np.array([-11.0, -9.5, -9.5])


def test_pair_metrics_hand_values():
    out = metrics.pair_metrics(C, R, NC, NR, ref_chosen_logps=REF_C, ref_rejected_logps=REF_R, beta=0.5)
    assert out["n_pairs"] == 3
    # raw: -10 > -12, -8 < -7, -6 > -9 -> 2/3
    assert out["accuracy"]["raw"]["mean"] == pytest.approx(2 / 3)
    # normalized: -2 > -3, -4 < -1.75, -2 > -3 -> 2/3 ... and the margins
    assert out["accuracy"]["length_normalized"]["mean"] == pytest.approx(2 / 3)
    assert out["margin"]["length_normalized"]["mean"] == pytest.approx(np.mean([1.0, -2.25, 1.0]))
    # implicit reward margins: (1 - (-1)), (1 - 2.5), (-1 - 0.5) -> [2, -1.5, -1.5]; strict >
    assert out["accuracy"]["reference_adjusted"]["mean"] == pytest.approx(1 / 3)
    assert out["margin"]["reference_adjusted"]["mean"] == pytest.approx(0.5 * np.mean([2.0, -1.5, -1.5]))
    assert out["margin"]["raw"]["mean"] == pytest.approx(np.mean([2.0, -1.0, 3.0]))
    assert out["length"]["chosen"]["mean"] == pytest.approx(10 / 3)
    assert "reference_adjusted" not in metrics.pair_metrics(C, R, NC, NR)["accuracy"]


def test_ties_are_not_wins():
    out = metrics.pair_metrics([-1.0, -2.0], [-1.0, -3.0], [1, 1], [1, 1], ref_chosen_logps=[-1.0, -2.0],
                               ref_rejected_logps=[-1.0, -3.0])
    assert out["accuracy"]["raw"]["mean"] == 0.5
    assert out["accuracy"]["reference_adjusted"]["mean"] == 0.0  # every implicit reward is 0: strict > fails


def test_binned_accuracy_and_edges():
    correct = np.array([1, 0, 1, 1, 0, 1])
    ratio = np.array([2.0, 2.5, 3.0, 4.0, 20.0, 50.0])
    rows = metrics.binned_accuracy(correct, ratio, [2, 3, 10, np.inf])
    assert [(r["bin"], r["n"], r["accuracy"]["mean"]) for r in rows] == [
        ([2.0, 3.0], 2, 0.5), ([3.0, 10.0], 2, 1.0), ([10.0, np.inf], 2, 0.5)]
    assert metrics.quantile_edges([1, 2, 3, 4, 5, 6, 7, 8], bins=4)[-1] == np.inf


def test_sample_metrics_hand_values():
    samples = [[1, 2, 3, 1, 2, 3], [4, 4, 4, 4]]
    assert metrics.distinct_n(samples, 1) == pytest.approx(4 / 10)
    assert metrics.distinct_n(samples, 2) == pytest.approx(4 / 8)  # (1,2),(2,3),(3,1),(4,4)
    # sample 1: 3-grams 123 231 312 123 -> one repeat of 4; sample 2: 444 444 -> one repeat of 2
    np.testing.assert_allclose(metrics.repeated_ngram_rates(samples, 3), [0.25, 0.5])
    kl = metrics.sequence_kl([[-1.0, -2.0, -9.0]], [[-1.5, -1.0, 0.0]], [[1, 1, 0]])
    np.testing.assert_allclose(kl, [0.5 - 1.0])
    assert metrics.win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, -1.0])["mean"] == pytest.approx(2.5 / 4)


def test_bootstrap_interval_covers_the_true_rate_at_about_the_nominal_frequency():
    rng = np.random.default_rng(0)
    p, n, trials = 0.7, 200, 200
    covered = 0
    for t in range(trials):
        ci = metrics.bootstrap_mean(rng.random(n) < p, n_boot=400, seed=t)
        covered += ci["lo"] <= p <= ci["hi"]
    assert 0.9 <= covered / trials <= 0.99  # nominal 0.95; 200 trials give about +-0.03


def test_clustered_interval_is_wider_when_pairs_share_prompts():
    rng = np.random.default_rng(1)
    prompts = np.repeat(np.arange(40), 10)  # 10 pairs per prompt, outcomes correlated within a prompt
    easy = rng.random(40) < 0.5
    correct = np.where(easy[prompts], rng.random(400) < 0.95, rng.random(400) < 0.35)
    naive = metrics.bootstrap_mean(correct)
    clustered = metrics.bootstrap_mean(correct, prompts)
    assert naive["mean"] == clustered["mean"]
    assert (clustered["hi"] - clustered["lo"]) > 1.5 * (naive["hi"] - naive["lo"])
