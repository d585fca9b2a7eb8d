"""The cluster recipes in launch/cluster/ are what launch/cluster/recipes.py writes, and each one starts the same
training command once per host, with the process count, process ids, coordinator and mesh it was made for.

Each recipe runs here under bash with stand-ins on PATH: `python` records the arguments it was started with
instead of training, `srun` starts its command once per task with SLURM's variables, `scontrol` expands the
node list, and `gcloud` runs the ssh command once per TPU worker. The Kubernetes manifest is parsed and its
container command run once per completion index.
"""

import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from cvxdpo.errors import ConfigError
from launch.cluster import recipes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(ROOT, "launch", "cluster")
DEFAULTS = dict(config=recipes.CONFIG.default, workdir=recipes.WORKDIR.default, mesh=recipes.DEFAULT_MESH,
                nodes=recipes.NODES.default, devices_per_node=recipes.DEVICES_PER_NODE.default,
                port=recipes.PORT.default, job=recipes.JOB.default, image=recipes.IMAGE.default)
BIGGER = {**DEFAULTS, "nodes": 4, "devices_per_node": 4, "mesh": "-1,2,2", "job": "dpo-big", "port": 2222,
          "workdir": "gs://bucket/runs/big"}
TPU_WORKERS = 4

STUBS = {
    "python": '#!/bin/bash\nprintf "%s\\0" "$@" > "$(mktemp "$RECORD_DIR/XXXXXX")"\n',
    "srun": """#!/bin/bash
per=1
while [[ "$1" == --* ]]; do [[ "$1" == --ntasks-per-node=* ]] && per="${1#*=}"; shift; done
export SLURM_NTASKS=$((SLURM_NNODES * per))
for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i "$@"; done
""",
    "scontrol": f"""#!{sys.executable}
import re, sys
assert sys.argv[1:3] == ["show", "hostnames"], sys.argv
prefix, first, last = re.fullmatch(r"(\\w+)\\[(\\d+)-(\\d+)\\]", sys.argv[3]).groups()
print("\\n".join(f"{{prefix}}{{k:0{{len(first)}}d}}" for k in range(int(first), int(last) + 1)))
""",
    "gcloud": f"""#!/bin/bash
command="${{@: -1}}"
workers=1
[[ " $* " == *" --worker=all "* ]] && workers={TPU_WORKERS}
for ((i = 0; i < workers; i++)); do TPU_WORKER_ID=$i bash -c "${{command#--command=}}"; done
""",
}


@pytest.fixture
def shell(tmp_path):
    """run(script_or_command, **env) -> the argument lists `python` was started with, one per process."""
    bin_dir, records, home = tmp_path / "bin", tmp_path / "records", tmp_path / "home"
    for folder in (bin_dir, records, home / "cvxdpo"):
        folder.mkdir(parents=True)
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)

    def run(args, **env):
        for old in records.iterdir():
            old.unlink()
        full_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD_DIR": str(records), **env}
        done = subprocess.run(args, cwd=home, env=full_env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return [path.read_text().split("\0")[:-1] for path in records.iterdir()]

    return run


def written(tmp_path, params) -> dict[str, str]:
    """The recipes for `params`, written to a folder: {name: path}."""
    out = {}
    for name, text in recipes.recipes(**params).items():
        out[name] = str(tmp_path / name)
        with open(out[name], "w") as f:
            f.write(text)
    return out


def flags_of(argv: list[str], params) -> dict[str, str]:
    """The flags after `-m launch.train`, checked to start with the recipe's own training command."""
    base = shlex.split(recipes.train_command(params["config"], params["workdir"], params["mesh"]))[1:]
    assert argv[:len(base)] == base, argv
    return dict(arg[2:].split("=", 1) if "=" in arg else (arg[2:], "") for arg in argv[len(base):])


def test_committed_recipes_are_the_generated_ones():
    for name, text in recipes.recipes(**DEFAULTS).items():
        with open(os.path.join(COMMITTED, name)) as f:
            assert f.read() == text, f"launch/cluster/{name} differs: rerun python -m launch.cluster.recipes"
    assert sorted(recipes.RECIPES) == sorted(n for n in os.listdir(COMMITTED) if not n.endswith(".py") and
                                             n != "__pycache__")


@pytest.mark.parametrize("params", [DEFAULTS, BIGGER], ids=["committed", "4x4"])
def test_slurm_starts_one_process_per_node_with_the_first_node_as_coordinator(tmp_path, shell, params):
    path = written(tmp_path, params)["slurm.sbatch"]
    with open(path) as f:
        nodes = int(re.search(r"^#SBATCH --nodes=(\d+)$", f.read(), re.M).group(1))
    assert nodes == params["nodes"]
    started = [flags_of(argv, params) for argv in shell(
        ["bash", path], SLURM_NNODES=str(nodes), SLURM_JOB_NODELIST=f"gpu[07-{6 + nodes:02d}]")]
    assert sorted(int(f["process_id"]) for f in started) == list(range(nodes))
    for f in started:
        assert f.keys() == {"coordinator_address", "num_processes", "process_id"}
        assert f["coordinator_address"] == f"gpu07:{params['port']}"
        assert f["num_processes"] == str(nodes)


@pytest.mark.parametrize("params", [DEFAULTS, BIGGER], ids=["committed", "4x4"])
def test_kubernetes_indexed_job_reaches_pod_0_through_the_headless_service(tmp_path, shell, params):
    with open(written(tmp_path, params)["kubernetes.yaml"]) as f:
        service, job = yaml.safe_load_all(f)
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    assert job["kind"] == "Job" and job["spec"]["completionMode"] == "Indexed"
    pods = job["spec"]["completions"]
    assert pods == job["spec"]["parallelism"] == params["nodes"]
    pod = job["spec"]["template"]["spec"]
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}  # the label the Job sets on its pods
    assert pod["subdomain"] == service["metadata"]["name"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == params["devices_per_node"]
    started = [flags_of(argv, params) for index in range(pods)
               for argv in shell(container["command"], JOB_COMPLETION_INDEX=str(index))]
    assert sorted(int(f["process_id"]) for f in started) == list(range(pods))
    coordinator = f"{job['metadata']['name']}-0.{service['metadata']['name']}"  # pod 0's DNS name
    ports = [p["port"] for p in service["spec"]["ports"]]
    for f in started:
        assert f["coordinator_address"] == f"{coordinator}:{ports[0]}" and f["num_processes"] == str(pods)


def test_tpu_pod_starts_the_command_on_every_worker(tmp_path, shell):
    started = shell(["bash", written(tmp_path, BIGGER)["tpu_pod.sh"]], TPU_NAME="pod", ZONE="zone")
    assert len(started) == TPU_WORKERS
    assert all(flags_of(argv, BIGGER) == {"multihost": ""} for argv in started)


def test_single_host_starts_one_process_on_all_its_devices(tmp_path, shell):
    (argv,) = shell(["bash", written(tmp_path, DEFAULTS)["single_host.sh"]])
    assert flags_of(argv, DEFAULTS) == {}


def test_a_mesh_that_fits_no_single_host_is_refused():
    with pytest.raises(ConfigError, match="16 slots but 8 devices.*put -1 on the data axis"):
        recipes.recipes(**{**DEFAULTS, "mesh": "2,8,1"})
    with pytest.raises(ConfigError, match="32 slots but 16 devices"):
        recipes.recipes(**{**DEFAULTS, "mesh": "4,8,1"})
