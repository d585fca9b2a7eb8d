"""A sentiment classifier for movie reviews: the known reward of the DPO paper's IMDb benchmark.

Reward = the logit of "positive" of a logistic regression over hashed word
n-grams (unigrams and bigrams by default). Features are the tf-idf of each
n-gram (sublinear tf, smooth idf learned from the training set, each document
l2-normalized), hashed into a fixed number of buckets with crc32, so a saved
model needs no vocabulary and scores the same text the same way in any
process (Python's own hash() is salted per process).

Documents are kept as a bag of (bucket, weight) entries, never as a dense
n x buckets matrix: a logit is a gather-sum of the weight vector over the
document's buckets (an embedding bag). Training is full-batch Adam in JAX on
the mean log-loss plus an L2 penalty; it starts from zero and draws nothing
at random, so it is deterministic. Hyperparameters (L2 strength, steps) are
chosen by `select` on a held-out part of the training set.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import zlib
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cvxdpo.errors import ConfigError, DataError, MissingFileError

# Words keep inner apostrophes so negations ("didn't", "isn't") stay one token; "!" and "?" carry sentiment.
TOKEN = re.compile(r"\w+(?:'\w+)*|[!?]")
FORMAT = 1  # bump when the features change meaning; `load` refuses other formats
WEIGHTS_FILE, SETTINGS_FILE = "model.npz", "settings.json"
DEFAULTS = {"l2": 1e-6, "steps": 150, "lr": 0.05}  # what `select` chose on IMDb train (docs/benchmarks.md)


def tokens(text: str) -> list[str]:
    """Lowercased word tokens; IMDb's `<br />` line breaks are whitespace, not words."""
    return TOKEN.findall(text.lower().replace("<br />", " "))


def feature_indices(text: str, buckets: int = 2**20, ngram_max: int = 2) -> list[int]:
    """The hashed bucket of every n-gram (1..ngram_max) of `text`, repeats included.

    crc32 of the UTF-8 n-gram (words joined by one space, which no token holds)
    is stable across processes, platforms and Python versions.
    """
    words = tokens(text)
    return [zlib.crc32(" ".join(words[i:i + n]).encode()) % buckets
            for n in range(1, ngram_max + 1) for i in range(len(words) - n + 1)]


@dataclasses.dataclass(frozen=True)
class Bag:
    """Documents as flat (document, bucket, count) entries; each bucket appears once per document."""

    doc: np.ndarray  # int32 [entries]
    bucket: np.ndarray  # int32 [entries]
    count: np.ndarray  # float32 [entries]
    n: int  # documents (some may have no entries)


def bag_of(counts: Sequence[collections.Counter]) -> Bag:
    sizes = [len(c) for c in counts]
    total = sum(sizes)
    return Bag(doc=np.repeat(np.arange(len(counts), dtype=np.int32), sizes),
               bucket=np.fromiter((k for c in counts for k in c), np.int32, total),
               count=np.fromiter((v for c in counts for v in c.values()), np.float32, total),
               n=len(counts))


def count_ngrams(texts: Sequence[str], buckets: int, ngram_max: int) -> list[collections.Counter]:
    """Per document, how often each bucket occurs (hash collisions add up, as in any hashing vectorizer)."""
    return [collections.Counter(feature_indices(t, buckets, ngram_max)) for t in texts]


def fit_idf(bag: Bag, buckets: int) -> np.ndarray:
    """Smooth idf, log((1 + n) / (1 + df)) + 1: buckets never seen get the largest value, none get zero."""
    df = np.bincount(bag.bucket, minlength=buckets)
    return (np.log((1 + bag.n) / (1 + df)) + 1).astype(np.float32)


def tfidf(bag: Bag, idf: np.ndarray) -> np.ndarray:
    """Entry values (1 + log tf) * idf, scaled so each document has unit l2 norm (long reviews don't dominate)."""
    values = (1 + np.log(bag.count)) * idf[bag.bucket]
    norms = np.sqrt(np.bincount(bag.doc, values * values, minlength=bag.n))
    return (values / np.maximum(norms, 1e-12)[bag.doc]).astype(np.float32)


