"""The device mesh and the one table that maps logical axis names to it.

Every array in cvxdpo is laid out over a `jax.sharding.Mesh` with the axes
("data", "fsdp", "tensor"). Model code names its dimensions logically
("vocab", "embed", "heads", "kv", "mlp", "batch", "length"); LOGICAL_RULES says
which mesh axis each name is split over. Changing the mesh shape therefore
never changes model code: the same program runs on one device (`1,1,1`) and on
a cluster (`8,4,2`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from cvxdpo.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axis (or axes). fsdp splits the large parameter
# dimension (embed), tensor splits heads, MLP width and vocabulary, and the
# batch is split over data and fsdp together.
LOGICAL_RULES = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("length", None),
    ("layers", None),
)


def parse_mesh_shape(shape: str | Sequence[int], num_devices: int) -> tuple[int, int, int]:
    """Turns "2,2,2" / (2, 2, 2) / "-1,1,1" into a concrete 3-tuple for `num_devices`.

    At most one entry may be -1; it is filled so that the product equals the
    device count.
    """
    if isinstance(shape, str):
        try:
            dims = [int(s) for s in shape.replace(" ", "").split(",") if s]
        except ValueError:
            raise ConfigError(f"mesh shape {shape!r} is not a comma-separated list of integers") from None
    else:
        dims = [int(s) for s in shape]
    if len(dims) != len(MESH_AXES):
        raise ConfigError(f"mesh shape {shape!r} must have {len(MESH_AXES)} entries {MESH_AXES}, got {len(dims)}")
    if dims.count(-1) > 1 or any(d == 0 or d < -1 for d in dims):
        raise ConfigError(f"mesh shape {shape!r}: entries must be positive, with at most one -1")
    if -1 in dims:
        known = math.prod(d for d in dims if d != -1)
        if num_devices % known:
            raise ConfigError(
                f"mesh shape {shape!r}: {num_devices} devices are not divisible by the fixed axes' product {known}"
            )
        dims[dims.index(-1)] = num_devices // known
    if math.prod(dims) != num_devices:
        raise ConfigError(
            f"mesh shape {tuple(dims)} has {math.prod(dims)} slots but {num_devices} devices are present; "
            f"the product of {MESH_AXES} must equal the device count"
        )
    return tuple(dims)  # type: ignore[return-value]


def make_mesh(shape: str | Sequence[int] = "-1,1,1", devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over ("data", "fsdp", "tensor") with Auto axis types (logical rules drive sharding)."""
    devices = list(devices) if devices is not None else jax.devices()
    dims = parse_mesh_shape(shape, len(devices))
    return jax.make_mesh(dims, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


@contextlib.contextmanager
def use_mesh(mesh: Mesh):
    """Context in which models are built and run: the mesh plus the logical rules."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_RULES):
        yield mesh


def logical_to_spec(logical: Sequence[str | None]) -> PartitionSpec:
    """Maps logical names to a PartitionSpec with LOGICAL_RULES."""
    rules = dict(LOGICAL_RULES)
    return PartitionSpec(*(rules.get(name) if name is not None else None for name in logical))


def mesh_axes(logical: str | None) -> tuple[str, ...]:
    """The mesh axes LOGICAL_RULES split one logical dimension over; () when it is not split."""
    axes = logical_to_spec((logical,))[0]
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of any batch array: the leading axis over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def axis_size(mesh: Mesh, *axes: str) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Pins an activation's layout by logical names when a mesh is set.

    A no-op without a mesh, and for a dimension its mesh axes do not divide
    (e.g. a batch of 3 prompts on 8 devices), which then stays replicated.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = []
    for dim, name, axes in zip(x.shape, logical, logical_to_spec(logical)):
        spec.append(axes if dim % axis_size(mesh, *mesh_axes(name)) == 0 else None)
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def check_batch_divides(global_batch: int, mesh: Mesh, what: str = "batch") -> None:
    shards = axis_size(mesh, *BATCH_AXES)
    if global_batch % shards:
        raise ConfigError(
            f"{what} size {global_batch} is not divisible by the mesh's data x fsdp = "
            f"{mesh.shape['data']} x {mesh.shape['fsdp']} = {shards} batch shards"
        )


def place_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global batch arrays sharded over (data, fsdp) from this process's rows.

    Each process passes only its own rows (the global batch is the
    concatenation over processes in process order); with one process the rows
    are the whole batch.
    """
    out = {}
    for name, rows in local.items():
        rows = np.asarray(rows)
        check_batch_divides(rows.shape[0] * jax.process_count(), mesh, f"batch ({name})")
        out[name] = jax.make_array_from_process_local_data(batch_sharding(mesh), rows)
    return out


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, auto: bool = False) -> None:
    """Joins a multi-process run; call before any other JAX operation.

    With a coordinator address the three values are used as given; with
    `auto`, JAX reads the cluster environment it understands (SLURM, Open MPI,
    Kubernetes, TPU pods). Without either this is a one-process run.
    """
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ConfigError("--coordinator_address needs --num_processes and --process_id too")
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    elif auto:
        kwargs = {}
    else:
        return
    # CPU devices of several processes talk through gloo; accelerators use their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
