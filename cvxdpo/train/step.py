"""Jitted train steps: explicit in/out shardings from the mesh rules, the state donated."""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax
from flax import nnx

from cvxdpo import mesh as mesh_lib
from cvxdpo.train.state import TrainState

# loss_fn(model, batch) -> (scalar loss, dict of scalar metrics)
LossFn = Callable[[nnx.Module, dict], tuple[jax.Array, dict]]


def jit_step(fn, mesh: jax.sharding.Mesh, shardings: TrainState):
    """jit(fn(state, batch) -> (state, metrics)) with the state's shardings, a (data, fsdp) batch, donated state."""
    return jax.jit(fn, in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                   out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0)


def make_train_step(graphdef, tx: optax.GradientTransformation, loss_fn: LossFn, mesh, shardings: TrainState):
    """One optimizer step: loss and gradients of `loss_fn` w.r.t. the parameters, then the optax update."""

    def step(state: TrainState, batch: dict):
        def objective(params):
            return loss_fn(nnx.merge(graphdef, params), batch)

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    jitted = jit_step(step, mesh, shardings)

    def run(state, batch):
        with mesh_lib.use_mesh(mesh):
            return jitted(state, batch)

    return run
