"""Hugging Face GPT-2 weights in and out, with no torch at run time.

`load_pretrained` reads `config.json` and `model.safetensors` (or a sharded
`model.safetensors.index.json`) from a local directory in the hub's layout, or
downloads them with `huggingface_hub` when given a hub name. Each tensor is
checked for presence and shape, reshaped into cvxdpo's stacked layout and
placed on the mesh with its own sharding. `save_pretrained` writes files that
`transformers.GPT2LMHeadModel.from_pretrained` loads. A file that is not what
its name says (garbage bytes as model.safetensors, a config.json that is not
a JSON object of GPT-2 settings) is a one-line ConfigError or CheckpointError
naming the file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable

import jax
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx
from jax.experimental import multihost_utils

from cvxdpo import mesh as mesh_lib
from cvxdpo.errors import CheckpointError, ConfigError, MissingFileError
from cvxdpo.model import gpt2

# The preset names are also the short names of the hub's GPT-2 repositories.
HUB_REPOS = {
    "distilgpt2": "distilbert/distilgpt2",
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
}
_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_SPECS = {spec.path: spec for spec in gpt2.PARAMS}  # nnx state path -> its row of gpt2.PARAMS
_INT_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "bos_token_id", "eos_token_id")


def config_from_hf(hf: dict, where: str = "config.json", **overrides) -> gpt2.GPT2Config:
    """GPT2Config from a Hugging Face config dict; refuses what is not a plain GPT-2."""
    if not isinstance(hf, dict):
        raise ConfigError(f"{where}: holds a JSON {type(hf).__name__}, not an object of GPT-2 settings")
    for key in _INT_FIELDS:
        value = hf.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{where}: {key} is {value!r}, not an integer")
    epsilon = hf.get("layer_norm_epsilon", 1e-5)
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)):
        raise ConfigError(f"{where}: layer_norm_epsilon is {epsilon!r}, not a number")
    if hf.get("model_type") != "gpt2":
        raise ConfigError(f"{where}: model_type is {hf.get('model_type')!r}, not 'gpt2'; cvxdpo loads GPT-2 models only")
    act = hf.get("activation_function", "gelu_new")
    if act not in _TANH_GELUS:
        raise ConfigError(f"{where}: activation_function {act!r} is not GPT-2's tanh GELU")
    for flag, expected in (("scale_attn_by_inverse_layer_idx", False), ("reorder_and_upcast_attn", False),
                           ("scale_attn_weights", True)):
        if hf.get(flag, expected) != expected:
            raise ConfigError(f"{where}: {flag}={hf[flag]} is not supported")
    fields = dict(
        vocab_size=hf.get("vocab_size", 50257),
        n_positions=hf.get("n_positions", hf.get("n_ctx", 1024)),
        n_embd=hf.get("n_embd", 768),
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_inner=hf.get("n_inner"),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        bos_token_id=hf.get("bos_token_id") if hf.get("bos_token_id") is not None else 50256,
        eos_token_id=hf.get("eos_token_id") if hf.get("eos_token_id") is not None else 50256,
    )
    return gpt2.GPT2Config(**{**fields, **overrides})


def config_to_hf(cfg: gpt2.GPT2Config) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.n_positions,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.n_inner,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "resid_pdrop": 0.0,  # cvxdpo's GPT-2 has no dropout; loading ignores these three
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "tie_word_embeddings": True,
    }


def _resolve(name_or_dir: str) -> str:
    """A local directory holding the files, downloading from the hub when given a hub name."""
    if os.path.isdir(name_or_dir):
        return name_or_dir
    if not _HUB_ID.fullmatch(name_or_dir):
        raise MissingFileError(f"model directory {name_or_dir!r} does not exist (or is not a directory)")
    import huggingface_hub

    repo = HUB_REPOS.get(name_or_dir, name_or_dir)
    try:
        return huggingface_hub.snapshot_download(repo, allow_patterns=["config.json", "*.safetensors", _INDEX])
    except Exception as e:  # network, auth or missing-repo errors all mean: cannot get these weights
        reason = (str(e).splitlines() or [""])[0][:200]
        raise MissingFileError(
            f"{name_or_dir!r} is not a local directory and could not be fetched from the Hugging Face hub as {repo!r} "
            f"({type(e).__name__}: {reason}); pass a directory with config.json and {_WEIGHTS}"
        ) from None


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def _open_weights(path: str):
    """safetensors.safe_open, with a file that is not safetensors named as such."""
    try:
        return safetensors.safe_open(path, framework="numpy")
    except (safetensors.SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _tensor_reader(directory: str) -> Callable[[str], np.ndarray | None]:
    """A function key -> numpy tensor (None when absent), over one file or a sharded index."""
    index_path = os.path.join(directory, _INDEX)
    if os.path.exists(index_path):
        weight_map = _read_json(index_path)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ConfigError(f"{index_path}: has no 'weight_map' object of tensor name -> file name")
        files = {k: os.path.join(directory, v) for k, v in weight_map.items()}
    else:
        path = os.path.join(directory, _WEIGHTS)
        if not os.path.exists(path):
            raise MissingFileError(f"{directory}: no {_WEIGHTS} (or {_INDEX}); cvxdpo reads safetensors weights only")
        with _open_weights(path) as f:
            files = {k: path for k in f.keys()}

    def read(key: str) -> np.ndarray | None:
        for candidate in (key, "transformer." + key):
            if candidate in files:
                with _open_weights(files[candidate]) as f:
                    try:
                        return f.get_tensor(candidate)
                    except safetensors.SafetensorError as e:  # e.g. a file cut short after its header
                        raise CheckpointError(f"{files[candidate]}: cannot read tensor {candidate!r} ({e})") from None
        return None

    return read


def _hub_keys(spec: gpt2.ParamSpec, cfg: gpt2.GPT2Config) -> list[str]:
    """The hub tensor names of one parameter: one per layer for a per-layer parameter."""
    return [spec.hf_name.format(i=i) for i in range(cfg.n_layer)] if spec.per_layer else [spec.hf_name]


def _to_ours(spec: gpt2.ParamSpec, hub: np.ndarray, cfg: gpt2.GPT2Config, shape: tuple[int, ...]) -> np.ndarray:
    """A hub tensor as one layer of ours, of `shape`: flattened groups split, the vocabulary padded."""
    split = spec.hf_shape(cfg, flat=False)
    return np.pad(hub.reshape(split), [(0, n - s) for n, s in zip(shape, split)])


def _to_hub(spec: gpt2.ParamSpec, ours: np.ndarray, cfg: gpt2.GPT2Config) -> np.ndarray:
    """One layer of ours as a hub tensor: the vocabulary padding cut off, groups flattened."""
    split = spec.hf_shape(cfg, flat=False)
    return ours[tuple(slice(s) for s in split)].reshape(spec.hf_shape(cfg))


def load_pretrained(name_or_dir: str, mesh: jax.sharding.Mesh | None = None, **config_overrides) -> gpt2.GPT2:
    """A GPT2 with the weights of a hub name (e.g. "gpt2") or a local directory in the hub's layout.

    Each tensor is placed on `mesh` (default: all devices on the data axis) with
    the sharding its logical axes give, never gathered whole on one device.
    `config_overrides` (e.g. dtype="bfloat16") change the numerics, not shapes.
    """
    directory = _resolve(name_or_dir)
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise MissingFileError(f"{directory}: no config.json; a model directory needs config.json and {_WEIGHTS}")
    cfg = config_from_hf(_read_json(config_path), config_path, **config_overrides)
    read = _tensor_reader(directory)

    mesh = mesh or mesh_lib.make_mesh()
    graphdef, abstract = gpt2.abstract_model(cfg, mesh)
    flat = []
    for path, var in nnx.to_flat_state(abstract):
        spec, target = _SPECS[path], var.get_value()
        hub_shape = spec.hf_shape(cfg)
        pieces = []
        for k in _hub_keys(spec, cfg):
            t = read(k)
            if t is None:
                raise ConfigError(f"{directory}: tensor {k!r} is missing from the weights")
            if tuple(t.shape) != hub_shape:
                raise ConfigError(f"{directory}: tensor {k!r} has shape {tuple(t.shape)}, config.json implies {hub_shape}")
            pieces.append(_to_ours(spec, t, cfg, target.shape[1:] if spec.per_layer else target.shape))
        value = np.stack(pieces) if spec.per_layer else pieces[0]
        value = jax.device_put(value.astype(target.dtype), target.sharding)
        flat.append((path, var.replace(value=value)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def save_pretrained(model: gpt2.GPT2, directory: str) -> None:
    """Writes config.json and model.safetensors (hub key names) that transformers loads.

    Collective over processes (each gathers the sharded weights); only process 0 writes.
    """
    cfg = model.cfg
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ConfigError(f"save_pretrained: {directory!r} exists and is not a directory")
    tensors = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        host = np.asarray(multihost_utils.process_allgather(value, tiled=True)) if not value.is_fully_addressable \
            else np.asarray(jax.device_get(value))
        spec = _SPECS[path]
        layers = host.astype(np.float32) if spec.per_layer else [host.astype(np.float32)]
        for k, layer in zip(_hub_keys(spec, cfg), layers, strict=True):
            tensors[k] = np.ascontiguousarray(_to_hub(spec, layer, cfg))
    if jax.process_index() == 0:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(config_to_hf(cfg), f, indent=2)
        safetensors.numpy.save_file(tensors, os.path.join(directory, _WEIGHTS), metadata={"format": "pt"})
