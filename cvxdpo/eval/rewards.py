"""Known rewards by name: a scorer of generated texts that an evaluation can load from a saved model folder.

A reward maps a list of texts to one float per text (higher is better). The
registry keeps the name a config or command line gives apart from how its
model is stored.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from cvxdpo.errors import ConfigError, MissingFileError
from cvxdpo.eval import sentiment

Reward = Callable[[list[str]], np.ndarray]


def _sentiment(model_dir: str) -> Reward:
    """The IMDb benchmark's reward: the classifier's logit of "positive"."""
    return sentiment.load(model_dir).logits


REWARDS: dict[str, Callable[[str], Reward]] = {"sentiment": _sentiment}


def get_reward(name: str, model_dir: str) -> Reward:
    """The reward `name`, loaded from `model_dir`."""
    if name not in REWARDS:
        raise ConfigError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}")
    if not os.path.isdir(model_dir):
        raise MissingFileError(f"reward model directory {model_dir!r} does not exist")
    return REWARDS[name](model_dir)
