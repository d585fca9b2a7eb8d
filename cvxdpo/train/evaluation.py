"""Held-out evaluation: one pass over a whole split, per-example numbers gathered, metrics on the host.

`per_example` runs a jitted function over every example of a source exactly
once, on any mesh and process layout, and returns its outputs as tables in the
source's order. The held-out report (`pair_report`) turns per-pair log-probs
into the metrics of `cvxdpo.eval.metrics` (accuracies with bootstrap
intervals over prompts, margins, lengths, SHP's score-ratio bins). Training
logs the same report as its `eval/...` rows, and `launch.evaluate` writes it
for any saved model.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from cvxdpo import mesh as mesh_lib
from cvxdpo.data import pipeline
from cvxdpo.eval import metrics as metrics_lib
from cvxdpo.train import step as step_lib

SHP_RATIO_EDGES = (2.0, 3.0, 5.0, 10.0, float("inf"))  # SHP keeps pairs with a score ratio >= 2
CLUSTER_KEYS = ("sample_id", "post_id", "review")  # a conversation, an SHP post, an IMDb review


class PairKeys(NamedTuple):
    """What the report needs of a source's pairs besides their log-probs, read once per source."""

    clusters: np.ndarray  # which pairs share a prompt's context (resampled together by the bootstrap)
    score_ratios: list | None  # SHP's score ratio per pair, or None for sources without one


def pair_keys(source) -> PairKeys:
    """Clusters are the conversation, post or review a pair came from when its source records one, else the
    prompt text."""
    keys, ratios = [], []
    for k in range(len(source)):
        pair = source[k]
        found = next((f"{name}={pair.meta[name]}" for name in CLUSTER_KEYS if name in pair.meta), None)
        keys.append(found or f"prompt={pair.prompt}")
        ratios.append(pair.meta.get("score_ratio"))
    clusters = np.unique(np.asarray(keys, dtype=object).astype(str), return_inverse=True)[1]
    return PairKeys(clusters, ratios if all(r is not None for r in ratios) else None)


def _gather(x) -> np.ndarray:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def per_example(fn, source, tokenizer, tok_cfg: pipeline.TokenizeConfig, batch_size: int, mesh, mode: str = "pairs",
                ref_logps=None) -> dict[str, np.ndarray]:
    """`fn(placed_batch) -> {name: (B, ...) array}` over every example of `source` once; tables (N, ...)."""
    dataset = pipeline.make_dataset(source, tokenizer, tok_cfg, batch_size, mode=mode, shuffle=False, num_epochs=1,
                                    ref_logps=ref_logps)
    tables = {}
    for batch in pipeline.padded_pass(dataset, pipeline.batches_per_pass(len(source), batch_size,
                                                                         jax.process_count())):
        with mesh_lib.use_mesh(mesh):
            out = fn(step_lib.place_batch(batch, mesh))
        keep = _gather(batch["weight"]) > 0
        index = _gather(batch["index"])[keep]
        for name, value in out.items():
            value = _gather(value)[keep]
            tables.setdefault(name, np.zeros((len(source), *value.shape[1:]), value.dtype))[index] = value
    return tables


def pair_report(tables: dict, keys: PairKeys, beta: float = 1.0, seed: int = 0) -> dict:
    """The held-out report of per-pair tables (`logps_chosen`, `logps_rejected`, `lengths_chosen`,
    `lengths_rejected`, optional `ref_logps_chosen`/`ref_logps_rejected`)."""
    clusters = keys.clusters
    report = metrics_lib.pair_metrics(
        tables["logps_chosen"], tables["logps_rejected"], tables["lengths_chosen"], tables["lengths_rejected"],
        clusters, tables.get("ref_logps_chosen"), tables.get("ref_logps_rejected"), beta=beta, seed=seed)
    correct = tables["logps_chosen"] > tables["logps_rejected"]
    lengths = (tables["lengths_chosen"] + tables["lengths_rejected"]) / 2
    report["accuracy_by_length"] = metrics_lib.binned_accuracy(correct, lengths, metrics_lib.quantile_edges(lengths),
                                                               clusters, seed)
    if keys.score_ratios is not None:
        report["accuracy_by_score_ratio"] = metrics_lib.binned_accuracy(correct, keys.score_ratios, SHP_RATIO_EDGES,
                                                                        clusters, seed)
    return report


def flatten(report: dict, prefix: str = "") -> dict:
    """Nested scalars as one level of "a/b/c" keys (lists of bins are left out: they go to eval.json)."""
    flat = {}
    for key, value in report.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        elif not isinstance(value, list):
            flat[f"{prefix}{key}"] = value
    return flat


class Evaluator:
    """Training's held-out evaluation: the objective's per-example terms over the whole held-out split."""

    def __init__(self, objective, graphdef, mesh, shardings, source, tokenizer, tok_cfg: pipeline.TokenizeConfig,
                 batch_size: int, mode: str, ref_logps=None, beta: float = 1.0, seed: int = 0):
        self.step = step_lib.make_eval_step(objective, graphdef, mesh, shardings)
        self.mesh, self.source, self.tokenizer, self.tok_cfg = mesh, source, tokenizer, tok_cfg
        self.batch_size, self.mode, self.ref_logps, self.beta, self.seed = batch_size, mode, ref_logps, beta, seed
        self.keys = None  # the held-out pairs' clusters and score ratios, read at the first evaluation

    def __call__(self, state) -> dict:
        """The held-out metrics; none (an empty dict) without held-out examples (data.eval_fraction=0)."""
        if len(self.source) == 0:
            return {}
        t = per_example(lambda batch: self.step(state, batch), self.source, self.tokenizer, self.tok_cfg,
                        self.batch_size, self.mesh, self.mode, self.ref_logps)
        if self.mode == "sft":
            return {"nll": float(t["loss"].sum() / max(t["tokens"].sum(), 1)), "tokens": float(t["tokens"].sum())}
        rewards_c, rewards_r = t["rewards_chosen"], t["rewards_rejected"]
        row = {"loss": t["loss"].mean(), "rewards/chosen": rewards_c.mean(), "rewards/rejected": rewards_r.mean(),
               "rewards/accuracies": (rewards_c > rewards_r).mean(), "rewards/margins": (rewards_c - rewards_r).mean(),
               "preference_accuracy": (t["logps_chosen"] > t["logps_rejected"]).mean()}
        if self.keys is None:
            self.keys = pair_keys(self.source)
        row.update(flatten(pair_report(t, self.keys, self.beta, self.seed)))
        return {k: float(v) for k, v in row.items()}