def gather_sum(weights: np.ndarray, bias: float, bag: Bag, values: np.ndarray) -> np.ndarray:
    """float64 [bag.n] logits: each document's sum of weight x value over its buckets, plus the bias."""
    return bias + np.bincount(bag.doc, weights[bag.bucket] * values, minlength=bag.n)


@dataclasses.dataclass(frozen=True)
class SentimentModel:
    """Weights over hash buckets, the idf they were trained with, and the settings that made the features."""

    weights: np.ndarray  # float32 [buckets]
    bias: float
    idf: np.ndarray  # float32 [buckets]
    ngram_max: int
    hparams: dict  # how it was trained (provenance only)

    @property
    def buckets(self) -> int:
        return self.weights.shape[0]

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """float64 [len(texts)]: log-odds that each text is positive (the reward)."""
        bag = bag_of(count_ngrams(texts, self.buckets, self.ngram_max))
        return gather_sum(self.weights, self.bias, bag, tfidf(bag, self.idf))

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        np.savez_compressed(os.path.join(directory, WEIGHTS_FILE), weights=self.weights, idf=self.idf,
                            bias=np.float32(self.bias))
        settings = {"format": FORMAT, "buckets": self.buckets, "ngram_range": [1, self.ngram_max],
                    "hash": "crc32", "token_pattern": TOKEN.pattern,
                    "weighting": "(1 + log tf) * smooth idf, l2-normalized per document",
                    "idf": f"fitted on the training set, array 'idf' of {WEIGHTS_FILE}", "hparams": self.hparams}
        with open(os.path.join(directory, SETTINGS_FILE), "w") as f:
            json.dump(settings, f, indent=1)


def load(directory: str) -> SentimentModel:
    """The model `save` wrote; refuses one whose features this code would compute differently."""
    paths = [os.path.join(directory, name) for name in (SETTINGS_FILE, WEIGHTS_FILE)]
    for path in paths:
        if not os.path.isfile(path):
            raise MissingFileError(f"sentiment model {directory!r} has no {os.path.basename(path)}")
    with open(paths[0]) as f:
        settings = json.load(f)
    if settings.get("format") != FORMAT or settings.get("token_pattern") != TOKEN.pattern:
        raise ConfigError(f"sentiment model {directory!r} has feature format {settings.get('format')!r} "
                          f"(token pattern {settings.get('token_pattern')!r}); this code reads format {FORMAT}")
    with np.load(paths[1]) as arrays:
        model = SentimentModel(weights=arrays["weights"], bias=float(arrays["bias"]), idf=arrays["idf"],
                               ngram_max=settings["ngram_range"][1], hparams=settings["hparams"])
    if model.buckets != settings["buckets"]:
        raise ConfigError(f"sentiment model {directory!r}: {model.buckets} weights for {settings['buckets']} buckets")
    return model


def accuracy(model: SentimentModel, texts: Sequence[str], labels: Sequence[int]) -> float:
    """Share of texts whose logit sign matches the label (1 positive, 0 negative)."""
    return float(np.mean((model.logits(texts) > 0) == np.asarray(labels, bool)))


def _loss(params, doc, bucket, value, labels, l2):
    """Mean log-loss of the gather-sum logits plus (l2 / 2) |w|^2; the bias is not penalized."""
    weights, bias = params
    logits = jax.ops.segment_sum(weights[bucket] * value, doc, num_segments=labels.shape[0]) + bias
    return optax.sigmoid_binary_cross_entropy(logits, labels).mean() + 0.5 * l2 * jnp.sum(weights * weights)


@jax.jit
def _adam_steps(params, opt_state, doc, bucket, value, labels, l2, lr, steps):
    """`steps` full-batch Adam steps in one call (the data stays on the device between them)."""
    optimizer = optax.adam(lr)

    def step(_, carry):
        params, opt_state = carry
        grads = jax.grad(_loss)(params, doc, bucket, value, labels, l2)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.lax.fori_loop(0, steps, step, (params, opt_state))


