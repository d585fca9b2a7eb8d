"""A tiny, fast training config over a learnable JSONL pair set; also a config file for launch.train.

    python -m launch.train --config=tests/tiny_config.py:PAIRS_FILE --workdir=DIR

Chosen responses draw their words from one vocabulary and rejected ones from
another, at equal lengths, so held-out preference accuracy starts near chance
and a working DPO drives it towards 1.
"""

import json
import random

from cvxdpo.config import default_config

GOOD = "bright clear kind warm helpful calm precise gentle honest patient".split()
BAD = "dull vague rude cold useless loud sloppy harsh false hasty".split()
TOPICS = "cells stars rivers chess music maps atoms myths poems wars".split()


def write_pairs(path: str, n: int = 240, seed: int = 0) -> str:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            k = rng.randint(3, 6)
            row = {"prompt": f"Tell me about {rng.choice(TOPICS)} number {i}.",
                   "chosen": " " + " ".join(rng.choice(GOOD) for _ in range(k)),
                   "rejected": " " + " ".join(rng.choice(BAD) for _ in range(k))}
            f.write(json.dumps(row) + "\n")
    return path


def get_config(pairs_path: str = ""):
    c = default_config()
    c.mesh = "-1,1,1"
    c.model.name, c.model.init = "tiny", "scratch"
    c.model.overrides.n_head = 8  # divides every axis of 8 devices
    c.tokenizer.spec, c.tokenizer.vocab_size = "train", 320
    c.data.update(source="jsonl", path=pairs_path, eval_fraction=0.25, max_length=32, max_prompt_length=16)
    c.train.update(method="dpo", optimizer="adamw", learning_rate=3e-3, warmup_steps=2, batch_size=8, steps=12,
                   log_every=1, eval_every=1000, checkpoint_every=4, progress=False)
    c.loss.update(name="sigmoid", beta=0.1)
    return c


def logged_losses(workdir) -> list[float]:
    """The training loss of every logged step of a run."""
    from cvxdpo.train.logs import read_metrics

    return [row["loss"] for row in read_metrics(str(workdir)) if "loss" in row]


def losses_on_one_device_and_2x2x2(config, tmp_path):
    """(losses on 1 device, losses on a 2,2,2 mesh of 8) for the same config, each logged step."""
    import jax

    from cvxdpo.train.trainer import Trainer

    eight = config.copy_and_resolve_references()
    eight.mesh = "2,2,2"
    Trainer(config, str(tmp_path / "one"), devices=jax.devices()[:1]).run()
    Trainer(eight, str(tmp_path / "eight")).run()
    return logged_losses(tmp_path / "one"), logged_losses(tmp_path / "eight")
