"""Evaluation metrics as pure numpy: per-pair log-probs (or per-sample tokens) in, numbers with intervals out.

Every rate and mean comes with a 95% bootstrap interval that resamples whole
clusters: pairs that share a prompt (a conversation, a post, a review) are not
independent, so resampling pairs one by one would make intervals too narrow.
A result is `{"mean", "lo", "hi"}`.

Pair metrics (`pair_metrics`), each over the pairs of a held-out split:
  raw                 summed log pi(y_w) > summed log pi(y_l)
  length_normalized   per-token mean log pi(y_w) > per-token mean log pi(y_l)
  reference_adjusted  DPO's implicit reward, strict >: log pi(y_w) - log ref(y_w) > log pi(y_l) - log ref(y_l)
Sample metrics: mean length, distinct-n, the repeated-3-gram rate, the
sequence-level KL(pi || ref) estimate from the policy's own samples, rewards and
win rates.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

N_BOOT = 2000
LEVEL = 0.95
CHUNK = 200  # bootstrap replicates drawn at once (bounds memory at CHUNK x clusters)


def bootstrap_mean(values, clusters=None, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> dict:
    """Mean of `values` with a percentile interval from resampling whole clusters (each value its own
    cluster when `clusters` is None). Clusters of different sizes weigh by their size, as the mean does."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan")}
    ids = np.arange(values.size) if clusters is None else np.unique(np.asarray(clusters), return_inverse=True)[1]
    sums = np.bincount(ids, weights=values)
    sizes = np.bincount(ids).astype(np.float64)
    rng = np.random.default_rng(seed)
    k = sums.size
    replicates = []
    for start in range(0, n_boot, CHUNK):
        pick = rng.integers(0, k, size=(min(CHUNK, n_boot - start), k))
        replicates.append(sums[pick].sum(1) / sizes[pick].sum(1))
    lo, hi = np.quantile(np.concatenate(replicates), [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(values.mean()), "lo": float(lo), "hi": float(hi)}


def pair_metrics(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, clusters=None,
                 ref_chosen_logps=None, ref_rejected_logps=None, beta: float = 1.0, seed: int = 0) -> dict:
    """Accuracies (raw, length-normalized, and reference-adjusted when reference log-probs are given), margins,
    mean log-probs and response lengths over a set of pairs; arrays of shape (n_pairs,)."""
    c, r = np.asarray(chosen_logps, np.float64), np.asarray(rejected_logps, np.float64)
    nc, nr = np.maximum(np.asarray(chosen_lengths, np.float64), 1), np.maximum(np.asarray(rejected_lengths, np.float64), 1)
    margins = {"raw": c - r, "length_normalized": c / nc - r / nr}
    if ref_chosen_logps is not None:
        margins["reference_adjusted"] = beta * ((c - np.asarray(ref_chosen_logps)) - (r - np.asarray(ref_rejected_logps)))

    def ci(x):
        return bootstrap_mean(x, clusters, seed=seed)

    return {
        "n_pairs": int(c.size),
        "accuracy": {name: ci(m > 0) for name, m in margins.items()},
        "margin": {name: ci(m) for name, m in margins.items()},
        "logps": {"chosen": ci(c), "rejected": ci(r)},
        "length": {"chosen": ci(nc), "rejected": ci(nr)},
    }


def binned_accuracy(correct, values, edges: Sequence[float], clusters=None, seed: int = 0) -> list[dict]:
    """Accuracy within bins [edges[i], edges[i+1]) of `values` (e.g. SHP's score ratio, response length)."""
    correct, values = np.asarray(correct, np.float64), np.asarray(values, np.float64)
    clusters = None if clusters is None else np.asarray(clusters)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (values >= lo) & (values < hi)
        if sel.any():
            rows.append({"bin": [float(lo), float(hi)], "n": int(sel.sum()),
                         "accuracy": bootstrap_mean(correct[sel], None if clusters is None else clusters[sel],
                                                    seed=seed)})
    return rows


def quantile_edges(values, bins: int = 4) -> list[float]:
    """Bin edges at the quantiles of `values`, the last one open (inf), without repeated edges."""
    qs = np.quantile(np.asarray(values, np.float64), np.linspace(0, 1, bins + 1)[:-1])
    return [*np.unique(qs).tolist(), float("inf")]


# --- samples -------------------------------------------------------------------------------------

def _ngrams(tokens: Sequence[int], n: int) -> list[tuple]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(samples: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams over all samples / all n-grams (Li et al. 2016); 0 when there are none."""
    grams = [g for s in samples for g in _ngrams(s, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_rates(samples: Sequence[Sequence[int]], n: int = 3) -> np.ndarray:
    """Per sample: the fraction of its n-grams that repeat an n-gram seen earlier in the same sample."""
    rates = []
    for s in samples:
        grams = _ngrams(s, n)
        rates.append((len(grams) - len(set(grams))) / len(grams) if grams else 0.0)
    return np.asarray(rates)


def sequence_kl(policy_token_logps, reference_token_logps, mask) -> np.ndarray:
    """Per sample: sum over its sampled tokens of log pi - log ref, an unbiased estimate of
    KL(pi || ref) when the samples come from pi. Arrays (samples, tokens); mask marks sampled tokens."""
    mask = np.asarray(mask, np.float64)
    return ((np.asarray(policy_token_logps) - np.asarray(reference_token_logps)) * mask).sum(-1)


def win_rate(rewards, baseline_rewards, clusters=None, seed: int = 0) -> dict:
    """How often a sample's reward beats the baseline's sample for the same prompt (a tie counts half)."""
    a, b = np.asarray(rewards, np.float64), np.asarray(baseline_rewards, np.float64)
    return bootstrap_mean((a > b) + 0.5 * (a == b), clusters, seed=seed)
