"""The config tree (mesh, model, tokenizer, data, train, loss, signal, anchor) with every default in one place.

Experiment files in `configs/` start from `default_config()` and change only
what differs; `validate` turns an impossible value into one clear ConfigError.
The `loss`, `signal` and `anchor` sections hold exactly the fields of the
dataclasses they build (`losses.LossConfig`, `losses.SignalConfig`,
`anchor.AnchorConfig`, through `cvxdpo.train.objectives.build`).
The defaults for DPO are the official DPO code's: RMSprop, lr 5e-7, 150 linear
warm-up steps, gradient clipping 10, batch 64, max_length 512,
max_prompt_length 256, beta 0.1.
"""

from __future__ import annotations

import os

import ml_collections

from cvxdpo.errors import ConfigError

METHODS = ("sft", "dpo", "dpo_convex")
REFERENCES = ("frozen", "precomputed")
OPTIMIZERS = ("rmsprop", "adamw")
SOURCES = ("tutor", "shp", "imdb", "hh", "jsonl")
DTYPES = ("float32", "bfloat16")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mesh = "-1,1,1"

    c.model = ml_collections.ConfigDict()
    c.model.name = "gpt2"  # a preset (fresh weights when init == "scratch"), a hub name or a local directory
    c.model.init = "pretrained"  # "pretrained" (hub/dir weights) or "scratch" (a preset trained from zero)
    c.model.dtype = "float32"  # compute dtype; bfloat16 on accelerators
    c.model.remat = False
    c.model.overrides = ml_collections.ConfigDict()  # e.g. n_layer for a scratch preset

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.spec = "gpt2"  # "gpt2", a directory, a hub name, or "train" (byte-level BPE on the train data)
    c.tokenizer.vocab_size = 4096  # for "train"

    c.data = ml_collections.ConfigDict()
    c.data.source = "tutor"
    c.data.path = ""  # file or directory; "" = the bundled tutor set (tutor) / required otherwise
    c.data.eval_path = ""  # held-out file; "" = split eval_fraction off the training source
    c.data.eval_fraction = 0.05
    c.data.split = "train"
    c.data.eval_split = "test"
    c.data.domains = ()  # SHP domain filter
    c.data.max_pairs_per_post = 5  # SHP cap (dataset card); 0 = no cap
    c.data.slide = True  # tutor: every position of the conversation, not only i = 0
    c.data.with_history = False
    c.data.max_length = 512
    c.data.max_prompt_length = 256
    c.data.truncation = "keep_end"
    c.data.buckets = ()
    c.data.strict = False
    c.data.workers = 0
    c.data.cache_dir = ""  # where hub downloads and decompressed copies go; "" = <workdir>/cache

    c.train = ml_collections.ConfigDict()
    c.train.method = "dpo"
    c.train.reference = "frozen"
    c.train.reference_dtype = "float32"
    c.train.optimizer = "rmsprop"
    c.train.learning_rate = 5e-7
    c.train.warmup_steps = 150
    c.train.schedule = "constant"  # after warm-up: "constant" or "cosine" (to a tenth of the peak at train.steps)
    c.train.weight_decay = 0.0
    c.train.grad_clip = 10.0
    c.train.batch_size = 64
    c.train.micro_batches = 1  # gradient accumulation: the batch is split into this many passes
    c.train.steps = 1000
    c.train.seed = 0
    c.train.log_every = 10
    c.train.eval_every = 200
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 2
    c.train.init_from = ""  # a workdir (e.g. the SFT run) whose latest parameters start this run
    c.train.export_hf = True  # write <workdir>/hf (config.json, model.safetensors, tokenizer) at the end
    c.train.progress = True

    # The DPO-family loss (train.method = "dpo"); `beta` is DPO-Convex's beta too.
    c.loss = ml_collections.ConfigDict()
    c.loss.name = "sigmoid"  # sigmoid | ipo | hinge | reference_free | simpo
    c.loss.beta = 0.1
    c.loss.label_smoothing = 0.0
    c.loss.simpo_gamma = 0.5  # SimPO's target margin (in units of beta * length-normalized log-prob)
    c.loss.ipo_normalize_length = False  # True: IPO on length-normalized log-probs (official: summed)

    # DPO-Convex (train.method = "dpo_convex"): how the anchor's margin enters the loss ...
    c.signal = ml_collections.ConfigDict()
    c.signal.name = "margin"  # distill | margin | soft_label
    c.signal.gamma = 4.0  # weight of the convex margin (distill, margin), in units of `scale`
    c.signal.scale = "standardized"  # none (raw m) | standardized (m / its RMS over the buffer at the last refit)
    c.signal.tau = 1.0  # temperature of the soft label
    c.signal.eps = 0.05  # soft label kept in [0.5, 1 - eps]
    c.signal.normalize_length = False  # length-normalized log-probs, as SimPO

    # ... and the anchor: features, buffer and the ADMM refit of the convex network.
    c.anchor = ml_collections.ConfigDict()
    c.anchor.dim = 32
    c.anchor.buffer = 256  # pairs; a multiple of train.batch_size
    c.anchor.refresh_every = 10
    c.anchor.num_gates = 16
    c.anchor.reg = 0.01
    c.anchor.loss = "logistic"
    c.anchor.admm_iters = 100
    c.anchor.probe = "convex"  # convex (gated ReLU network) | linear (logistic regression, a control)
    c.anchor.control = "none"  # none | shuffled (m permuted over the batch's pairs) | constant (batch mean |m|)
    c.anchor.features = "policy"  # policy | frozen (the starting model's hidden states: a frozen copy, a control)
    return c


def _choice(value, options, name):
    if value not in options:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(options)}")


def validate(c: ml_collections.ConfigDict, workdir: str | None = None) -> None:
    """Raises ConfigError naming the first impossible value (the `loss`, `signal` and `anchor` sections are
    checked by the dataclasses they build)."""
    _choice(c.train.method, METHODS, "train.method")
    _choice(c.train.reference, REFERENCES, "train.reference")
    _choice(c.train.optimizer, OPTIMIZERS, "train.optimizer")
    _choice(c.data.source, SOURCES, "data.source")
    _choice(c.model.dtype, DTYPES, "model.dtype")
    _choice(c.train.reference_dtype, DTYPES, "train.reference_dtype")
    _choice(c.model.init, ("pretrained", "scratch"), "model.init")
    _choice(c.train.schedule, ("constant", "cosine"), "train.schedule")
    if c.train.method == "dpo_convex" and c.anchor.buffer % c.train.batch_size:
        raise ConfigError(f"anchor.buffer={c.anchor.buffer} must be a multiple of train.batch_size={c.train.batch_size}")
    for name in ("batch_size", "micro_batches", "steps", "log_every", "eval_every", "checkpoint_every",
                 "keep_checkpoints"):
        if int(c.train[name]) <= 0:
            raise ConfigError(f"train.{name} must be positive, got {c.train[name]}")
    if c.train.learning_rate <= 0:
        raise ConfigError(f"train.learning_rate must be positive, got {c.train.learning_rate}")
    if c.train.warmup_steps < 0 or c.train.grad_clip < 0:
        raise ConfigError("train.warmup_steps and train.grad_clip must be >= 0")
    if c.train.batch_size % c.train.micro_batches:
        raise ConfigError(f"train.batch_size={c.train.batch_size} is not divisible by "
                          f"train.micro_batches={c.train.micro_batches}")
    if not 0 <= c.data.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction must be in [0, 1), got {c.data.eval_fraction}")
    if workdir is not None and os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir!r} exists and is not a directory")
