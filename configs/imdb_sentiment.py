"""The DPO paper's controlled sentiment generation (section 6.1), offline on real IMDb reviews.

    python tools/ablate.py --task=imdb_sentiment --out=runs/imdb_sentiment    # every step below, resumable

One config file for every stage, named after the colon:
    --config=configs/imdb_sentiment.py:sft            SFT of a small GPT-2 (from scratch, its own BPE) on the
                                                      train reviews (data.path = the train CSV)
    --config=configs/imdb_sentiment.py:METHOD         a preference method on the sampled pairs (data.path =
                                                      train_pairs.jsonl, data.eval_path = valid_pairs.jsonl,
                                                      train.init_from = the SFT run)
METHOD is one of METHODS below; `loss.beta` is each method's strength, swept by tools/ablate.py.
"""

from configs import base

# Each method in its own recommended regime (the strength, loss.beta, is swept by the ablation).
METHODS = {  # in the order the ablation runs them (the controls and the cheapest baselines first)
    "dpo": {"train.method": "dpo", "loss.name": "sigmoid", "train.reference": "frozen"},
    "reference_free": {"train.method": "dpo", "loss.name": "reference_free"},
    "simpo": {"train.method": "dpo", "loss.name": "simpo", "loss.simpo_gamma": 1.0},  # SimPO: beta 2-2.5
    "convex_margin": {"train.method": "dpo_convex", "signal.name": "margin"},
    "ipo": {"train.method": "dpo", "loss.name": "ipo"},
    "convex_distill": {"train.method": "dpo_convex", "signal.name": "distill"},
    "convex_soft_label": {"train.method": "dpo_convex", "signal.name": "soft_label"},
    "dpo_precomputed": {"train.method": "dpo", "loss.name": "sigmoid", "train.reference": "precomputed"},
    # Controls of convex_margin (same budget): does the convex anchor matter? See cvxdpo/train/anchor.py.
    "convex_margin_linear": {"train.method": "dpo_convex", "signal.name": "margin", "anchor.probe": "linear"},
    "convex_margin_shuffled": {"train.method": "dpo_convex", "signal.name": "margin", "anchor.control": "shuffled"},
    "convex_margin_constant": {"train.method": "dpo_convex", "signal.name": "margin", "anchor.control": "constant"},
    "convex_margin_frozen": {"train.method": "dpo_convex", "signal.name": "margin", "anchor.features": "frozen"},
}
MAX_LENGTH = 64  # review openings: a 2-8 token prefix and its continuation


def _set(c, dotted: str, value) -> None:
    section, field = dotted.split(".")
    c[section][field] = value


def get_config(stage: str = "sft"):
    c = base.experiment("imdb", "sft")
    c.model.update(name="small", init="scratch")
    c.tokenizer.update(spec="train", vocab_size=4096)
    c.data.update(path="", max_length=MAX_LENGTH, max_prompt_length=16, truncation="keep_start", eval_fraction=0.02)
    c.train.update(optimizer="adamw", warmup_steps=50, log_every=10, checkpoint_every=200, progress=True)
    if stage == "sft":
        c.train.update(method="sft", batch_size=32, steps=3000, learning_rate=2e-3, eval_every=500, schedule="cosine")
        return c
    c.data.update(source="jsonl")
    c.train.update(batch_size=32, steps=150, learning_rate=1e-4, eval_every=10**6)
    c.anchor.update(buffer=256, refresh_every=5)
    for dotted, value in METHODS[stage].items():
        _set(c, dotted, value)
    return c
