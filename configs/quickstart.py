"""Offline quickstart: a small GPT-2 trained from scratch on the bundled tutor conversations, SFT then DPO-Convex.

    python -m launch.train --config=configs/quickstart.py --workdir=runs/quickstart

Needs no network: the tokenizer is a byte-level BPE trained on the bundled
conversations, the model a 4-layer, 128-wide GPT-2. Each stage runs in
<workdir>/<stage>, the second starting from the first; the report compares
held-out preference accuracy before and after and samples a few replies.
"""

import ml_collections

from configs import base


def get_config():
    c = base.experiment("tutor", "sft")
    c.model.name, c.model.init = "small", "scratch"
    c.tokenizer.spec, c.tokenizer.vocab_size = "train", 2048
    c.data.max_length, c.data.max_prompt_length = 96, 48
    c.data.buckets = (64,)
    c.data.eval_fraction = 0.05
    c.train.update(optimizer="adamw", batch_size=32, warmup_steps=20, log_every=25, eval_every=10_000,
                   checkpoint_every=100)
    c.stages = "sft,dpo_convex"
    # Per-stage overrides, by section (e.g. --config.dpo_convex.loss.beta=0.5 on the command line; a shared
    # field such as --config.loss.beta=0.5 reaches every stage).
    c.sft = ml_collections.ConfigDict({"train": dict(method="sft", steps=250, learning_rate=2e-3)})
    c.dpo_convex = ml_collections.ConfigDict({"train": dict(method="dpo_convex", steps=100, learning_rate=2e-4),
                                              "loss": dict(beta=0.1),
                                              "anchor": dict(buffer=256, refresh_every=10)})
    return c
