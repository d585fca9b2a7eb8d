"""What every entry point shares: --mesh, the multi-host flags, and one-line errors for user mistakes."""

import os
import sys

import jax
from absl import app, flags, logging

from cvxdpo import mesh as mesh_lib
from cvxdpo.errors import CvxdpoError

MESH = flags.DEFINE_string(
    "mesh", "-1,1,1",
    "Mesh shape over (data, fsdp, tensor); -1 fills with the devices present. E.g. 8,1,1 or 2,2,2.")
COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for a multi-process run (one process per host).")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Join a multi-process run described by the cluster environment that JAX reads "
    "(SLURM, Open MPI, Kubernetes, TPU pods) instead of the three flags above.")


TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def model_directory(spec: str) -> str:
    """A run's workdir stands for its exported model (<workdir>/hf); anything else is returned as given."""
    exported = os.path.join(spec, "hf")
    return exported if os.path.isdir(exported) else spec


def model_tokenizer(model_spec: str, tokenizer_spec: str | None = None):
    """`tokenizer_spec` when given, else the model directory's own tokenizer, else GPT-2's (with a warning
    when a directory holds none: its samples would be garbage under another vocabulary)."""
    from cvxdpo.data.tokenizer import load_tokenizer

    if tokenizer_spec:
        return load_tokenizer(tokenizer_spec)
    if os.path.isdir(model_spec):
        if any(os.path.exists(os.path.join(model_spec, f)) for f in TOKENIZER_FILES):
            return load_tokenizer(model_spec)
        logging.warning("%s holds no tokenizer; using GPT-2's (pass --tokenizer if the model used another)",
                        model_spec)
    return load_tokenizer("gpt2")


def run(main):
    """absl.app.run(main) with multi-host set up first and user errors printed as one line (exit 2).

    jax.distributed is initialized before main runs any other JAX code; process
    0 logs warnings (INFO with --verbosity=0), the others errors only.
    """

    def guarded(argv):
        try:
            if not flags.FLAGS["verbosity"].present:
                logging.set_verbosity(logging.WARNING)  # keep the progress bar and report readable
            mesh_lib.initialize_distributed(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value,
                                            auto=MULTIHOST.value)
            if jax.process_index() != 0:
                logging.set_verbosity(logging.ERROR)
            return main(argv)
        except CvxdpoError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(guarded)
