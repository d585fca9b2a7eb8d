"""tools/scaling.py's memory model against XLA's compiled memory analysis of the real train step, on simulated CPU
meshes of up to 8 devices (tiny GPT-2 shapes, float32), and its mesh refusals against the trainer's own."""

import importlib.util
import os

import jax
import numpy as np
import optax
import pytest

from cvxdpo import mesh as mesh_lib
from cvxdpo.model import gpt2
from cvxdpo.train import objectives
from cvxdpo.train import state as state_lib
from cvxdpo.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("scaling", os.path.join(ROOT, "tools", "scaling.py"))
scaling = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scaling)

SEQUENCES, LENGTH = 16, 64
# The memory model's remat keeps only each layer's input; its coefficients were fitted on the full-logits path.
CFG = gpt2.GPT2Config(vocab_size=300, n_layer=2, n_embd=128, n_head=8, n_inner=384, n_positions=64,
                      remat_policy="nothing", logprob_chunk=0)


def compiled_memory(cfg, shape: str):
    """XLA's memory analysis (per device) of one SFT train step with AdamW on `shape`."""
    mesh = mesh_lib.make_mesh(shape, jax.devices()[:1] if shape == "1,1,1" else None)
    tx = optax.adamw(1e-3)
    graphdef, state, shardings = state_lib.create_train_state(cfg, tx, mesh, seed=0)
    step = step_lib.make_train_step(objectives.SFTObjective(), graphdef, tx, mesh, shardings)
    ones = np.ones((SEQUENCES, LENGTH), np.int32)
    batch = step_lib.place_batch(dict(input_ids=0 * ones, attention_mask=ones, loss_mask=ones), mesh)
    with mesh_lib.use_mesh(mesh):
        return step.jitted.lower(state, batch).compile().memory_analysis()


@pytest.mark.parametrize("shape, remat", [("1,1,1", False), ("8,1,1", False), ("1,8,1", False), ("1,1,8", False),
                                          ("2,2,2", False), ("1,1,1", True), ("2,2,2", True)])
def test_memory_model_matches_xla(shape, remat):
    """Parameters and AdamW state to 2% (they are the step's arguments, with a few KiB of batch), gradients plus
    activations to 35% (XLA's temporaries)."""
    cfg = CFG.replace(remat=remat)
    analysis = compiled_memory(cfg, shape)
    mesh = dict(zip(mesh_lib.MESH_AXES, map(int, shape.split(","))))
    model = scaling.memory(cfg, mesh, SEQUENCES, LENGTH, method="sft", dtype="float32")
    state = model["params"] + model["optimizer"]
    assert analysis.argument_size_in_bytes == pytest.approx(state, rel=0.02)
    key = "activations_remat" if remat else "activations"
    temporaries = model["gradients"] + model[key] + model.get("gathered_layer", 0)
    assert analysis.temp_size_in_bytes == pytest.approx(temporaries, rel=0.35)


def test_remat_saves_what_the_model_says():
    """The activations remat saves, as a fraction, agree with XLA's to within 15 points."""
    mesh = dict(zip(mesh_lib.MESH_AXES, (1, 1, 1)))
    model = scaling.memory(CFG, mesh, SEQUENCES, LENGTH, method="sft", dtype="float32")
    xla = [compiled_memory(CFG.replace(remat=r), "1,1,1").temp_size_in_bytes for r in (False, True)]
    predicted = [model["gradients"] + model[k] for k in ("activations", "activations_remat")]
    assert abs(xla[1] / xla[0] - predicted[1] / predicted[0]) < 0.15


@pytest.mark.parametrize("shape", [(1, 1, 8), (1, 8, 1), (2, 2, 2)])
def test_refusals_are_the_trainers(shape):
    """A mesh the table marks refused is one the model refuses to be built on, and the other way round."""
    cfg = CFG.replace(n_head=4, n_embd=64, n_inner=256)  # 4 heads: a tensor axis of 8 does not divide them
    mesh = mesh_lib.make_mesh(",".join(map(str, shape)))
    why = scaling.refusal(cfg, dict(zip(mesh_lib.MESH_AXES, shape)), pairs=8)
    try:
        gpt2.check_fits_mesh(cfg, mesh)
        refused = None
    except Exception as e:  # noqa: BLE001
        refused = str(e)
    assert why == refused


def test_table_covers_every_model_layout_and_size(tmp_path):
    rows = scaling.table(pairs=256, length=512, dtype="bfloat16")
    assert {(r["model"], r["layout"], r["devices"]) for r in rows} == {
        (m, layout, n) for m in scaling.MODELS for layout in scaling.LAYOUTS for n in scaling.DEVICES}
    gpt2_data = [r for r in rows if r["model"] == "gpt2" and r["layout"] == "data"]
    assert all(r["params"] == gpt2_data[0]["params"] for r in gpt2_data)  # data parallel replicates
    fsdp = {r["devices"]: r for r in rows if r["model"] == "gpt2-medium" and r["layout"] == "fsdp"}
    assert fsdp[8]["params"] == pytest.approx(fsdp[1]["params"] / 8, rel=0.01)  # biases, norms stay whole
    assert fsdp[8]["params"] > fsdp[1]["params"] / 8
    assert any("n_head=25" in r.get("refused", "") for r in rows if r["model"] == "gpt2-1.5b")
