"""What a step optimizes, per method, written as per-example terms.

An objective gives, for a (micro-)batch, per-example numerators whose sum over
the whole batch divided by `denominator(batch)` is the loss. An objective with
method-specific state (DPO-Convex's anchor, in `TrainState.extra`) also has
`update_extra`, run once per step after the gradient. Because the
denominator comes from the whole batch, splitting the batch into micro-batches
(gradient accumulation) or over devices gives exactly the same loss and
gradient.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from cvxdpo import losses
from cvxdpo.train import anchor


@dataclasses.dataclass(frozen=True)
class SFTObjective:
    graphdef: nnx.GraphDef

    def terms(self, params, state, batch) -> dict:
        return losses.sft_terms(nnx.merge(self.graphdef, params), batch)

    def denominator(self, batch) -> jax.Array:
        return jnp.maximum(batch["loss_mask"][:, 1:].sum(), 1).astype(jnp.float32)

    def metrics(self, terms: dict, batch) -> dict:
        return {"tokens": terms["tokens"].sum()}

    def eval_metrics(self, terms: dict, batch) -> dict:
        """Sums over the batch; the evaluator divides by the totals at the end."""
        return {"nll_sum": terms["loss"].sum(), "tokens": terms["tokens"].sum()}


@dataclasses.dataclass(frozen=True)
class DPOObjective:
    """The DPO family. The reference is a frozen parameter copy, precomputed log-probs in the batch, or none."""

    graphdef: nnx.GraphDef
    cfg: losses.LossConfig
    reference: str  # "frozen", "precomputed" or "none"

    def _reference_logps(self, ref_params, batch):
        if self.reference == "precomputed":
            return batch["ref_logps"]
        if self.reference == "frozen":
            ref, _, _ = losses.pair_logprobs(nnx.merge(self.graphdef, ref_params), batch)
            return jax.lax.stop_gradient(ref)
        return None

    def terms(self, params, state, batch) -> dict:
        policy, counts, _ = losses.pair_logprobs(nnx.merge(self.graphdef, params), batch)
        terms = losses.preference_terms(policy, self._reference_logps(state.ref_params, batch), counts, self.cfg)
        return {**terms, "loss": terms["loss"] * batch["weight"], "tokens": counts.sum(-1)}

    def denominator(self, batch) -> jax.Array:
        return jnp.maximum(batch["weight"].sum(), 1.0)

    def metrics(self, terms: dict, batch) -> dict:
        return {**losses.preference_metrics(terms, batch["weight"]), "tokens": (terms["tokens"] * batch["weight"]).sum()}

    def eval_metrics(self, terms: dict, batch) -> dict:
        w = batch["weight"]
        means = losses.preference_metrics(terms, w)
        return {**{k: v * w.sum() for k, v in means.items()}, "loss_sum": terms["loss"].sum(), "pairs": w.sum()}


@dataclasses.dataclass(frozen=True)
class DPOConvexObjective(DPOObjective):
    """DPO without a reference: the anchor is the margin of a convex network on the policy's own features."""

    signal: losses.SignalConfig = losses.SignalConfig()
    anchor_cfg: anchor.AnchorConfig = anchor.AnchorConfig()

    def terms(self, params, state, batch) -> dict:
        policy, counts, hidden = losses.pair_logprobs(nnx.merge(self.graphdef, params), batch)
        features = anchor.pool(hidden, batch["loss_mask"], state.extra.projection)
        margin = anchor.margin(state.extra, features)
        terms = losses.convex_signal_terms(policy, counts, margin, self.signal)
        return {**terms, "loss": terms["loss"] * batch["weight"], "tokens": counts.sum(-1), "features": features,
                "margin": margin}

    def update_extra(self, state, terms: dict, batch) -> tuple:
        new = anchor.update(state.extra, terms["features"], state.step, self.anchor_cfg)
        metrics = {f"convex/{k}": v for k, v in new.fit.items()}
        metrics["convex/margin"] = (terms["margin"] * batch["weight"]).sum() / jnp.maximum(batch["weight"].sum(), 1.0)
        return new, metrics
