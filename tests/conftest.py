"""Test session setup: 8 simulated CPU devices, float64 available, absl flags parsed, hub offline.

The device count must be fixed before the first JAX operation, so it is set
here, at import, before any test module imports jax.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# XLA:CPU runs the simulated devices on max(cores, devices) threads, and a collective holds its thread until
# every device joins: two collectives in flight at once (DPO-Convex's ADMM beside the model's) can then take
# every thread and deadlock. 4 threads per simulated device rules that out (tests/multiprocess.py says more).
os.environ.setdefault("PJRT_NPROC", "32")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network; the hub code fails fast

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update("jax_enable_x64", True)
flags.FLAGS.mark_as_parsed()  # Grain reads absl flags; plain pytest never parses them.

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture
def mesh1():
    """A one-device mesh (what a one-GPU user gets with the default -1,1,1)."""
    from cvxdpo import mesh as mesh_lib

    return mesh_lib.make_mesh("1,1,1", devices=jax.devices()[:1])


@pytest.fixture
def shared_data():
    """The folder of real sample data beside the repository; tests skip without it."""
    path = os.environ.get("CVXDPO_SHARED_DATA", SHARED_DATA)
    if not os.path.isdir(path):
        pytest.skip(f"shared sample data folder not found at {path}")
    return path


@pytest.fixture(scope="session")
def pairs(tmp_path_factory):
    """The tiny config's learnable JSONL pair set (tests/tiny_config.py), written once per session."""
    from tiny_config import write_pairs

    return write_pairs(str(tmp_path_factory.mktemp("data") / "pairs.jsonl"))