def _descend(bag: Bag, values: np.ndarray, labels: np.ndarray, buckets: int, l2: float, lr: float, steps: int,
             every: int) -> Iterator[tuple[int, np.ndarray, float]]:
    """Yields (steps done, weights, bias) every `every` steps and at the end, so one run scores many step counts."""
    params = (jnp.zeros(buckets, jnp.float32), jnp.zeros((), jnp.float32))
    opt_state = optax.adam(lr).init(params)
    data = (jnp.asarray(bag.doc), jnp.asarray(bag.bucket), jnp.asarray(values), jnp.asarray(labels, jnp.float32))
    done = 0
    while done < steps:
        chunk = min(every, steps - done)
        params, opt_state = _adam_steps(params, opt_state, *data, l2, lr, chunk)
        done += chunk
        yield done, np.asarray(params[0]), float(params[1])


def _check_labels(labels: Sequence[int], n: int) -> np.ndarray:
    array = np.asarray(labels)
    if array.shape != (n,) or not np.isin(array, (0, 1)).all():
        raise DataError(f"sentiment labels must be {n} values of 0 (negative) or 1 (positive)")
    if n and len(np.unique(array)) < 2:
        raise DataError("sentiment training needs both positive and negative examples")
    return array.astype(np.float32)


def _fit(counts: Sequence[collections.Counter], labels: np.ndarray, buckets: int, ngram_max: int, l2: float,
         lr: float, steps: int) -> SentimentModel:
    bag = bag_of(counts)
    idf = fit_idf(bag, buckets)
    *_, (_, weights, bias) = _descend(bag, tfidf(bag, idf), labels, buckets, l2, lr, steps, every=steps)
    return SentimentModel(weights, bias, idf, ngram_max, {"l2": l2, "lr": lr, "steps": steps, "n_train": bag.n})


def train(texts: Sequence[str], labels: Sequence[int], *, l2: float = DEFAULTS["l2"], steps: int = DEFAULTS["steps"],
          lr: float = DEFAULTS["lr"], buckets: int = 2**20, ngram_max: int = 2) -> SentimentModel:
    """A classifier of `texts` (labels 1 positive, 0 negative); the idf is fitted on these texts too."""
    y = _check_labels(labels, len(texts))
    return _fit(count_ngrams(texts, buckets, ngram_max), y, buckets, ngram_max, l2, lr, steps)


def select(texts: Sequence[str], labels: Sequence[int], *, l2_grid: Sequence[float] = (1e-6, 3e-6, 1e-5),
           max_steps: int = 150, every: int = 25, lr: float = DEFAULTS["lr"], holdout: float = 0.1, seed: int = 0,
           buckets: int = 2**20, ngram_max: int = 2) -> tuple[dict, list[dict]]:
    """Best {"l2", "steps", "lr"} by accuracy (then log-loss) on a seeded random `holdout` share of the texts.

    Idf and weights are fitted on the rest only, so the held-out score is what
    an unseen test set would see. Returns the choice and every (l2, steps) row.
    """
    y = _check_labels(labels, len(texts))
    counts = count_ngrams(texts, buckets, ngram_max)
    order = np.random.default_rng(seed).permutation(len(texts))
    n_held = min(max(1, round(holdout * len(texts))), len(texts) - 1)
    held, kept = order[:n_held], order[n_held:]
    fit_bag, held_bag = bag_of([counts[i] for i in kept]), bag_of([counts[i] for i in held])
    idf = fit_idf(fit_bag, buckets)
    fit_values, held_values = tfidf(fit_bag, idf), tfidf(held_bag, idf)
    table = []
    for l2 in l2_grid:
        for steps, weights, bias in _descend(fit_bag, fit_values, y[kept], buckets, l2, lr, max_steps, every):
            logits = gather_sum(weights, bias, held_bag, held_values)
            table.append({"l2": l2, "steps": steps, "accuracy": float(np.mean((logits > 0) == (y[held] > 0))),
                          "log_loss": float(np.mean(np.logaddexp(0, -logits * (2 * y[held] - 1))))})
    best = max(table, key=lambda row: (row["accuracy"], -row["log_loss"]))
    return {"l2": best["l2"], "steps": best["steps"], "lr": lr}, table
