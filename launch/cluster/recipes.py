"""Writes the cluster recipes in launch/cluster/ from one training command, so that all of them start the same run.

    python -m launch.cluster.recipes --out=launch/cluster --nodes=2 --devices_per_node=8 --mesh=-1,8,1 \
        --config=configs/shp_dpo.py --workdir=runs/shp_dpo

Every recipe runs `python -m launch.train --config=... --workdir=... --mesh=...`, one process per host:

  slurm.sbatch       SLURM: one task per node; process 0's node (the first of the node list) is the coordinator.
  kubernetes.yaml    an indexed Job (one pod per host, the completion index is the process id) and the headless
                     Service that gives pod 0 the stable name the others reach it by.
  tpu_pod.sh         a TPU VM pod: the command on every worker; JAX reads the pod's layout (--multihost).
  single_host.sh     one host with several GPUs: one process that sees them all, no coordinator.

The workdir must be storage that every host sees (a shared filesystem or a gs:// bucket): checkpoints are
written there collectively. tests/test_cluster.py runs each recipe with stand-ins for srun, scontrol, gcloud
and python and checks the processes each one starts.
"""

import os
import shlex

from absl import flags

from cvxdpo import mesh as mesh_lib
from cvxdpo.errors import ConfigError
from launch import common

OUT = flags.DEFINE_string("out", "launch/cluster", "Folder the recipes are written to.")
NODES = flags.DEFINE_integer("nodes", 2, "Hosts (one training process each).")
DEVICES_PER_NODE = flags.DEFINE_integer("devices_per_node", 8, "Accelerators per host.")
CONFIG = flags.DEFINE_string("config", "configs/shp_dpo.py", "Config file of the run.")
WORKDIR = flags.DEFINE_string("workdir", "runs/shp_dpo", "Run directory, on storage every host sees.")
PORT = flags.DEFINE_integer("port", 12355, "Coordinator port on process 0's host.")
JOB = flags.DEFINE_string("job", "cvxdpo", "Job name (SLURM job, Kubernetes Job and Service).")
IMAGE = flags.DEFINE_string("image", "cvxdpo:latest", "Container image with the repository installed (Kubernetes).")

RECIPES = ("slurm.sbatch", "kubernetes.yaml", "tpu_pod.sh", "single_host.sh")
DEFAULT_MESH = "-1,8,1"  # data across hosts, fsdp over the 8 devices of each host


def train_command(config: str, workdir: str, mesh: str) -> str:
    """The command every recipe starts, the same on every host."""
    return shlex.join(["python", "-m", "launch.train", f"--config={config}", f"--workdir={workdir}",
                       f"--mesh={mesh}"])


def check(nodes: int, devices_per_node: int, mesh: str) -> None:
    """ConfigError unless the mesh fits both the cluster (nodes x devices_per_node devices) and one host: the
    single-host recipe starts the same command (a -1 on the data axis makes one mesh fit both)."""
    if nodes < 1 or devices_per_node < 1:
        raise ConfigError(f"--nodes={nodes} and --devices_per_node={devices_per_node} must be positive")
    mesh_lib.parse_mesh_shape(mesh, nodes * devices_per_node)
    try:
        mesh_lib.parse_mesh_shape(mesh, devices_per_node)
    except ConfigError as e:
        raise ConfigError(f"{e} (on one host of the single-host recipe; put -1 on the data axis, e.g. "
                          f"-1,{devices_per_node},1)") from None


def slurm(command: str, nodes: int, devices_per_node: int, port: int, job: str) -> str:
    return f"""#!/bin/bash
# {job}: {command}
# on {nodes} nodes x {devices_per_node} GPUs, one process per node. Submit with `sbatch launch/cluster/slurm.sbatch`.
#SBATCH --job-name={job}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={devices_per_node}
set -euo pipefail
# Process 0 runs on the first node of the allocation; the others reach its coordinator there.
export CVXDPO_COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):{port}"
# Single quotes: each task expands its own SLURM_PROCID.
srun --ntasks-per-node=1 bash -c 'exec {command} --coordinator_address="$CVXDPO_COORDINATOR" \\
    --num_processes="$SLURM_NTASKS" --process_id="$SLURM_PROCID"'
"""


def kubernetes(command: str, nodes: int, devices_per_node: int, port: int, job: str, image: str) -> str:
    host_command = (f"exec {command} --coordinator_address={job}-0.{job}:{port} --num_processes={nodes} "
                    "--process_id=$JOB_COMPLETION_INDEX")
    return f"""# {job}: {command}
# on {nodes} pods x {devices_per_node} GPUs, one process per pod. Apply with `kubectl apply -f launch/cluster/kubernetes.yaml`.
# Pod i of the indexed Job is process i; the headless Service names pod 0 {job}-0.{job}, the coordinator.
apiVersion: v1
kind: Service
metadata:
  name: {job}
spec:
  clusterIP: None
  selector:
    job-name: {job}
  ports:
    - name: coordinator
      port: {port}
---
apiVersion: batch/v1
kind: Job
metadata:
  name: {job}
spec:
  completionMode: Indexed
  completions: {nodes}
  parallelism: {nodes}
  backoffLimit: 0
  template:
    spec:
      subdomain: {job}
      restartPolicy: Never
      containers:
        - name: train
          image: {image}
          command: ["bash", "-c", {_yaml_string(host_command)}]
          ports:
            - containerPort: {port}
          resources:
            limits:
              nvidia.com/gpu: {devices_per_node}
"""


def _yaml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def tpu_pod(command: str, job: str) -> str:
    return f"""#!/bin/bash
# {job}: {command}
# on every worker of a TPU VM pod, one process per worker; JAX reads the pod's layout (--multihost).
# Usage: TPU_NAME=my-pod ZONE=us-central2-b bash launch/cluster/tpu_pod.sh
set -euo pipefail
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \\
    --command={shlex.quote(f"cd cvxdpo && {command} --multihost")}
"""


def single_host(command: str, devices_per_node: int, job: str) -> str:
    return f"""#!/bin/bash
# {job}: {command}
# on one host with {devices_per_node} GPUs: one process sees them all; no coordinator.
set -euo pipefail
exec {command}
"""


def recipes(config: str, workdir: str, mesh: str, nodes: int, devices_per_node: int, port: int, job: str,
            image: str) -> dict[str, str]:
    """{file name: text} of the four recipes for one run."""
    check(nodes, devices_per_node, mesh)
    command = train_command(config, workdir, mesh)
    return {"slurm.sbatch": slurm(command, nodes, devices_per_node, port, job),
            "kubernetes.yaml": kubernetes(command, nodes, devices_per_node, port, job, image),
            "tpu_pod.sh": tpu_pod(command, job),
            "single_host.sh": single_host(command, devices_per_node, job)}


def main(argv):
    del argv
    mesh = common.MESH.value if flags.FLAGS["mesh"].present else DEFAULT_MESH
    os.makedirs(OUT.value, exist_ok=True)
    for name, text in recipes(CONFIG.value, WORKDIR.value, mesh, NODES.value, DEVICES_PER_NODE.value,
                              PORT.value, JOB.value, IMAGE.value).items():
        with open(os.path.join(OUT.value, name), "w") as f:
            f.write(text)
        print(os.path.join(OUT.value, name))


if __name__ == "__main__":
    common.run(main)
