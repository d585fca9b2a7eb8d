"""Sharded execution on 8 simulated CPU devices: shape invariance, real shards, two hosts, bad input."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cvxdpo import mesh as mesh_lib
from cvxdpo.errors import ConfigError
from cvxdpo.model import gpt2, hub
from hf_reference import write_hf_gpt2
from multiprocess import free_port
from sharding_case import batch, one_step


def _relative(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-30))


@pytest.fixture(scope="module")
def reference_step():
    one_device = mesh_lib.make_mesh("1,1,1", devices=jax.devices()[:1])
    return one_step(one_device)


@pytest.mark.parametrize("shape", ["8,1,1", "2,4,1", "2,2,2", "1,1,8", "1,2,4"])
def test_one_step_is_mesh_shape_invariant(reference_step, shape):
    loss0, norm0, params0 = reference_step
    loss, norm, params = one_step(mesh_lib.make_mesh(shape))
    assert abs(loss - loss0) <= 1e-5 * abs(loss0)
    assert abs(norm - norm0) <= 1e-5 * abs(norm0)
    flat0, flat = jax.tree.leaves(params0), jax.tree.leaves(params)
    assert len(flat0) == len(flat)
    for a, b in zip(flat, flat0):
        assert _relative(a, b) <= 1e-5


def test_parse_mesh_shapes():
    assert mesh_lib.parse_mesh_shape("-1,1,1", 8) == (8, 1, 1)
    assert mesh_lib.parse_mesh_shape("2,-1,2", 8) == (2, 2, 2)
    assert mesh_lib.parse_mesh_shape((1, 1, 1), 1) == (1, 1, 1)
    assert mesh_lib.make_mesh().shape == {"data": 8, "fsdp": 1, "tensor": 1}


def test_tensor_axis_splits_the_mlp_kernel():
    cfg = gpt2.GPT2Config(n_layer=1, n_embd=768, n_head=12, vocab_size=512, n_positions=64)
    model = gpt2.create(cfg, mesh=mesh_lib.make_mesh("4,1,2"))
    kernel = model.blocks.fc_kernel[...]
    assert kernel.shape == (1, 768, 3072)
    assert {s.data.shape for s in kernel.addressable_shards} == {(1, 768, 1536)}
    qkv = model.blocks.qkv_kernel[...]
    assert {s.data.shape for s in qkv.addressable_shards} == {(1, 768, 3, 6, 64)}  # 12 heads -> 6 per device


def test_fsdp_never_holds_a_whole_embedding():
    cfg = gpt2.GPT2Config(n_layer=1, n_embd=768, n_head=12, vocab_size=512, n_positions=64)
    model = gpt2.create(cfg, mesh=mesh_lib.make_mesh("1,8,1"))
    wte = model.wte[...]
    shards = wte.addressable_shards
    assert len(shards) == 8
    assert all(s.data.shape == (512, 96) for s in shards)  # 768 / 8 columns each
    assert all(s.data.size < wte.size for s in shards)


def test_hub_weights_land_sharded(tmp_path):
    write_hf_gpt2(tmp_path, vocab_size=300, n_head=8, bos_token_id=0, eos_token_id=0)
    one = hub.load_pretrained(str(tmp_path), mesh=mesh_lib.make_mesh("1,1,1", devices=jax.devices()[:1]))
    mesh = mesh_lib.make_mesh("2,2,2")
    many = hub.load_pretrained(str(tmp_path), mesh=mesh)
    assert {s.data.shape for s in many.blocks.fc_kernel[...].addressable_shards} == {(2, 32, 128)}
    rows = batch()
    placed = mesh_lib.place_batch(rows, mesh)
    with mesh_lib.use_mesh(mesh):
        sharded_logits = jax.jit(lambda ids, m: many(ids, m).logits)(placed["input_ids"], placed["attention_mask"])
    ref = one(rows["input_ids"], rows["attention_mask"]).logits
    valid = rows["attention_mask"].astype(bool)
    assert np.abs(np.asarray(sharded_logits)[valid] - np.asarray(ref)[valid]).max() < 1e-5


def test_two_processes_form_one_mesh(reference_step):
    """Two local processes with 4 CPU devices each, joined by jax.distributed on 127.0.0.1."""
    port = str(free_port())
    script = os.path.join(os.path.dirname(__file__), "sharding_case.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, script, str(i), "2", port, "2,2,2"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    loss0, norm0, _ = reference_step
    eight = one_step(mesh_lib.make_mesh("2,2,2"))
    for result in outputs:
        assert abs(result["loss"] - eight[0]) <= 1e-5 * abs(eight[0])
        assert abs(result["grad_norm"] - eight[1]) <= 1e-5 * abs(eight[1])
        assert abs(result["loss"] - loss0) <= 1e-5 * abs(loss0)


# --- bad input -------------------------------------------------------------------------------

def test_mesh_product_must_equal_device_count():
    with pytest.raises(ConfigError, match=r"mesh shape \(2, 2, 1\) has 4 slots but 8 devices are present"):
        mesh_lib.make_mesh("2,2,1")
    with pytest.raises(ConfigError, match="8 devices are not divisible by the fixed axes' product 3"):
        mesh_lib.make_mesh("-1,3,1")
    with pytest.raises(ConfigError, match="must have 3 entries"):
        mesh_lib.make_mesh("8,1")
    with pytest.raises(ConfigError, match="not a comma-separated list of integers"):
        mesh_lib.make_mesh("eight")


def test_batch_must_divide_over_data_axes():
    mesh = mesh_lib.make_mesh("2,2,2")
    with pytest.raises(ConfigError, match=r"size 6 is not divisible by the mesh's data x fsdp = 2 x 2 = 4"):
        mesh_lib.place_batch({"input_ids": np.zeros((6, 4), np.int32)}, mesh)


def test_heads_must_divide_over_tensor_axis():
    cfg = gpt2.preset("tiny", vocab_size=300)  # 4 heads
    with pytest.raises(ConfigError, match="n_head=4 is not divisible by the mesh's tensor axis of size 8"):
        gpt2.create(cfg, mesh=mesh_lib.make_mesh("1,1,8"))


def test_fits_mesh_follows_the_mesh_axis_names_and_rules(monkeypatch):
    cfg = gpt2.preset("tiny", vocab_size=300, n_head=8, n_inner=36)
    auto = jax.sharding.AxisType.Auto
    renamed = jax.make_mesh((1, 1, 8), ("data", "fsdp", "model"), axis_types=(auto,) * 3)
    extra = jax.make_mesh((1, 1, 4, 2), ("data", "fsdp", "tensor", "expert"), axis_types=(auto,) * 4)
    monkeypatch.setattr(mesh_lib, "LOGICAL_RULES", tuple(
        (name, "model" if axes == "tensor" else axes) for name, axes in mesh_lib.LOGICAL_RULES))
    with pytest.raises(ConfigError, match="MLP width=36 is not divisible by the mesh's model axis of size 8"):
        gpt2.check_fits_mesh(cfg, renamed)
    monkeypatch.setattr(mesh_lib, "LOGICAL_RULES", tuple(
        (name, ("tensor", "expert") if name == "mlp" else axes) for name, axes in mesh_lib.LOGICAL_RULES))
    with pytest.raises(ConfigError, match="MLP width=36 is not divisible by the mesh's tensor x expert axes of size 8"):
        gpt2.check_fits_mesh(cfg, extra)
    gpt2.check_fits_mesh(cfg.replace(n_inner=None), extra)  # width 256 divides
