"""`launch.train` on the tiny config as several local processes joined by jax.distributed: the CPU path of a
multi-host run (each process simulates its share of 8 CPU devices, collectives go through gloo).

Every launch goes through tests/process_hook.py, which records the examples each process reads. One-process
launches share a JAX compilation cache (tools/faults.py's `launch_env`); multi-process launches compile
afresh (see `launch`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 8  # simulated devices over all processes of a run
# XLA aborts a CPU collective that waits 40 s for a device thread; on a busy 2-core machine the 8 device threads
# of a run can be starved that long, so the wait is raised (a real hang still ends at the test's timeout).
PATIENT_COLLECTIVES = (" --xla_cpu_collective_call_terminate_timeout_seconds=600"
                       " --xla_cpu_collective_timeout_seconds=600")


def _load_faults():
    spec = importlib.util.spec_from_file_location("faults", os.path.join(ROOT, "tools", "faults.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


faults = _load_faults()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_flags(process_id: int, processes: int, port: int) -> list[str]:
    """The flags that join process `process_id` to a run of `processes` (none for one process)."""
    if processes == 1:
        return []
    return [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}", f"--process_id={process_id}"]


@dataclasses.dataclass
class Launch:
    """One start of a run: its processes' exit codes, outputs and recorded batches."""

    returncodes: list[int]
    stdouts: list[str]
    stderrs: list[str]
    record_dir: str

    def check(self) -> Launch:
        """Self, when every process exited 0; else an AssertionError with each failed process's first errors
        (the process that failed first is not always the first to report)."""
        failed = [f"process {i} exited {code}:\n{err[:1500]}\n...\n{err[-1500:]}"
                  for i, (code, err) in enumerate(zip(self.returncodes, self.stderrs)) if code != 0]
        assert not failed, "\n\n".join(failed)
        return self

    def report(self) -> dict:
        """launch.train's JSON report, printed by process 0 (every process prints the same)."""
        out = self.stdouts[0]
        return json.loads(out[out.index("{"):out.rindex("}") + 1])

    def batches(self) -> list[list[int]]:
        """Per batch drawn, the example indices of the global batch: the processes' rows in process order."""
        per_process = []
        for i in range(len(self.returncodes)):
            with open(os.path.join(self.record_dir, f"process_{i}.jsonl")) as f:
                per_process.append([json.loads(line) for line in f])
        return [sum(rows, []) for rows in zip(*per_process)]

    def shards(self, process: int) -> list[list[int]]:
        with open(os.path.join(self.record_dir, f"process_{process}.jsonl")) as f:
            return [json.loads(line) for line in f]


def launch(workdir: str, record_dir: str, pairs: str, cache_dir: str, processes: int, mesh: str,
           overrides: list[str], fault: tuple[str, int] | None = None, timeout: float = 600) -> Launch:
    """Runs launch.train as `processes` processes until all exit. With a `fault` of ("kill-after-save", STEP)
    every process SIGKILLs itself once the checkpoint of STEP starts being written; a process that a dead
    peer leaves waiting in a collective is SIGKILLed too, as a cluster scheduler ends a job whose task died."""
    port = free_port()
    fault_args = [fault[0], str(fault[1])] if fault else []
    procs = []
    env = faults.launch_env(cache_dir, devices=DEVICES // processes)
    env["XLA_FLAGS"] += PATIENT_COLLECTIVES
    if processes > 1:
        # JAX writes the persistent cache from process 0 only, so in a rerun process 0 loads its programs while
        # the others compile theirs; resumed 2-process runs then failed in gloo with mismatched collective sizes.
        del env["JAX_COMPILATION_CACHE_DIR"]
    for i in range(processes):
        cmd = [sys.executable, "tests/process_hook.py", record_dir, *fault_args,
               f"--config=tests/tiny_config.py:{pairs}", f"--workdir={workdir}", f"--mesh={mesh}",
               *distributed_flags(i, processes, port), *[f"--config.{item}" for item in overrides]]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    deadline = time.time() + timeout
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        if fault and any(p.poll() == -signal.SIGKILL for p in procs):
            time.sleep(5)  # the others are killing themselves at the same save, or waiting on the dead one
            break
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()
    outputs = [p.communicate() for p in procs]
    return Launch([p.returncode for p in procs], [o for o, _ in outputs], [e for _, e in outputs], record_dir)
