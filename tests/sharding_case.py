"""One optimizer step of a small GPT-2 on a given mesh: the shared case for the mesh tests.

Also runnable as a script, one process of a multi-process run:
    python tests/sharding_case.py PROCESS_ID NUM_PROCESSES PORT MESH
prints the step's loss and gradient norm as JSON.
"""

import json
import sys

import numpy as np

CONFIG = dict(vocab_size=300, n_head=8)  # 8 heads and width 64: every axis of 8 devices divides
BATCH, LENGTH = 8, 16


def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CONFIG["vocab_size"], (BATCH, LENGTH)).astype(np.int32)
    mask = (np.arange(LENGTH)[None] < rng.integers(8, LENGTH + 1, (BATCH, 1))).astype(np.int32)
    loss_mask = mask.copy()
    loss_mask[:, :4] = 0
    return dict(input_ids=ids * mask, attention_mask=mask, loss_mask=loss_mask)


def one_step(mesh, local_rows=None):
    """(loss, grad_norm, params after one SGD step) with the batch placed on `mesh`."""
    import optax

    from cvxdpo import mesh as mesh_lib
    from cvxdpo.model import gpt2
    from cvxdpo.train import objectives
    from cvxdpo.train import state as state_lib
    from cvxdpo.train import step as step_lib

    tx = optax.sgd(0.5)  # plain SGD: the update is a linear function of the gradient, so comparable
    graphdef, state, shardings = state_lib.create_train_state(gpt2.preset("tiny", **CONFIG), tx, mesh, seed=0)
    step = step_lib.make_train_step(objectives.SFTObjective(), graphdef, tx, mesh, shardings)
    rows = batch() if local_rows is None else local_rows
    state, metrics = step(state, mesh_lib.place_batch(rows, mesh))
    return float(metrics["loss"]), float(metrics["grad_norm"]), state.params


if __name__ == "__main__":
    import os

    process_id, num_processes, port, shape = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // num_processes}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    from cvxdpo import mesh as mesh_lib

    mesh_lib.initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id)
    per = BATCH // num_processes
    local = {k: v[process_id * per:(process_id + 1) * per] for k, v in batch().items()}
    loss, grad_norm, _ = one_step(mesh_lib.make_mesh(shape), local)
    print(json.dumps({"process": process_id, "loss": loss, "grad_norm": grad_norm}), flush=True)
