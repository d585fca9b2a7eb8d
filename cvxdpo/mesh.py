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
from collections.abc import Sequence

import jax
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


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a batch array: the leading axis over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
