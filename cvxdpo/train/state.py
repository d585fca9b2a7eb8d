"""The train state: one pytree holding everything a step reads or changes, created already sharded."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from cvxdpo import mesh as mesh_lib
from cvxdpo.model import gpt2


@struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State  # the policy's nnx.Param leaves
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key data, so that checkpoints hold a plain array
    ref_params: Any = None  # frozen reference copy (DPO with reference="frozen"); None otherwise
    extra: Any = None  # method-specific state (the convex anchor of DPO-Convex)


def state_shardings(tx, param_shardings, abstract_params, mesh, with_reference: bool, extra=None) -> TrainState:
    """Shardings of a TrainState: optimizer moments and the reference follow their parameters, scalars replicate."""
    rep = mesh_lib.replicated(mesh)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt = optax.tree_utils.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                           transform_non_params=lambda _: rep)
    return TrainState(step=rep, params=param_shardings, opt_state=opt, rng=rep,
                      ref_params=param_shardings if with_reference else None,
                      extra=None if extra is None else jax.tree.map(lambda _: rep, extra))


def create_train_state(cfg: gpt2.GPT2Config, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                       seed: int = 0, params: nnx.State | None = None, reference_dtype: str | None = None,
                       extra: Any = None):
    """(graphdef, state, shardings). Fresh GPT-2 init from `seed`, or the given (sharded) `params`.

    With `reference_dtype`, the state also holds a frozen copy of the initial
    parameters in that dtype, sharded like the policy. Runs under jit with
    out_shardings, so parameters, moments and the reference are born sharded.
    """
    graphdef, abstract = gpt2.abstract_model(cfg, mesh, seed)
    abstract_params = nnx.state(nnx.merge(graphdef, abstract), nnx.Param)
    param_shardings = jax.tree.map(lambda a: a.sharding, abstract_params)
    shardings = state_shardings(tx, param_shardings, abstract_params, mesh, reference_dtype is not None, extra)
    rng = jax.random.key_data(jax.random.key(seed))

    def build(p):
        if p is None:
            p = nnx.state(gpt2.GPT2(cfg, rngs=nnx.Rngs(params=seed)), nnx.Param)
        ref = None if reference_dtype is None else jax.tree.map(lambda x: x.astype(reference_dtype), p)
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=rng, ref_params=ref,
                          extra=extra)

    with mesh_lib.use_mesh(mesh):
        if params is None:
            state = jax.jit(lambda: build(None), out_shardings=shardings)()
        else:
            state = jax.jit(build, in_shardings=(param_shardings,), out_shardings=shardings)(params)
    return graphdef, state, shardings
