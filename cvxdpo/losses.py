"""Training losses as per-example terms, so that any split of a batch (micro-batches, devices) sums exactly.

SFT: next-token cross-entropy on the response tokens. DPO family, on
h = [log pi(y_w) - log pi(y_l)] - [log ref(y_w) - log ref(y_l)] with log-probs
summed over response tokens:

  sigmoid          -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps = label smoothing)
  ipo              (h - 1 / (2 beta))^2, on length-normalized log-probs when `ipo_normalize_length`
  hinge            max(0, 1 - beta h)
  reference_free   sigmoid loss with the reference terms set to 0
  simpo            -log sigmoid(beta * D_norm - gamma), D_norm the length-normalized policy margin

Rewards are reported as in the official DPO code: beta * (log pi - log ref),
with log ref = 0 for the reference-free losses (and length-normalized for SimPO).

DPO-Convex replaces the reference log-ratio by the margin m = f(phi(y_w)) -
f(phi(y_l)) of a convex two-layer ReLU network on the policy's own features
(stop-gradient), entering by `signal` on D = log pi(y_w) - log pi(y_l):

  distill      (beta D - gamma m)^2
  margin       -log sigmoid(beta D - gamma m)
  soft_label   -(p log sigmoid(beta D) + (1 - p) log sigmoid(-beta D)),  p = clip(sigmoid(m / tau), 0.5, 1 - eps)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cvxdpo.model import gpt2

REFERENCE_FREE = ("reference_free", "simpo")
SIGNALS = ("distill", "margin", "soft_label")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    ipo_normalize_length: bool = True

    @property
    def needs_reference(self) -> bool:
        return self.loss not in REFERENCE_FREE


def pair_logprobs(model, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Summed response log-probs (B, 2), response lengths (B, 2) and final hidden states (2B, L, E).

    The (B, 2, L) pair batch runs as one (2B, L) forward pass; rows stay in
    pair order [c_0, r_0, c_1, r_1, ...], so each device's shard keeps whole pairs.
    """
    B, _, L = batch["input_ids"].shape
    ids = batch["input_ids"].reshape(2 * B, L)
    out = model(ids, batch["attention_mask"].reshape(2 * B, L))
    logps, counts = gpt2.sequence_logprobs(out.logits, ids, batch["loss_mask"].reshape(2 * B, L))
    return logps.reshape(B, 2), counts.reshape(B, 2), out.hidden


def preference_terms(policy: jax.Array, reference: jax.Array | None, counts: jax.Array, cfg: LossConfig) -> dict:
    """Per-pair loss and rewards. policy/reference: (B, 2) summed log-probs; counts: (B, 2) lengths."""
    lengths = jnp.maximum(counts, 1.0)
    ref = jnp.zeros_like(policy) if reference is None or not cfg.needs_reference else jax.lax.stop_gradient(reference)
    beta = cfg.beta
    if cfg.loss == "simpo":
        norm = policy / lengths
        h = norm[:, 0] - norm[:, 1]
        losses = -jax.nn.log_sigmoid(beta * h - cfg.simpo_gamma)
        rewards = beta * norm
    else:
        scored, ref_scored = policy, ref
        if cfg.loss == "ipo" and cfg.ipo_normalize_length:
            scored, ref_scored = policy / lengths, ref / lengths
        h = (scored[:, 0] - scored[:, 1]) - (ref_scored[:, 0] - ref_scored[:, 1])
        if cfg.loss == "ipo":
            losses = jnp.square(h - 1.0 / (2.0 * beta))
        elif cfg.loss == "hinge":
            losses = jax.nn.relu(1.0 - beta * h)
        else:  # sigmoid and reference_free
            eps = cfg.label_smoothing
            losses = -(1.0 - eps) * jax.nn.log_sigmoid(beta * h) - eps * jax.nn.log_sigmoid(-beta * h)
        rewards = beta * (policy - ref)
    rewards = jax.lax.stop_gradient(rewards)
    return {"loss": losses, "rewards_chosen": rewards[:, 0], "rewards_rejected": rewards[:, 1],
            "logps_chosen": jax.lax.stop_gradient(policy[:, 0]), "logps_rejected": jax.lax.stop_gradient(policy[:, 1])}


def preference_metrics(terms: dict, weight: jax.Array) -> dict:
    """Weighted batch means with the official DPO code's names."""
    total = jnp.maximum(weight.sum(), 1.0)

    def mean(x):
        return (x * weight).sum() / total

    chosen, rejected = terms["rewards_chosen"], terms["rewards_rejected"]
    return {
        "rewards/chosen": mean(chosen),
        "rewards/rejected": mean(rejected),
        "rewards/accuracies": mean((chosen > rejected).astype(jnp.float32)),
        "rewards/margins": mean(chosen - rejected),
        "logps/chosen": mean(terms["logps_chosen"]),
        "logps/rejected": mean(terms["logps_rejected"]),
        "preference_accuracy": mean((terms["logps_chosen"] > terms["logps_rejected"]).astype(jnp.float32)),
    }


def sft_terms(model, batch: dict) -> dict:
    """Per-example summed response NLL and response token counts for an SFT batch (B, L)."""
    out = model(batch["input_ids"], batch["attention_mask"])
    logp, count = gpt2.sequence_logprobs(out.logits, batch["input_ids"], batch["loss_mask"])
    return {"loss": -logp, "tokens": count}


@dataclasses.dataclass(frozen=True)
class SignalConfig:
    signal: str = "margin"
    beta: float = 0.1
    gamma: float = 1.0
    tau: float = 1.0
    eps: float = 0.05
    normalize_length: bool = False


def convex_signal_terms(policy: jax.Array, counts: jax.Array, margin: jax.Array, cfg: SignalConfig) -> dict:
    """Per-pair DPO-Convex loss and (reference-free) rewards. policy, counts: (B, 2); margin: (B,)."""
    scored = policy / jnp.maximum(counts, 1.0) if cfg.normalize_length else policy
    D = scored[:, 0] - scored[:, 1]
    m = jax.lax.stop_gradient(margin)
    beta = cfg.beta
    if cfg.signal == "distill":
        losses = jnp.square(beta * D - cfg.gamma * m)
    elif cfg.signal == "margin":
        losses = -jax.nn.log_sigmoid(beta * D - cfg.gamma * m)
    else:
        p = jnp.clip(jax.nn.sigmoid(m / cfg.tau), 0.5, 1.0 - cfg.eps)
        losses = -(p * jax.nn.log_sigmoid(beta * D) + (1.0 - p) * jax.nn.log_sigmoid(-beta * D))
    rewards = jax.lax.stop_gradient(beta * scored)
    return {"loss": losses, "rewards_chosen": rewards[:, 0], "rewards_rejected": rewards[:, 1],
            "logps_chosen": jax.lax.stop_gradient(policy[:, 0]), "logps_rejected": jax.lax.stop_gradient(policy[:, 1])}
