"""Jitted train and eval steps: explicit in/out shardings from the mesh rules, the state donated.

Gradient accumulation splits the batch into `micro_batches` passes under
`lax.scan`. Micro-batch m takes rows m, m + M, m + 2M, ... so that every
micro-batch is spread over all devices like the full batch; the loss
denominator comes from the whole batch, so the result equals one big pass.
Nothing leaves the device inside a step: metrics come back as arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from cvxdpo import mesh as mesh_lib
from cvxdpo.train.state import TrainState

BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask", "weight", "ref_logps")  # what a step reads


def place_batch(batch: dict, mesh) -> dict:
    """This process's rows of a pipeline batch as global arrays sharded over (data, fsdp); bookkeeping keys
    (such as `index`) stay on the host."""
    return mesh_lib.place_batch({k: v for k, v in batch.items() if k in BATCH_KEYS}, mesh)


def _split(batch: dict, micro: int) -> dict:
    """(B, ...) -> (micro, B / micro, ...), micro-batch m holding rows m, m + micro, ..."""
    def one(x):
        x = x.reshape(x.shape[0] // micro, micro, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(one, batch)


def _merge(terms: dict) -> dict:
    """Inverse of _split for per-example vectors: (micro, B / micro) -> (B,) in the original order."""
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:]), terms)


def _under_mesh(jitted, mesh):
    def run(*args):
        with mesh_lib.use_mesh(mesh):
            return jitted(*args)

    run.jitted = jitted  # to lower and compile it ahead of time (tools/scaling.py reads its memory analysis)
    return run


def jit_step(fn, mesh: jax.sharding.Mesh, shardings: TrainState):
    """jit(fn(state, batch) -> (state, metrics)) with the state's shardings, a (data, fsdp) batch, donated state."""
    return _under_mesh(jax.jit(fn, in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                               out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0), mesh)


def make_train_step(objective, graphdef, tx: optax.GradientTransformation, mesh, shardings: TrainState,
                    micro_batches: int = 1, schedule=None):
    """One optimizer step of `objective` (see cvxdpo.train.objectives) on the model `graphdef`."""

    def step(state: TrainState, batch: dict):
        denominator = objective.denominator(batch)

        def micro_loss(params, mb):
            terms = objective.terms(graphdef, params, state, mb)
            return terms["loss"].sum() / denominator, terms

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        if micro_batches == 1:
            (loss, terms), grads = grad_fn(state.params, batch)
        else:
            def body(acc, mb):
                (l, t), g = grad_fn(state.params, mb)
                return (acc[0] + l, jax.tree.map(jnp.add, acc[1], g)), t

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (loss, grads), stacked = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), _split(batch, micro_batches))
            terms = _merge(stacked)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**objective.metrics(terms, batch), "loss": loss, "grad_norm": optax.tree.norm(grads)}
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        extra, extra_metrics = objective.update_extra(state, terms, batch)
        metrics.update(extra_metrics)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, extra=extra), metrics

    return jit_step(step, mesh, shardings)


def make_eval_step(objective, graphdef, mesh, shardings: TrainState):
    """The objective's per-example terms of one batch, (B,) arrays only (no update, nothing donated)."""

    def step(state: TrainState, batch: dict):
        terms = objective.terms(graphdef, state.params, state, batch)
        return {k: v for k, v in terms.items() if v.ndim == 1}

    return _under_mesh(jax.jit(step, in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                               out_shardings=mesh_lib.replicated(mesh)), mesh)
