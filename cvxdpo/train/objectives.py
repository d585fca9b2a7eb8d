"""What a step optimizes, per method: the forward passes and the per-example terms of each objective.

`build(config)` is the one path from a config to an objective. An objective
gives, for a (micro-)batch, per-example numerators whose sum over the whole
batch divided by `denominator(batch)` is the loss. Because the denominator
comes from the whole batch, splitting the batch into micro-batches (gradient
accumulation) or over devices gives exactly the same loss and gradient. An
objective with method-specific state (DPO-Convex's anchor, in
`TrainState.extra`) creates it with `init_extra` and advances it with
`update_extra`, once per step after the gradient.

Shapes: a pair batch is (B, 2, L) (chosen and rejected of a pair adjacent), run
as one (2B, L) forward pass whose rows stay in pair order, so that each
device's shard keeps whole pairs; an SFT batch is (B, L).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from cvxdpo import losses
from cvxdpo.train import anchor


def pair_forward(graphdef, params, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Summed response log-probs (B, 2), response lengths (B, 2) and final hidden states (2B, L, E)."""
    B, _, L = batch["input_ids"].shape
    logps_2B, counts_2B, hidden_2BxLxE = nnx.merge(graphdef, params).response_logprobs(
        *(batch[k].reshape(2 * B, L) for k in ("input_ids", "attention_mask", "loss_mask")))
    return logps_2B.reshape(B, 2), counts_2B.reshape(B, 2), hidden_2BxLxE


