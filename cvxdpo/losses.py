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

The anchor acts only through the per-pair gradient weight w = -dloss/d(beta D)
(margin: sigmoid(gamma m - beta D); distill: 2 (gamma m - beta D); soft_label:
p - sigmoid(beta D)). `convex_signal_terms` reports |w(m) - w(0)|, the change
the anchor makes to that weight against the same loss without it (for
`margin`, w(0) = sigmoid(-beta D) is reference-free DPO's weight), and the
anchor's term on the scale of beta D (gamma m; for soft_label logit(p), the
beta D at which its loss is least), so that a run can see whether the anchor
is commensurate with the policy margin or drowned by it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cvxdpo.errors import ConfigError

LOSSES = ("sigmoid", "ipo", "hinge", "reference_free", "simpo")
REFERENCE_FREE = ("reference_free", "simpo")
SIGNALS = ("distill", "margin", "soft_label")
SIGNAL_SCALES = ("none", "standardized")


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
    """How DPO-Convex's anchor margin enters its loss.

    `scale`: "none" uses the classifier's raw margin m, whose size depends on the
    features and the classifier's regularization; "standardized" divides m by
    the root mean square of the margins over the buffer at the last refit, so m
    is O(1) and `gamma` is in units of the classifier's typical margin.

    The default gamma = 4 lets the anchor move a typical pair's target across
    the range where reference-free DPO's weight sigmoid(-beta D) is not yet
    saturated (0.5 at beta D = 0, 0.018 at 4). Measured on the tutor pairs
    (tests/test_dpo_convex.py's config), the mean change of the per-pair weight
    is 0.03 with gamma = 1, 0.12 with 4 and 0.22 with 8 (standardized), and
    0.15 with the raw margin and gamma = 1, whose size depends on the features.
    """

    name: str = "margin"
    gamma: float = 4.0  # weight of the convex margin (distill, margin); see above for the default
    scale: str = "standardized"  # none | standardized (see above)
    tau: float = 1.0  # temperature of the soft label
    eps: float = 0.05  # the soft label is kept in [0.5, 1 - eps]
    normalize_length: bool = False  # length-normalized log-probs, as SimPO

    def __post_init__(self):
        if self.name not in SIGNALS:
            raise ConfigError(f"signal.name={self.name!r} is not one of {', '.join(SIGNALS)}")
        if self.scale not in SIGNAL_SCALES:
            raise ConfigError(f"signal.scale={self.scale!r} is not one of {', '.join(SIGNAL_SCALES)}")
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


def _soft_label(m_B: jax.Array, cfg: SignalConfig) -> jax.Array:
    """p = clip(sigmoid(m / tau), 0.5, 1 - eps): the anchor can soften a label towards chance, never flip it."""
    return jnp.clip(jax.nn.sigmoid(m_B / cfg.tau), 0.5, 1.0 - cfg.eps)


def _signal_losses(z_B: jax.Array, m_B: jax.Array, cfg: SignalConfig) -> jax.Array:
    """Per-pair loss of signal `cfg.name` on the policy margin z = beta * D and the anchor margin m."""
    if cfg.name == "distill":
        return jnp.square(z_B - cfg.gamma * m_B)
    if cfg.name == "margin":
        return -jax.nn.log_sigmoid(z_B - cfg.gamma * m_B)
    p_B = _soft_label(m_B, cfg)
    return -(p_B * jax.nn.log_sigmoid(z_B) + (1.0 - p_B) * jax.nn.log_sigmoid(-z_B))


def _gradient_weight(z_B: jax.Array, m_B: jax.Array, cfg: SignalConfig) -> jax.Array:
    """w = -dloss/dz per pair (the losses are elementwise, so the gradient of their sum is per pair)."""
    return -jax.grad(lambda z: _signal_losses(z, m_B, cfg).sum())(z_B)


def convex_signal_terms(logps_Bx2: jax.Array, counts_Bx2: jax.Array, margin_B: jax.Array, beta: float,
                        cfg: SignalConfig) -> dict:
    """Per-pair DPO-Convex loss, (reference-free) rewards and the anchor's diagnostics; the margin carries no
    gradient. `margin_B` is the m that enters the loss (already divided by its scale when standardized).

    `anchor_weight_change` is |w(m) - w(0)| and `anchor_term` the anchor on the scale of beta D (see the
    module docstring); both are computed without gradient.
    """
    scored_Bx2 = logps_Bx2 / jnp.maximum(counts_Bx2, 1.0) if cfg.normalize_length else logps_Bx2
    z_B = beta * (scored_Bx2[:, 0] - scored_Bx2[:, 1])
    m_B = jax.lax.stop_gradient(margin_B)
    z_fixed_B = jax.lax.stop_gradient(z_B)
    change_B = jnp.abs(_gradient_weight(z_fixed_B, m_B, cfg) - _gradient_weight(z_fixed_B, jnp.zeros_like(m_B), cfg))
    if cfg.name == "soft_label":
        p_B = _soft_label(m_B, cfg)
        anchor_B = jnp.log(p_B) - jnp.log1p(-p_B)
    else:
        anchor_B = cfg.gamma * m_B
    return {**_pair_terms(_signal_losses(z_B, m_B, cfg), beta * scored_Bx2, logps_Bx2),
            "anchor_weight_change": change_B, "anchor_term": anchor_B}


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
