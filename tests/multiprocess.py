"""`launch.train` on the tiny config as several local processes joined by jax.distributed: the CPU path of a
multi-host run (each process simulates its share of 8 CPU devices, collectives go through gloo).

Every launch goes through tests/process_hook.py, which records the examples each process reads and the
tokenizers it saves. One-process launches can share a JAX compilation cache (tools/faults.py's `launch_env`);
multi-process launches compile afresh (see `start`). A launch runs in the background until `Running.wait`,
so that launches that do not depend on each other can run side by side.
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
# XLA aborts a CPU collective that waits 40 s for a device thread; on a busy 2-core machine (another job at a
# higher priority) the device threads of a run can be starved that long, so the wait is raised (a real hang
# still ends at the launch's timeout).
PATIENT_COLLECTIVES = (" --xla_cpu_collective_call_terminate_timeout_seconds=600"
                       " --xla_cpu_collective_timeout_seconds=600")
# XLA:CPU runs a process's simulated devices on max(cores, devices) threads (PJRT_NPROC stands for the cores),
# and a collective holds its thread until every device has joined it. A device may run independent collectives
# at once (in the DPO-Convex step, the ADMM loop's all-gathers over fsdp beside the model's all-reduces over
# tensor), so with one thread per device all of them can end up waiting for devices that have no thread left:
# a deadlock, which the patience above turns into a silent hang (seen as the 1-process resume of a 2-process
# checkpoint "hanging" on an idle machine). Four threads per device leave room: the deadlocks seen held two.
THREADS_PER_DEVICE = 4


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


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _read_lines(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


@dataclasses.dataclass
class Launch:
    """One start of a run: its processes' exit codes, outputs and records."""

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
        per_process = [self.shards(i) for i in range(len(self.returncodes))]
        return [sum(rows, []) for rows in zip(*per_process)]

    def shards(self, process: int) -> list[list[int]]:
        """Per batch drawn by `process`, the example indices of its rows."""
        return _read_lines(os.path.join(self.record_dir, f"process_{process}.jsonl"))

    def tokenizer_saves(self, process: int) -> list[str]:
        """The directories that `process` saved a tokenizer to, in order."""
        return _read_lines(os.path.join(self.record_dir, f"tokenizer_saves_{process}.jsonl"))


@dataclasses.dataclass
class Running:
    """The processes of a launch that has not been waited for."""

    procs: list[subprocess.Popen]
    record_dir: str
    fault: tuple[str, int] | None
    deadline: float

    def wait(self) -> Launch:
        """Waits until every process has exited; a process that a dead peer leaves waiting in a collective
        (after a `fault`) is SIGKILLed, as a cluster scheduler ends a job whose task died."""
        deadline = self.deadline
        while any(p.poll() is None for p in self.procs) and time.time() < deadline:
            if self.fault and any(p.poll() == -signal.SIGKILL for p in self.procs):
                # the others are killing themselves at the same save, or waiting on the dead one
                deadline = min(deadline, time.time() + 5)
            time.sleep(0.1)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        outputs = [[_read(os.path.join(self.record_dir, f"{stream}_{i}.txt")) for stream in ("stdout", "stderr")]
                   for i in range(len(self.procs))]
        return Launch([p.returncode for p in self.procs], [o for o, _ in outputs], [e for _, e in outputs],
                      self.record_dir)


def start(workdir: str, record_dir: str, pairs: str, cache_dir: str, processes: int, mesh: str,
          overrides: list[str], fault: tuple[str, int] | None = None, timeout: float = 600) -> Running:
    """Starts launch.train as `processes` processes, in the background. With a `fault` of ("kill-after-save",
    STEP) every process SIGKILLs itself once the checkpoint of STEP starts being written. Output goes to files
    in `record_dir` (a pipe nobody reads while another launch is awaited would fill and stall the process)."""
    port = free_port()
    fault_args = [fault[0], str(fault[1])] if fault else []
    os.makedirs(record_dir, exist_ok=True)
    env = faults.launch_env(cache_dir, devices=DEVICES // processes)
    env["XLA_FLAGS"] += PATIENT_COLLECTIVES
    env["PJRT_NPROC"] = str(THREADS_PER_DEVICE * DEVICES // processes)
    if processes > 1:
        # JAX keys the persistent cache by process and writes it from process 0 only, so in a rerun process 0
        # loads its programs while the others compile theirs; resumed 2-process runs then failed in gloo with
        # mismatched collective sizes.
        del env["JAX_COMPILATION_CACHE_DIR"]
    procs = []
    for i in range(processes):
        cmd = [sys.executable, "tests/process_hook.py", record_dir, *fault_args,
               f"--config=tests/tiny_config.py:{pairs}", f"--workdir={workdir}", f"--mesh={mesh}",
               *distributed_flags(i, processes, port), *[f"--config.{item}" for item in overrides]]
        with open(os.path.join(record_dir, f"stdout_{i}.txt"), "w") as out, \
                open(os.path.join(record_dir, f"stderr_{i}.txt"), "w") as err:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err))
    return Running(procs, record_dir, fault, time.time() + timeout)
