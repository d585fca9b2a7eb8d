"""Shared pieces of the experiment configs: each experiment is (dataset, method) over the defaults."""

from cvxdpo.config import default_config
from cvxdpo.errors import ConfigError

# Per-dataset data settings (everything else stays at cvxdpo.config's defaults).
DATASETS = {
    "tutor": dict(source="tutor", max_length=256, max_prompt_length=128, truncation="keep_start"),
    "shp": dict(source="shp", path="hub", max_length=512, max_prompt_length=256, truncation="keep_end",
                split="train", eval_split="validation"),
    "imdb": dict(source="imdb", path="hub", max_length=256, max_prompt_length=16, truncation="keep_start",
                 split="train", eval_split="test"),
    "hh": dict(source="hh", path="hub", max_length=512, max_prompt_length=256, truncation="keep_end",
               split="train", eval_split="test"),
}

# Per-method training settings. DPO keeps the official code's defaults (RMSprop, lr 5e-7, warm-up 150,
# clip 10, batch 64, beta 0.1); SFT uses the same optimizer with a larger step.
METHODS = {
    "sft": dict(method="sft", learning_rate=1e-5),
    "dpo": dict(method="dpo", reference="frozen"),
    "dpo_convex": dict(method="dpo_convex"),
}


def experiment(dataset: str, method: str):
    """The defaults with one dataset's data settings and one method's training settings."""
    for name, value, known in (("dataset", dataset, DATASETS), ("method", method, METHODS)):
        if value not in known:
            raise ConfigError(f"{name} {value!r} is not one of {', '.join(known)}")
    c = default_config()
    c.model.name = "gpt2"
    c.data.update(DATASETS[dataset])
    c.train.update(METHODS[method])
    return c


def get_config(spec: str = "tutor,dpo"):
    """`--config=configs/base.py:DATASET,METHOD` on the command line (tools/ablate.py runs it this way)."""
    parts = spec.split(",")
    if len(parts) != 2:
        raise ConfigError(f"configs/base.py:{spec} should be configs/base.py:DATASET,METHOD, e.g. :tutor,dpo")
    return experiment(*parts)
