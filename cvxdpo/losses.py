"""Training losses as pure array math: log-probs, lengths and margins in, per-example terms and metrics out.

Nothing here runs a model (the forward passes live with the objectives in
`cvxdpo.train.objectives`), so every loss can be read and tested on hand-made
arrays. Terms are per example, so that any split of a batch (micro-batches,
devices) sums exactly.

Shapes: B pairs; `logps_Bx2` are summed response log-probs [chosen, rejected],
`counts_Bx2` the response lengths in tokens.

SFT: the summed response NLL. DPO family (`LossConfig`, the `loss` config
section), on h = [log pi(y_w) - log pi(y_l)] - [log ref(y_w) - log ref(y_l)]:

  sigmoid          -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps = label smoothing)
  ipo              (h - 1 / (2 beta))^2, on summed log-probs as the official code (`loss_type="ipo"`);
                   on length-normalized log-probs when `ipo_normalize_length`
  hinge            max(0, 1 - beta h)
  reference_free   sigmoid loss with the reference terms set to 0
  simpo            -log sigmoid(beta * D_norm - gamma), D_norm the length-normalized policy margin

Rewards are reported as in the official DPO code: beta * (log pi - log ref),
on the log-probs the loss scores: log ref = 0 for the reference-free losses,
and both length-normalized for SimPO and for IPO with `ipo_normalize_length`.
So `rewards/margins` is always beta * h of the loss.

DPO-Convex (`SignalConfig`, the `signal` config section) replaces the reference
log-ratio by the margin m = f(phi(y_w)) - f(phi(y_l)) of a convex two-layer
ReLU network on the policy's own features (stop-gradient), entering by
`name` on D = log pi(y_w) - log pi(y_l), with the same beta as every other
preference loss (`LossConfig.beta`):

  distill      (beta D - gamma m)^2
  margin       -log sigmoid(beta D - gamma m)
  soft_label   -(p log sigmoid(beta D) + (1 - p) log sigmoid(-beta D)),  p = clip(sigmoid(m / tau), 0.5, 1 - eps)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cvxdpo.errors import ConfigError

LOSSES = ("sigmoid", "ipo", "hinge", "reference_free", "simpo")
REFERENCE_FREE = ("reference_free", "simpo")
SIGNALS = ("distill", "margin", "soft_label")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The DPO-family loss; `beta` is also DPO-Convex's beta (one beta per run, one meaning)."""

    name: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5  # SimPO's target margin, in units of beta * length-normalized log-prob
    ipo_normalize_length: bool = False  # the official IPO scores summed log-probs

    def __post_init__(self):
        if self.name not in LOSSES:
            raise ConfigError(f"loss.name={self.name!r} is not one of {', '.join(LOSSES)}")
        if self.beta <= 0:
            raise ConfigError(f"loss.beta must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"loss.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")

    @property
    def needs_reference(self) -> bool:
        return self.name not in REFERENCE_FREE


@dataclasses.dataclass(frozen=True)
class SignalConfig:
    """How DPO-Convex's anchor margin enters its loss."""

    name: str = "margin"
    gamma: float = 1.0  # weight of the convex margin (distill, margin)
    tau: float = 1.0  # temperature of the soft label
    eps: float = 0.05  # the soft label is kept in [0.5, 1 - eps]
    normalize_length: bool = False  # length-normalized log-probs, as SimPO

    def __post_init__(self):
        if self.name not in SIGNALS:
            raise ConfigError(f"signal.name={self.name!r} is not one of {', '.join(SIGNALS)}")
        if self.tau <= 0 or not 0 < self.eps < 0.5:
            raise ConfigError(f"signal.tau must be positive and signal.eps in (0, 0.5), got {self.tau}, {self.eps}")


def _pair_terms(losses_B, rewards_Bx2, logps_Bx2) -> dict:
    rewards_Bx2 = jax.lax.stop_gradient(rewards_Bx2)
    logps_Bx2 = jax.lax.stop_gradient(logps_Bx2)
    return {"loss": losses_B, "rewards_chosen": rewards_Bx2[:, 0], "rewards_rejected": rewards_Bx2[:, 1],
            "logps_chosen": logps_Bx2[:, 0], "logps_rejected": logps_Bx2[:, 1]}


def preference_terms(logps_Bx2: jax.Array, ref_logps_Bx2: jax.Array | None, counts_Bx2: jax.Array,
                     cfg: LossConfig) -> dict:
    """Per-pair loss and rewards of the DPO family. `ref_logps_Bx2` is ignored by the reference-free losses."""
    lengths_Bx2 = jnp.maximum(counts_Bx2, 1.0)
    if ref_logps_Bx2 is None or not cfg.needs_reference:
        ref_Bx2 = jnp.zeros_like(logps_Bx2)
    else:
        ref_Bx2 = jax.lax.stop_gradient(ref_logps_Bx2)
    beta = cfg.beta
    if cfg.name == "simpo":
        norm_Bx2 = logps_Bx2 / lengths_Bx2
        h_B = norm_Bx2[:, 0] - norm_Bx2[:, 1]
        return _pair_terms(-jax.nn.log_sigmoid(beta * h_B - cfg.simpo_gamma), beta * norm_Bx2, logps_Bx2)
    scored_Bx2, ref_scored_Bx2 = logps_Bx2, ref_Bx2
    if cfg.name == "ipo" and cfg.ipo_normalize_length:
        scored_Bx2, ref_scored_Bx2 = logps_Bx2 / lengths_Bx2, ref_Bx2 / lengths_Bx2
    h_B = (scored_Bx2[:, 0] - scored_Bx2[:, 1]) - (ref_scored_Bx2[:, 0] - ref_scored_Bx2[:, 1])
    if cfg.name == "ipo":
        losses_B = jnp.square(h_B - 1.0 / (2.0 * beta))
    elif cfg.name == "hinge":
        losses_B = jax.nn.relu(1.0 - beta * h_B)
    else:  # sigmoid and reference_free
        eps = cfg.label_smoothing
        losses_B = -(1.0 - eps) * jax.nn.log_sigmoid(beta * h_B) - eps * jax.nn.log_sigmoid(-beta * h_B)
    return _pair_terms(losses_B, beta * (scored_Bx2 - ref_scored_Bx2), logps_Bx2)


def convex_signal_terms(logps_Bx2: jax.Array, counts_Bx2: jax.Array, margin_B: jax.Array, beta: float,
                        cfg: SignalConfig) -> dict:
    """Per-pair DPO-Convex loss and (reference-free) rewards; the margin carries no gradient."""
    scored_Bx2 = logps_Bx2 / jnp.maximum(counts_Bx2, 1.0) if cfg.normalize_length else logps_Bx2
    D_B = scored_Bx2[:, 0] - scored_Bx2[:, 1]
    m_B = jax.lax.stop_gradient(margin_B)
    if cfg.name == "distill":
        losses_B = jnp.square(beta * D_B - cfg.gamma * m_B)
    elif cfg.name == "margin":
        losses_B = -jax.nn.log_sigmoid(beta * D_B - cfg.gamma * m_B)
    else:
        p_B = jnp.clip(jax.nn.sigmoid(m_B / cfg.tau), 0.5, 1.0 - cfg.eps)
        losses_B = -(p_B * jax.nn.log_sigmoid(beta * D_B) + (1.0 - p_B) * jax.nn.log_sigmoid(-beta * D_B))
    return _pair_terms(losses_B, beta * scored_Bx2, logps_Bx2)


def sft_terms(logps_B: jax.Array, counts_B: jax.Array) -> dict:
    """Per-example summed response NLL and response token counts."""
    return {"loss": -logps_B, "tokens": counts_B}


def preference_metrics(terms: dict, weight_B: jax.Array) -> dict:
    """Weighted batch means with the official DPO code's names (padding pairs have weight 0)."""
    total = jnp.maximum(weight_B.sum(), 1.0)

    def mean(x_B):
        return (x_B * weight_B).sum() / total

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
