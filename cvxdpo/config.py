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

import difflib
import math
import os
import tempfile

import ml_collections
from absl import logging
from ml_collections import config_dict

from cvxdpo.errors import ConfigError

METHODS = ("sft", "dpo", "dpo_convex")
REFERENCES = ("frozen", "precomputed")
OPTIMIZERS = ("rmsprop", "adamw")
SOURCES = ("tutor", "shp", "imdb", "hh", "jsonl")
DTYPES = ("float32", "bfloat16")
# The GPT2Config fields `model.overrides` may set for a scratch preset (the vocabulary, special tokens and
# numerics come from the tokenizer and the other `model` fields), with their types.
MODEL_OVERRIDES = {"n_layer": int, "n_embd": int, "n_head": int, "n_positions": int, "n_inner": int,
                   "layer_norm_epsilon": float}
MAX_ROW_BYTES = 1 << 20  # data.max_row_bytes: one row (a JSON line, a CSV field, a review file) at most


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mesh = "-1,1,1"

    c.model = ml_collections.ConfigDict()
    c.model.name = "gpt2"  # a preset (fresh weights when init == "scratch"), a hub name or a local directory
    c.model.init = "pretrained"  # "pretrained" (hub/dir weights) or "scratch" (a preset trained from zero)
    c.model.dtype = "float32"  # compute dtype; bfloat16 on accelerators
    # Recompute activations in the backward pass, keeping what remat_policy says: "dots" (the matmul outputs;
    # measured -37% peak memory at no measurable step time, docs/benchmarks.md) or "nothing".
    c.model.remat = True
    c.model.remat_policy = "dots"
    c.model.logprob_chunk = 32  # response positions scored per chunk without full logits; 0: full logits
    # Shape changes of a scratch preset, e.g. n_layer; unset (None) keeps the preset's value. Declared (typed)
    # here so that `--config.model.overrides.n_layer=3` works: the command line can only set existing fields.
    c.model.overrides = ml_collections.ConfigDict({k: config_dict.placeholder(t) for k, t in MODEL_OVERRIDES.items()})

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.spec = "gpt2"  # "gpt2", a directory, a hub name, or "train" (byte-level BPE on the train data)
    c.tokenizer.vocab_size = 4096  # for "train"

    c.data = ml_collections.ConfigDict()
    c.data.source = "tutor"
    c.data.path = ""  # file or directory; "" = the bundled tutor set (tutor) / required otherwise
    c.data.eval_path = ""  # held-out file; "" = split eval_fraction off the training source
    c.data.eval_fraction = 0.05  # 0 = no held-out split: training without held-out evaluation
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
    c.data.max_row_bytes = MAX_ROW_BYTES  # a longer row is skipped and counted: loading memory stays bounded

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
    # The divergence guard (cvxdpo.train.trainer.diverged): a loss or log-prob beyond these stops the run.
    c.train.max_abs_loss = 1e4
    c.train.max_abs_logp = 1e6

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


def unknown_key(config: ml_collections.ConfigDict, key: str) -> str | None:
    """What is wrong with the dotted key `key` of `config` (an unknown field, with the closest known one, or
    a field below a plain value); None when it names a field."""
    node, path = config, []
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict):
            return f"unknown config key {key}: {'.'.join(path)} is a {type(node).__name__}, not a section"
        if part not in node:
            close = difflib.get_close_matches(part, list(node.keys()), n=1)
            hint = (f"; did you mean {'.'.join(path + close)}?" if close
                    else f"; {'.'.join(path) or 'the config'} has {', '.join(sorted(node.keys()))}")
            return f"unknown config key {'.'.join(path + [part])}{hint}"
        node, path = node[part], path + [part]
    return None


def _fields(node: ml_collections.ConfigDict, path: tuple[str, ...] = ()):
    """(dotted key, value) of every field of a config tree, each section before the fields in it."""
    for key, value in node.items():
        yield ".".join((*path, key)), value
        if isinstance(value, ml_collections.ConfigDict):
            yield from _fields(value, (*path, key))


def _check_keys(c: ml_collections.ConfigDict) -> None:
    """Every field of `c` is one of the defaults': a misspelt field in a config file would be ignored."""
    defaults = default_config()
    for key, _ in _fields(c):
        problem = unknown_key(defaults, key)
        if problem:
            raise ConfigError(problem)


def _check_numbers(c: ml_collections.ConfigDict) -> None:
    """No field is NaN: NaN passes every range check (each comparison is false), so it would surface only as
    a diverged loss, blamed on the learning rate. The divergence guard's bounds must be positive: at 0 every
    run stops at its first step, with the same wrong blame."""
    for key, value in _fields(c):
        if isinstance(value, float) and math.isnan(value):
            raise ConfigError(f"{key} is NaN; it needs a number")
    for name in ("max_abs_loss", "max_abs_logp"):
        if not c.train[name] > 0:
            raise ConfigError(f"train.{name} must be positive, got {c.train[name]}")


def _check_model(c: ml_collections.ConfigDict) -> None:
    if c.model.logprob_chunk < 0:
        raise ConfigError(f"model.logprob_chunk must be >= 0 (0: full logits), got {c.model.logprob_chunk}")
    overrides = [k for k, v in c.model.overrides.items() if v is not None]
    if overrides and (c.model.init != "scratch" or c.train.init_from):
        logging.warning("model.overrides (%s) are ignored: a pretrained model's shape is its config.json's",
                        ", ".join(overrides))


def _check_data(c: ml_collections.ConfigDict) -> None:
    """The `data` values read here (lengths, buckets and truncation are checked by the data pipeline's
    TokenizeConfig, built before any data is read)."""
    if not 0 <= c.data.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction must be in [0, 1), got {c.data.eval_fraction}")
    if c.data.max_row_bytes <= 0:
        raise ConfigError(f"data.max_row_bytes must be positive, got {c.data.max_row_bytes}")
    if c.data.workers < 0:
        raise ConfigError(f"data.workers must be >= 0, got {c.data.workers}")


def check_workdir(workdir: str) -> None:
    """Creates the run directory and makes sure that files can be written in it, so that a path through a
    file or a read-only disk is named here, before any work, rather than failing on the first checkpoint."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir!r} exists and is not a directory")
    ancestor = os.path.dirname(os.path.abspath(workdir))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ConfigError(f"--workdir {workdir!r} cannot be created: {ancestor!r} is a file, not a directory")
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise ConfigError(f"--workdir {workdir!r} is not writable ({e.strerror or e})") from None


def validate(c: ml_collections.ConfigDict, workdir: str | None = None) -> None:
    """Raises ConfigError naming the first impossible value (the `loss`, `signal` and `anchor` sections are
    checked by the dataclasses they build); with `workdir`, creates it (see `check_workdir`)."""
    _check_keys(c)
    _check_numbers(c)
    _choice(c.train.method, METHODS, "train.method")
    _choice(c.train.reference, REFERENCES, "train.reference")
    _choice(c.train.optimizer, OPTIMIZERS, "train.optimizer")
    _choice(c.data.source, SOURCES, "data.source")
    _choice(c.model.dtype, DTYPES, "model.dtype")
    _choice(c.train.reference_dtype, DTYPES, "train.reference_dtype")
    _choice(c.model.init, ("pretrained", "scratch"), "model.init")
    _choice(c.train.schedule, ("constant", "cosine"), "train.schedule")
    _check_model(c)
    _check_data(c)
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
    if workdir is not None:
        check_workdir(workdir)