def sequence_forward(graphdef, params, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Summed response log-probs (B,) and response lengths (B,) of an SFT batch (B, L)."""
    logps_B, counts_B, _ = nnx.merge(graphdef, params).response_logprobs(
        batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    return logps_B, counts_B


def _lengths(counts_Bx2) -> dict:
    return {"lengths_chosen": counts_Bx2[:, 0], "lengths_rejected": counts_Bx2[:, 1], "tokens": counts_Bx2.sum(-1)}


class Objective:
    """Defaults shared by every objective: no reference copy, no method state."""

    reference_dtype: str | None = None  # a frozen reference copy in the train state, in this dtype
    precomputed_reference: bool = False  # batches carry `ref_logps` computed once before training

    def init_extra(self, n_embd: int, seed: int):
        return None

    def update_extra(self, state, terms: dict, batch) -> tuple:
        return state.extra, {}


@dataclasses.dataclass(frozen=True)
class SFTObjective(Objective):
    def terms(self, graphdef, params, state, batch) -> dict:
        return losses.sft_terms(*sequence_forward(graphdef, params, batch))

    def denominator(self, batch) -> jax.Array:
        return jnp.maximum(batch["loss_mask"][:, 1:].sum(), 1).astype(jnp.float32)

    def metrics(self, terms: dict, batch) -> dict:
        return {"tokens": terms["tokens"].sum()}


@dataclasses.dataclass(frozen=True)
class DPOObjective(Objective):
    """The DPO family. The reference is a frozen parameter copy, precomputed log-probs in the batch, or none."""

    loss: losses.LossConfig
    reference: str = "none"  # "frozen", "precomputed" or "none"
    frozen_dtype: str = "float32"

    @property
    def reference_dtype(self) -> str | None:
        return self.frozen_dtype if self.reference == "frozen" else None

    @property
    def precomputed_reference(self) -> bool:
        return self.reference == "precomputed"

    def _reference_logps(self, graphdef, state, batch):
        if self.reference == "precomputed":
            return batch["ref_logps"]
        if self.reference == "frozen":
            ref_Bx2, _, _ = pair_forward(graphdef, state.ref_params, batch)
            return jax.lax.stop_gradient(ref_Bx2)
        return None

    def terms(self, graphdef, params, state, batch) -> dict:
        logps_Bx2, counts_Bx2, _ = pair_forward(graphdef, params, batch)
        ref_Bx2 = self._reference_logps(graphdef, state, batch)
        terms = losses.preference_terms(logps_Bx2, ref_Bx2, counts_Bx2, self.loss)
        if ref_Bx2 is not None:
            terms.update(ref_logps_chosen=ref_Bx2[:, 0], ref_logps_rejected=ref_Bx2[:, 1])
        return {**terms, **_lengths(counts_Bx2), "loss": terms["loss"] * batch["weight"]}

    def denominator(self, batch) -> jax.Array:
        return jnp.maximum(batch["weight"].sum(), 1.0)

    def metrics(self, terms: dict, batch) -> dict:
        return {**losses.preference_metrics(terms, batch["weight"]), "tokens": (terms["tokens"] * batch["weight"]).sum()}


@dataclasses.dataclass(frozen=True)
class DPOConvexObjective(DPOObjective):
    """DPO without a reference: the anchor is the margin of a convex network on the policy's own features.

    With `anchor.features = "frozen"` (a control) the features come from a frozen copy of the starting model
    instead, held where DPO holds its reference (`reference = "frozen"`); its log-probs are not used."""

    signal: losses.SignalConfig = losses.SignalConfig()
    anchor_cfg: anchor.AnchorConfig = anchor.AnchorConfig()

    def init_extra(self, n_embd: int, seed: int) -> anchor.AnchorState:
        return anchor.init(self.anchor_cfg, n_embd, seed)

    def classifier_margin(self, extra: anchor.AnchorState, features_Bx2xK: jax.Array) -> jax.Array:
        """The classifier's margin on the loss's scale: divided by its buffer RMS when `signal.scale` says so."""
        margin_B = anchor.margin(extra, features_Bx2xK)
        return margin_B / extra.margin_scale if self.signal.scale == "standardized" else margin_B

    def loss_margin(self, state, margin_B: jax.Array, weight_B: jax.Array) -> jax.Array:
        """The margin that enters the loss: the classifier's, or its `anchor.control` on the same scale, drawn
        from the train state's key and step (deterministic, so resume stays exact)."""
        return anchor.control(self.anchor_cfg, margin_B, weight_B, anchor.shuffle_key(state.rng, state.step))

    def terms(self, graphdef, params, state, batch) -> dict:
        logps_Bx2, counts_Bx2, hidden_2BxLxE = pair_forward(graphdef, params, batch)
        if self.anchor_cfg.features == "frozen":
            _, _, hidden_2BxLxE = pair_forward(graphdef, state.ref_params, batch)
        features_Bx2xK = anchor.pool(hidden_2BxLxE, batch["loss_mask"], state.extra.projection)
        classifier_B = self.classifier_margin(state.extra, features_Bx2xK)
        margin_B = self.loss_margin(state, classifier_B, batch["weight"])
        terms = losses.convex_signal_terms(logps_Bx2, counts_Bx2, margin_B, self.loss.beta, self.signal)
        return {**terms, **_lengths(counts_Bx2), "loss": terms["loss"] * batch["weight"],
                "features": features_Bx2xK, "margin": margin_B, "classifier_margin": classifier_B}

    def update_extra(self, state, terms: dict, batch) -> tuple:
        """Advance the anchor (buffer, refit) and log what it did this step.

        Besides the last refit's diagnostics: `convex/margin` (mean m as it entered the loss),
        `convex/weight_change_mean` and `convex/weight_change_p90` (mean and 90th percentile over the batch of
        |w(m) - w(0)|, see cvxdpo.losses), `convex/anchor_to_policy` (mean |anchor term| / mean |beta D|),
        `convex/heldout_accuracy` (the fraction of the batch's pairs with classifier margin > 0, before the
        batch enters the buffer: pairs the classifier was not fitted on; under a control, still the classifier's)
        and `convex/margin_scale` (the buffer RMS m is divided by when standardized).
        """
        new = anchor.update(state.extra, terms["features"], state.step, self.anchor_cfg)
        weight_B = batch["weight"]
        policy_B = terms["rewards_chosen"] - terms["rewards_rejected"]
        change_B = terms["anchor_weight_change"]
        correct_B = (terms["classifier_margin"] > 0).astype(jnp.float32)
        metrics = {f"convex/{k}": v for k, v in new.fit.items()}
        metrics.update({
            "convex/margin": anchor.weighted_mean(terms["margin"], weight_B),
            "convex/weight_change_mean": anchor.weighted_mean(change_B, weight_B),
            "convex/weight_change_p90": jnp.nanpercentile(jnp.where(weight_B > 0, change_B, jnp.nan), 90),
            "convex/anchor_to_policy": anchor.weighted_mean(jnp.abs(terms["anchor_term"]), weight_B)
            / jnp.maximum(anchor.weighted_mean(jnp.abs(policy_B), weight_B), 1e-12),
            "convex/heldout_accuracy": anchor.weighted_mean(correct_B, weight_B),
            "convex/margin_scale": new.margin_scale})
        return new, metrics


def build(c) -> Objective:
    """The objective of a config tree: `train.method` with the `loss`, `signal` and `anchor` sections."""
    method = c.train.method
    if method == "sft":
        return SFTObjective()
    loss = losses.LossConfig(**c.loss.to_dict())
    if method == "dpo_convex":
        anchor_cfg = anchor.AnchorConfig(**c.anchor.to_dict())
        reference = "frozen" if anchor_cfg.features == "frozen" else "none"
        return DPOConvexObjective(loss, reference, c.train.reference_dtype,
                                  signal=losses.SignalConfig(**c.signal.to_dict()), anchor_cfg=anchor_cfg)
    reference = c.train.reference if loss.needs_reference else "none"
    return DPOObjective(loss, reference, c.train.reference_dtype)
