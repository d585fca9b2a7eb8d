"""Try every kind of bad input on the toolkit and write down what it does: docs/reliability.md.

    python tools/reliability.py [--only=WORD] [--work=DIR] [--markdown=docs/reliability.md]

The contract: a user's mistake is one line on stderr,
`error: ...` saying what is wrong and where, with a non-zero exit status, never
a traceback (`--debug` shows one), and nothing already in the run directory is
lost; some inputs are not errors but have a documented behaviour (a bad row is
skipped and counted, a damaged newest checkpoint is replaced by the one
before). Each case here runs the input itself and records what happened, so
the table stays true: rerun this after a change.

Command-line cases run `python -m launch.train` / `launch.evaluate` /
`launch.sample` as subprocesses (two at a time) on 2 simulated CPU devices,
sharing one JAX compilation cache. launch.train refusals run on a copy of one
finished tiny run (tests/tiny_config.py; checkpoints 8 and 12, exported model),
and compare its config.json, metrics.jsonl, checkpoints and exported weights
before and after. The other cases call the library function that checks the
input, in this process; for them "traceback" means an exception that is not one
of the toolkit's user errors (cvxdpo.errors.CvxdpoError), which the launchers
would print with its traceback.

Prints the table, writes it to --markdown and the raw records (full messages,
commands, seconds) to the same name with .json. Paths in both are relative to
the repository, and the temporary folder is written <tmp>. Takes about five
minutes on two busy CPU cores; --only=WORD runs the cases whose category or
name holds WORD (and writes nothing unless --markdown is given). Exits 1 when
a case is open.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "tools")]
os.environ.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
                  TOKENIZERS_PARALLELISM="false")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import faults  # noqa: E402  (tools/faults.py: the tiny run driven as a subprocess)
from cvxdpo import config as config_lib  # noqa: E402
from cvxdpo.convex import admm  # noqa: E402
from cvxdpo.convex.classifier import ConvexReLUClassifier  # noqa: E402
from cvxdpo.data import imdb, jsonl, pipeline, tutor  # noqa: E402
from cvxdpo.data.records import Pair  # noqa: E402
from cvxdpo.errors import (CheckpointError, ConfigError, CvxdpoError, DataError, MissingFileError,  # noqa: E402
                           OutputError)
from cvxdpo.model import gpt2, hub  # noqa: E402
from cvxdpo.train import data as data_lib  # noqa: E402
from cvxdpo.train import objectives  # noqa: E402
from cvxdpo.train.logs import METRICS_FILE, MetricsWriter, read_metrics  # noqa: E402
from tiny_config import get_config, write_pairs  # noqa: E402

TRACEBACK = "Traceback (most recent call last)"
LOG_LINE = re.compile(r"^([IWEF]\d{4} |\S+:\d+: \w+: )")  # an absl log record, or a warning (launch/common.py)
GOOD = {"prompt": "Tell me about stars.", "chosen": " bright clear kind", "rejected": " dull vague rude"}
MB = 1 << 20
WORKERS = 2


# --- what a case records ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Outcome:
    status: str  # "exit 2", or the exception's type, or "returned"
    message: str  # the `error:` line, the exception's message, or what the documented behaviour reported
    traceback: bool
    lost: str  # "nothing", "n/a" (no earlier output to lose), or what changed
    problems: list[str]  # empty: the case behaves as the contract says
    command: str = ""


@dataclasses.dataclass
class Case:
    category: str
    name: str
    shown: str  # the input, as the table shows it
    run: Callable[["Context"], Outcome]
    subprocess: bool


class Workspace:
    """The folder every case shares: the tiny pair file, the compilation cache (kept from an earlier run in
    the same folder), and the finished tiny run that launch.train refusals run on (a copy each)."""

    def __init__(self, root: str):
        self.root = root
        for earlier in ("cases", "finished"):
            shutil.rmtree(os.path.join(root, earlier), ignore_errors=True)
        self.pairs = write_pairs(os.path.join(root, "pairs.jsonl"))
        self.cache = os.path.join(root, "jax_cache")
        self.finished = os.path.join(root, "finished")

    def make_finished_run(self) -> None:
        faults.TinyRun(self.finished, self.pairs, self.cache).finish()

    def env(self) -> dict:
        return {**faults.launch_env(self.cache), "HF_HUB_OFFLINE": "1"}


class Context:
    """One case's view of the workspace: its own folder (`dir`) for the files it writes."""

    def __init__(self, ws: Workspace, case: Case):
        self.ws, self.pairs = ws, ws.pairs
        self.dir = os.path.join(ws.root, "cases", case.name)
        os.makedirs(self.dir)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def write(self, name: str, content: bytes | str) -> str:
        path = self.path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
        return path

    def finished_copy(self) -> str:
        return shutil.copytree(self.ws.finished, self.path("run"))

    def launch(self, module: str, args: list[str]) -> tuple[subprocess.CompletedProcess, str]:
        cmd = [sys.executable, "-m", module, *args]
        proc = subprocess.run(cmd, cwd=ROOT, env=self.ws.env(), capture_output=True, text=True, timeout=900)
        return proc, " ".join(["python", *cmd[1:]])

    def train_args(self, workdir: str) -> list[str]:
        return [f"--config=tests/tiny_config.py:{self.pairs}", f"--workdir={workdir}"]

    def tiny(self, changes: dict | None = None):
        """The tiny config with GPT-2's own tokenizer (nothing to train before the data loads) and `changes`
        ({"data.path": ...}) applied."""
        c = get_config(self.pairs)
        c.tokenizer.spec = "gpt2"
        for key, value in (changes or {}).items():
            *sections, field = key.split(".")
            node = c
            for section in sections:
                node = node[section]
            node[field] = value
        return c


# --- judging an outcome -------------------------------------------------------------------------------------

def snapshot(workdir: str) -> dict[str, str]:
    """What a refused rerun must leave as it was: config.json, metrics.jsonl and the exported weights (by
    content) and the checkpoint steps."""
    state = {}
    for name in ("config.json", METRICS_FILE, "hf/model.safetensors"):
        path = os.path.join(workdir, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                state[name] = hashlib.sha256(f.read()).hexdigest()
    folder = os.path.join(workdir, "checkpoints")
    if os.path.isdir(folder):
        state["checkpoints"] = ",".join(sorted((d for d in os.listdir(folder) if d.isdigit()), key=int))
    return state


def changes(before: dict[str, str], after: dict[str, str]) -> str:
    changed = [name for name in sorted(before.keys() | after.keys()) if before.get(name) != after.get(name)]
    if not changed:
        return "nothing"
    if "checkpoints" in changed:
        changed[changed.index("checkpoints")] = (f"checkpoints {before.get('checkpoints') or 'none'} -> "
                                                 f"{after.get('checkpoints') or 'none'}")
    return "changed: " + ", ".join(changed)


def error_outcome(proc: subprocess.CompletedProcess, expect: str, lost: str, command: str) -> Outcome:
    """A command that should fail as a user error: exit status 2, one `error:` line holding `expect`, other
    stderr lines one-line log records, no traceback, nothing lost."""
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    traceback = TRACEBACK in proc.stderr
    message = errors[-1] if errors else next((line for line in lines if line.strip()), "(no stderr)")
    problems = []
    if proc.returncode == 0:
        problems.append("exit 0 on an error")
    if traceback:
        problems.append("traceback")
    if len(errors) != 1 or any(not LOG_LINE.match(line) for line in lines if not line.startswith("error: ")):
        problems.append(f"not one line ({len(lines)} stderr lines)")
    if expect not in message:
        problems.append(f"message does not say {expect!r}")
    if lost not in ("nothing", "n/a"):
        problems.append(f"lost: {lost}")
    return Outcome(f"exit {proc.returncode}", message, traceback, lost, problems, command)


def exception_outcome(error: BaseException, expected: type, expect: str) -> Outcome:
    """A library call that should raise `expected`, a user error with a one-line message holding `expect`."""
    message = str(error).strip()
    user_error = isinstance(error, CvxdpoError)
    problems = []
    if not isinstance(error, expected):
        problems.append(f"raised {type(error).__name__}, not {expected.__name__}")
    if not user_error:
        problems.append("not a user error: a launcher would show its traceback")
    if "\n" in message:
        problems.append("message of several lines")
    if expect not in message:
        problems.append(f"message does not say {expect!r}")
    return Outcome(type(error).__name__, message.splitlines()[0] if message else "", not user_error, "n/a", problems)


def behaviour_outcome(status: str, check: Callable[[], str], traceback: bool = False, lost: str = "n/a",
                      command: str = "", traceback_wanted: bool = False) -> Outcome:
    """A documented behaviour: `check()` describes what happened, or fails an assertion. A traceback is
    wrong, except where it is the behaviour asked for (--debug)."""
    try:
        message, problems = check(), []
    except AssertionError as e:
        message, problems = str(e) or "assertion failed", ["not the documented behaviour"]
    if traceback != traceback_wanted:
        problems.append("traceback" if traceback else "no traceback")
    return Outcome(status, message, traceback, lost, problems, command)


# --- case builders --------------------------------------------------------------------------------------------

def _format(args: list[str], ctx: Context) -> list[str]:
    return [arg.format(dir=ctx.dir, pairs=ctx.pairs, finished=ctx.ws.finished) for arg in args]


def _shown(module: str, args: list[str]) -> str:
    """The input as the table shows it: the module and the flags, the case's folder left out."""
    shown = " ".join(arg.replace("{dir}/", "").replace("{finished}", "FINISHED_RUN").replace("{pairs}", "PAIRS")
                     for arg in args)
    return f"{module.removeprefix('launch.')} {shown}".strip()


def train_refused(category: str, name: str, args: list[str], expect: str,
                  setup: Callable[[Context], None] | None = None) -> Case:
    """launch.train on a copy of the finished tiny run with `args` added ({dir}: the case's folder, filled
    by `setup`): one error line holding `expect`, and the run's files as they were."""
    def run(ctx: Context) -> Outcome:
        if setup:
            setup(ctx)
        workdir = ctx.finished_copy()
        before = snapshot(workdir)
        proc, command = ctx.launch("launch.train", ctx.train_args(workdir) + _format(args, ctx))
        return error_outcome(proc, expect, changes(before, snapshot(workdir)), command)
    return Case(category, name, _shown("launch.train", args), run, True)


def cli_refused(category: str, name: str, module: str, args: list[str], expect: str,
                setup: Callable[[Context], None] | None = None) -> Case:
    """`python -m module args` (no run directory to lose): one error line holding `expect`."""
    def run(ctx: Context) -> Outcome:
        if setup:
            setup(ctx)
        proc, command = ctx.launch(module, _format(args, ctx))
        return error_outcome(proc, expect, "n/a", command)
    return Case(category, name, _shown(module, args), run, True)


def cli_behaves(category: str, name: str, module: str, args: list[str], check: Callable, shown: str = "",
                setup: Callable[[Context], None] | None = None, exit_status: int = 0,
                traceback_wanted: bool = False) -> Case:
    """`python -m module args`, expected to exit with `exit_status`; `check(proc, ctx)` describes what
    happened or fails an assertion."""
    def run(ctx: Context) -> Outcome:
        if setup:
            setup(ctx)
        proc, command = ctx.launch(module, _format(args, ctx))

        def checked():
            assert proc.returncode == exit_status, f"exit {proc.returncode}: {_last_line(proc.stderr)}"
            return check(proc, ctx)
        return behaviour_outcome(f"exit {proc.returncode}", checked, TRACEBACK in proc.stderr, command=command,
                                 traceback_wanted=traceback_wanted)
    return Case(category, name, shown or _shown(module, args), run, True)


def raises(category: str, name: str, shown: str, call: Callable[[Context], object], error: type,
           expect: str) -> Case:
    """A library call that should raise `error` with a one-line message holding `expect`."""
    def run(ctx: Context) -> Outcome:
        try:
            with _quiet():
                result = call(ctx)
        except Exception as e:  # noqa: BLE001 (any exception is recorded, the wrong ones as open)
            return exception_outcome(e, error, expect)
        return Outcome("returned", repr(result)[:200], False, "n/a", ["no error raised"])
    return Case(category, name, shown, run, False)


def behaves(category: str, name: str, shown: str, call: Callable[[Context], str]) -> Case:
    """A library call whose documented behaviour is no error: `call` describes it or fails an assertion."""
    def run(ctx: Context) -> Outcome:
        try:
            with _quiet():
                return behaviour_outcome("returned", lambda: call(ctx))
        except Exception as e:  # noqa: BLE001
            return Outcome(type(e).__name__, str(e).splitlines()[0], not isinstance(e, CvxdpoError), "n/a",
                           ["raised instead of the documented behaviour"])
    return Case(category, name, shown, run, False)


def config_refused(category: str, name: str, changes_: dict, expect: str) -> Case:
    """The config checks the trainer makes before reading any data (validate, the objective's dataclasses,
    the tokenize config) on the tiny config with `changes_`: a ConfigError holding `expect`."""
    def call(ctx):
        c = ctx.tiny(changes_)
        config_lib.validate(c)
        objectives.build(c)
        data_lib.tokenize_config(c)
    shown = ", ".join(f"{k}={v!r}" for k, v in changes_.items())
    return raises(category, name, shown, call, ConfigError, expect)


def data_refused(category: str, name: str, shown: str, changes_: Callable[[Context], dict], error: type,
                 expect: str) -> Case:
    """load_data (what the trainer does first) on the tiny config with `changes_(ctx)`: `error`."""
    return raises(category, name, shown,
                  lambda ctx: data_lib.load_data(ctx.tiny(changes_(ctx)), ctx.path("run")), error, expect)


@contextlib.contextmanager
def _quiet():
    """In-process cases warn through absl and Python warnings: kept out of the tool's output (the cases that
    are about a warning capture it themselves with `_warnings`)."""
    root = logging.getLogger()
    levels = [h.level for h in root.handlers]
    for h in root.handlers:
        h.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for h, level in zip(root.handlers, levels):
            h.setLevel(level)


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _warnings():
    handler = _Warnings()
    logging.getLogger().addHandler(handler)
    try:
        yield handler.messages
    finally:
        logging.getLogger().removeHandler(handler)


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def _stderr_warning(proc, word: str) -> str:
    """The one stderr line holding `word`, without absl's prefix."""
    found = [line for line in proc.stderr.splitlines() if word in line]
    assert len(found) == 1, f"{len(found)} stderr lines hold {word!r}"
    return found[0].split("] ", 1)[-1]


# --- the cases ------------------------------------------------------------------------------------------------

def _config_file(body: str) -> Callable[[Context], None]:
    def setup(ctx):
        ctx.write("my_config.py", "from cvxdpo.config import default_config\n\n\ndef get_config():\n" + body)
    return setup


def command_line_cases() -> list[Case]:
    t = lambda name, args, expect, setup=None: train_refused("command line", name, args, expect, setup)  # noqa: E731
    return [
        t("unknown-field", ["--config.train.foo=1"], "unknown config key train.foo; train has batch_size, "),
        t("misspelt-field", ["--config.loss.betta=0.1"], "did you mean loss.beta?"),
        t("field-below-a-value", ["--config.loss.beta.x=1"], "loss.beta is a float, not a section"),
        t("override-of-wrong-type", ["--config.model.overrides.n_layer=two"], "invalid literal for int()"),
        t("float-for-int", ["--config.train.steps=1.5"], "flag --config.train.steps=1.5: invalid literal for int()"),
        t("unknown-model-override", ["--config.model.overrides.vocab=5"], "unknown config key model.overrides.vocab"),
        t("unknown-flag", ["--foo=1"], "Unknown command line flag 'foo'"),
        t("flag-without-value", ["--mesh"], "Missing value for flag --mesh"),
        cli_refused("command line", "no-workdir", "launch.train", ["--config=configs/quickstart.py"],
                    "Flag --workdir must have a value other than None"),
        cli_refused("command line", "override-before-config", "launch.train",
                    ["--config.loss.beta=1", "--config=configs/quickstart.py", "--workdir={dir}/run"],
                    "before a value for --config was specified"),
        cli_behaves("command line", "debug-shows-the-traceback", "launch.train",
                    ["--config=tests/tiny_config.py:{pairs}", "--workdir={dir}/run", "--config.loss.betta=0.1",
                     "--debug"], lambda proc, ctx: "the traceback, as asked, ending: " + _last_line(proc.stderr),
                    exit_status=1, traceback_wanted=True),
        cli_refused("command line", "coordinator-without-processes", "launch.train",
                    ["--coordinator_address=localhost:1", "--config=tests/tiny_config.py:{pairs}",
                     "--workdir={dir}/run"], "--coordinator_address needs --num_processes and --process_id too"),
        cli_refused("command line", "process-id-out-of-range", "launch.train",
                    ["--coordinator_address=localhost:1", "--num_processes=2", "--process_id=5",
                     "--config=tests/tiny_config.py:{pairs}", "--workdir={dir}/run"],
                    "--process_id=5 must be in [0, --num_processes=2)"),
        cli_refused("command line", "evaluate-without-model", "launch.evaluate", ["--out={dir}/out"],
                    "--model, --data_source, --data_path and --out are required"),
        cli_refused("command line", "evaluate-unknown-source", "launch.evaluate",
                    ["--model={finished}", "--data_source=csv", "--data_path=x", "--out={dir}/out"],
                    "flag --data_source=csv: value should be one of"),
        cli_refused("command line", "tally-without-answer-key", "launch.evaluate", ["--tally={dir}/filled.csv"],
                    "--tally needs --answer_key"),
        cli_refused("command line", "sample-top-p-zero", "launch.sample", ["--model=tiny", "--top_p=0"],
                    "generate: need temperature >= 0, top_k >= 0, 0 < top_p <= 1"),
        cli_refused("command line", "sample-past-the-positions", "launch.sample",
                    ["--model={finished}", "--max_new_tokens=500"], "exceeds the model's 128 positions"),
    ]


def config_cases() -> list[Case]:
    file_case = lambda name, body, expect: cli_refused(  # noqa: E731
        "configs", name, "launch.train", ["--config={dir}/my_config.py", "--workdir={dir}/run"], expect,
        _config_file(body))
    return [
        cli_refused("configs", "config-file-missing", "launch.train",
                    ["--config=no/such/config.py", "--workdir={dir}/run"], "config file 'no/such/config.py' does not "
                                                                           "exist"),
        file_case("config-returns-none", "    return None\n",
                  "get_config() returned NoneType, not a ConfigDict (a missing return statement?)"),
        file_case("config-syntax-error", "    return default_config(\n", "SyntaxError: "),
        file_case("config-value-of-wrong-type", "    c = default_config()\n    c.train.steps = 'many'\n    return c\n",
                  "TypeError: Could not override field 'steps'"),
        file_case("config-reads-a-missing-file", "    return open('/no/such/file')\n",
                  "No such file or directory: '/no/such/file'"),
        file_case("config-bad-import", "    import no_such_module\n", "No module named 'no_such_module'"),
        cli_refused("configs", "base-unknown-dataset", "launch.train",
                    ["--config=configs/base.py:nosuch,dpo", "--workdir={dir}/run"],
                    "dataset 'nosuch' is not one of tutor, shp, imdb, hh"),
        cli_refused("configs", "base-one-name", "launch.train",
                    ["--config=configs/base.py:tutor", "--workdir={dir}/run"],
                    "should be configs/base.py:DATASET,METHOD"),
        cli_refused("configs", "unknown-stage", "launch.train",
                    ["--config=configs/quickstart.py", "--workdir={dir}/run", "--config.stages=sft,bogus"],
                    "names stage 'bogus', but the config has no section config.bogus"),
        train_refused("configs", "unknown-method", ["--config.train.method=ppo"],
                      "train.method='ppo' is not one of sft, dpo, dpo_convex"),
        train_refused("configs", "zero-steps", ["--config.train.steps=0"], "train.steps must be positive, got 0"),
        train_refused("configs", "layers-zero", ["--config.model.overrides.n_layer=0"],
                      "GPT2Config.n_layer must be positive, got 0"),
        train_refused("configs", "heads-not-dividing-width", ["--config.model.overrides.n_head=3"],
                      "n_embd=64 is not divisible by n_head=3"),
        train_refused("configs", "max-length-over-positions", ["--config.data.max_length=256"],
                      "data.max_length=256 is longer than the model's n_positions=128"),
        train_refused("configs", "tokenizer-directory-missing", ["--config.tokenizer.spec=./no/such/tokenizer"],
                      "tokenizer directory './no/such/tokenizer' does not exist"),
        train_refused("configs", "unknown-preset", ["--config.model.name=huge"], "unknown model preset 'huge'"),
        train_refused("configs", "loss-beta-zero", ["--config.loss.beta=0"], "loss.beta must be positive, got 0.0"),
        train_refused("configs", "learning-rate-nan", ["--config.train.learning_rate=nan"],
                      "train.learning_rate is NaN; it needs a number"),
        train_refused("configs", "guard-bound-zero", ["--config.train.max_abs_loss=0"],
                      "train.max_abs_loss must be positive, got 0.0"),
        train_refused("configs", "hub-model-offline", ["--config.model.init=pretrained",
                                                       "--config.model.name=someone/nothing-here"],
                      "could not be fetched from the Hugging Face hub"),
        cli_refused("configs", "bpe-vocabulary-too-small", "launch.train",
                    ["--config=tests/tiny_config.py:{pairs}", "--workdir={dir}/run",
                     "--config.tokenizer.vocab_size=10"],
                    "a byte-level BPE needs vocab_size >= 257 (256 bytes + EOS), got 10"),
        config_refused("configs", "beta-nan", {"loss.beta": float("nan")}, "loss.beta is NaN; it needs a number"),
        config_refused("configs", "negative-learning-rate", {"train.learning_rate": -1.0},
                       "train.learning_rate must be positive"),
        config_refused("configs", "micro-batches-not-dividing", {"train.micro_batches": 3},
                       "train.batch_size=8 is not divisible by train.micro_batches=3"),
        config_refused("configs", "unknown-dtype", {"model.dtype": "float8"}, "model.dtype='float8' is not one of"),
        config_refused("configs", "unknown-schedule", {"train.schedule": "linear"}, "train.schedule='linear' is not"),
        config_refused("configs", "unknown-loss", {"loss.name": "dpo_plus"}, "loss.name='dpo_plus' is not one of"),
        config_refused("configs", "label-smoothing-half", {"loss.label_smoothing": 0.5},
                       "loss.label_smoothing must be in [0, 0.5), got 0.5"),
        config_refused("configs", "row-cap-zero", {"data.max_row_bytes": 0}, "data.max_row_bytes must be positive"),
        config_refused("configs", "negative-workers", {"data.workers": -1}, "data.workers must be >= 0, got -1"),
        config_refused("configs", "eval-fraction-one", {"data.eval_fraction": 1.0},
                       "data.eval_fraction must be in [0, 1), got 1.0"),
        config_refused("configs", "unknown-source", {"data.source": "csv"}, "data.source='csv' is not one of"),
        config_refused("configs", "prompt-longer-than-max", {"data.max_prompt_length": 64},
                       "need 0 < max_prompt_length (64) < max_length (32)"),
        config_refused("configs", "unknown-truncation", {"data.truncation": "middle"},
                       "truncation 'middle' is not one of keep_end, keep_start"),
        config_refused("configs", "bucket-out-of-range", {"data.buckets": (0, 16)},
                       "length buckets (0, 16) must lie in (0, max_length=32]"),
        raises("configs", "top-level-typo", "a config file setting c.optimiser", lambda ctx: config_lib.validate(
            _with_field(ctx.tiny(), "optimiser", "adamw")), ConfigError, "unknown config key optimiser"),
        cli_refused("configs", "workdir-through-a-file", "launch.train",
                    ["--config=tests/tiny_config.py:{pairs}", "--workdir={dir}/file/run"], "is a file, not a directory",
                    lambda ctx: ctx.write("file", "x")),
        raises("configs", "read-only-workdir", "--workdir in a folder nobody may write in", _read_only_workdir,
               ConfigError, "is not writable (Permission denied)"),
        cli_behaves("configs", "no-held-out-data", "launch.train",
                    ["--config=tests/tiny_config.py:{pairs}", "--workdir={dir}/run", "--config.data.eval_fraction=0",
                     "--config.train.steps=2"], _trained_without_held_out),
    ]


def _with_field(c, key: str, value):
    c[key] = value
    return c


def _read_only_workdir(ctx):
    """A workdir in a read-only folder (root ignores permission bits: there the refusal is simulated)."""
    parent = ctx.path("ro")
    os.makedirs(parent)
    os.chmod(parent, 0o555)
    try:
        if not os.access(parent, os.W_OK):
            return config_lib.check_workdir(os.path.join(parent, "run"))
        with mock.patch("os.makedirs", side_effect=PermissionError(13, "Permission denied", parent)):
            return config_lib.check_workdir(os.path.join(parent, "run"))
    finally:
        os.chmod(parent, 0o755)


def _trained_without_held_out(proc, ctx) -> str:
    rows = read_metrics(ctx.path("run"))
    assert all(set(row) != {"step"} for row in rows), "metrics.jsonl holds an empty evaluation row"
    assert not any(k.startswith("eval/") for row in rows for k in row), "a held-out evaluation was logged"
    return f"trained 2 steps, no held-out evaluation; metrics.jsonl: {len(rows)} training rows, no empty rows"


def mesh_cases() -> list[Case]:
    t = lambda name, args, expect: train_refused("meshes", name, args, expect)  # noqa: E731
    return [
        t("mesh-not-integers", ["--mesh=a,b"], "mesh shape 'a,b' is not a comma-separated list of integers"),
        t("mesh-two-entries", ["--mesh=2,2"], "must have 3 entries"),
        t("mesh-more-slots-than-devices", ["--mesh=4,1,1"], "has 4 slots but 2 devices are present"),
        t("mesh-two-fill-entries", ["--mesh=-1,-1,1"], "entries must be positive, with at most one -1"),
        t("mesh-zero-entry", ["--mesh=0,1,1"], "entries must be positive, with at most one -1"),
        t("mesh-fill-not-dividing", ["--mesh=-1,3,1"], "2 devices are not divisible by the fixed axes' product 3"),
        t("batch-not-dividing-mesh", ["--mesh=2,1,1", "--config.train.batch_size=3"],
          "size 3 is not divisible by the mesh's data x fsdp = 2 x 1 = 2 batch shards"),
        t("heads-not-dividing-tensor-axis", ["--mesh=1,1,2", "--config.model.overrides.n_head=1"],
          "n_head=1 is not divisible by the mesh's tensor axis of size 2"),
        t("mesh-in-config", ["--config.mesh=3,1,1"], "has 3 slots but 2 devices are present"),
    ]


def file_cases() -> list[Case]:
    d = lambda name, shown, changes_, expect, error=DataError: data_refused(  # noqa: E731
        "files", name, shown, changes_, error, expect)
    no_usable = "gave no usable training examples"
    return [
        train_refused("files", "data-file-missing", ["--config.data.path={dir}/no.jsonl"], "no.jsonl' does not exist"),
        train_refused("files", "data-path-is-a-directory", ["--config.data.path={dir}/folder"], "is not a file",
                      lambda ctx: os.makedirs(ctx.path("folder"))),
        d("data-path-empty", "data.source=jsonl, data.path=''", lambda ctx: {"data.path": ""},
          "data.path is required for data.source='jsonl'", ConfigError),
        d("empty-file", "data.path: an empty file", lambda ctx: {"data.path": ctx.write("e.jsonl", b"")}, no_usable),
        d("binary-file", "data.path: a PNG",
          lambda ctx: {"data.path": ctx.write("p.jsonl", b"\x89PNG\r\n\x1a\n\0\0bin")}, no_usable),
        d("not-gzip", "data.path: x.jsonl.gz that is not gzip",
          lambda ctx: {"data.path": ctx.write("x.jsonl.gz", b"not gzip at all")}, "cannot decompress"),
        d("truncated-gzip", "data.path: a gzip cut after 40 bytes", lambda ctx: {"data.path": ctx.write(
            "x.jsonl.gz", gzip.compress(json.dumps(GOOD).encode() * 100)[:40])}, "cannot decompress"),
        d("eval-file-with-no-rows", "data.eval_path: a file of `[1]`",
          lambda ctx: {"data.eval_path": ctx.write("eval.jsonl", b"[1]\n")},
          "(data.source=jsonl) gave no usable examples"),
        d("tutor-without-conversations", "data.source=tutor on a file of `{\"a\": 1}`",
          lambda ctx: {"data.source": "tutor", "data.path": ctx.write("c.jsonl", b'{"a": 1}\n')}, no_usable),
        d("tutor-json-list-too-large", "data.source=tutor: a 40 KB JSON list, data.max_row_bytes=1024",
          lambda ctx: {"data.source": "tutor", "data.max_row_bytes": 1024,
                       "data.path": ctx.write("c.json", json.dumps([_conversation(k) for k in range(500)]))},
          "a JSON list is parsed whole and this one is over 16384 bytes"),
        d("imdb-wrong-columns", "data.source=imdb: a CSV of review,sentiment",
          lambda ctx: {"data.source": "imdb", "data.path": ctx.write("r.csv", b"review,sentiment\nfine,1\n")},
          "CSV lacks column(s) label, text (it has review, sentiment)"),
        d("imdb-not-utf8", "data.source=imdb: a CSV with a \\xff byte",
          lambda ctx: {"data.source": "imdb", "data.path": ctx.write("r.csv", b"text,label\nbad \xff byte,1\n")},
          "r.csv:2: not UTF-8 (invalid start byte)"),
        d("imdb-one-label", "data.source=imdb: only positive reviews",
          lambda ctx: {"data.source": "imdb", "data.path": ctx.write("r.csv", b"text,label\ngood,1\nfine,pos\n")},
          "IMDb labeled pairs need both positive and negative reviews", ConfigError),
        raises("files", "init-from-a-file", "train.init_from: a file", lambda ctx: data_lib.init_from_dir(
            ctx.write("a_file", "x")), MissingFileError, "is not a run's directory"),
        train_refused("files", "init-from-an-unfinished-run", ["--config.train.init_from={dir}/half"],
                      "holds no finished run's model", lambda ctx: os.makedirs(ctx.path("half/checkpoints"))),
        cli_refused("files", "evaluate-missing-split", "launch.evaluate",
                    ["--model={finished}", "--data_source=jsonl", "--data_path={dir}/no.jsonl", "--out={dir}/out"],
                    "no.jsonl' does not exist"),
        cli_refused("files", "evaluate-split-with-no-usable-pairs", "launch.evaluate",
                    ["--model={finished}", "--data_source=jsonl", "--data_path={dir}/split.jsonl", "--out={dir}/out"],
                    "gave no usable pairs; skipped: {'missing field': 1, 'wrong type': 1}",
                    lambda ctx: ctx.write("split.jsonl", '{"prompt": "p", "chosen": "c"}\n[1, 2]\n')),
        cli_behaves("files", "evaluate-max-length-over-positions", "launch.evaluate",
                    ["--model={finished}", "--data_source=jsonl", "--data_path={pairs}", "--max_pairs=16",
                     "--out={dir}/out"], lambda proc, ctx: "capped, one warning: " + _stderr_warning(proc, "positions"),
                    shown="evaluate --model=FINISHED_RUN (128 positions) with the default --max_length=512"),
        Case("files", "data-file-truncated-mid-run", "the data file cut to a third after checkpoint 4",
             _data_truncated_mid_run, True),
    ]


def _conversation(k: int) -> dict:
    return {"sample_id": k, "utterances": [["tutor", f"Hello {k}, what shall we study?"], ["student", "Stars."],
                                           ["tutor", "Stars are suns."]]}


def _data_truncated_mid_run(ctx) -> Outcome:
    data = shutil.copy(ctx.pairs, ctx.path("pairs.jsonl"))
    run = faults.TinyRun(ctx.path("run"), data, ctx.ws.cache)
    proc = run.start("truncate-data-after-save:4")
    _, err = proc.communicate(timeout=900)
    outcome = error_outcome(subprocess.CompletedProcess([], proc.returncode, "", err), "changed during the run",
                            "n/a", "python tests/fault_hook.py truncate-data-after-save 4 ...")
    kept = run.checkpoints()
    outcome.lost = f"nothing (checkpoints {', '.join(map(str, kept))} kept)" if 4 in kept else "checkpoint 4 gone"
    return outcome


def row_cases() -> list[Case]:
    return [
        behaves("rows", "rows-over-the-row-cap", "2 rows of 4 MB among 3 good ones, data.max_row_bytes=1 MiB",
                _rows_over_cap),
        raises("rows", "row-over-the-cap-strict", "the same with data.strict=True", lambda ctx: jsonl.jsonl_source(
            _huge_rows(ctx), strict=True, max_row_bytes=MB), DataError, "pairs.jsonl:2: row too large: "),
        behaves("rows", "loading-memory-bounded", "an 8 MB row, data.max_row_bytes=64 KiB", _memory_bounded),
        behaves("rows", "bad-rows-skipped-and-counted", "rows: broken JSON, not UTF-8, a list, a missing field, "
                "a number for text, empty text", _bad_rows_counted),
        raises("rows", "missing-field-strict", "a row without chosen, data.strict=True", lambda ctx: data_lib.load_data(
            ctx.tiny({"data.strict": True, "data.path": _jsonl(ctx, [GOOD, {"prompt": "p", "rejected": "r"}])}),
            ctx.path("run")), DataError, "pairs.jsonl:2: missing field: 'chosen'"),
        raises("rows", "broken-json-strict", "a cut-off JSON row, data.strict=True", lambda ctx: jsonl.jsonl_source(
            _jsonl(ctx, [GOOD, '{"prompt": "p", "cho']), strict=True), DataError,
            "pairs.jsonl:2: broken JSON: Unterminated string starting at column 17"),
        raises("rows", "no-row-usable", "every row empty strings", lambda ctx: data_lib.load_data(ctx.tiny(
            {"data.path": _jsonl(ctx, [{"prompt": "p", "chosen": "", "rejected": ""}] * 3)}), ctx.path("run")),
            DataError, "gave no usable training examples"),
        behaves("rows", "text-cut-before-tokenizing", "a 2 MB response, data.max_length=32", _text_cut),
        behaves("rows", "imdb-field-over-the-cap", "an IMDb CSV field of 2 MB", _imdb_field_over_cap),
        behaves("rows", "tutor-equal-replies-dropped", "a conversation whose chosen and rejected replies are equal",
                _tutor_equal_dropped),
        raises("rows", "row-changed-after-loading", "line 2 rewritten as broken JSON after indexing",
               lambda ctx: _changed_row(ctx, '{"prompt": "Second.", "cho\n'), DataError,
               "pairs.jsonl:2: the row indexed at this line no longer parses"),
        raises("rows", "row-field-gone-after-loading", "line 2 rewritten without chosen after indexing",
               lambda ctx: _changed_row(ctx, '{"prompt": "Second.", "rejected": "r"}\n'), DataError,
               "pairs.jsonl:2: the row indexed at this line is no longer usable (missing field: 'chosen')"),
        raises("rows", "file-truncated-after-loading", "the file cut after line 1 after indexing",
               lambda ctx: _changed_row(ctx, ""), DataError,
               "pairs.jsonl:2: the row indexed at this line is past the end of the file"),
        cli_behaves("rows", "bad-rows-in-a-training-run", "launch.train",
                    ["--config=tests/tiny_config.py:{dir}/pairs.jsonl", "--workdir={dir}/run",
                     "--config.train.steps=2"], _bad_rows_in_a_run,
                    shown="train on the tiny pairs plus a broken and an empty row", setup=_pairs_with_bad_rows),
    ]


def _jsonl(ctx, rows: list) -> str:
    return ctx.write("pairs.jsonl", "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _huge_rows(ctx, huge_bytes: int = 4 * MB) -> str:
    huge = dict(GOOD, chosen="x" * huge_bytes)
    return _jsonl(ctx, [GOOD, huge, GOOD, huge, GOOD])


def _rows_over_cap(ctx) -> str:
    with _warnings() as said:
        source = jsonl.jsonl_source(_huge_rows(ctx), max_row_bytes=MB)
    assert len(source) == 3 and source.bad.counts == {"row too large": 2}, source.bad.summary()
    assert len(said) == 1, said
    return f"skipped and counted ({source.bad.summary()}); one warning: {said[0]}"


def _memory_bounded(ctx) -> str:
    import tracemalloc

    path = _huge_rows(ctx, 8 * MB)
    tracemalloc.start()
    try:
        source = jsonl.jsonl_source(path, max_row_bytes=64 * 1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(source) == 3 and peak < MB, f"peak {peak} bytes"
    return f"indexed with a peak of {peak // 1024} KiB; the 8 MB rows skipped and counted"


def _bad_rows_counted(ctx) -> str:
    rows = [GOOD, '{"prompt": "p", "cho', b'{"prompt": "\xff\xfe"}', [1, 2], {"prompt": "p", "rejected": "r"},
            dict(GOOD, chosen=5), dict(GOOD, rejected=" "), GOOD]
    content = b"".join((r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode()) + b"\n"
                       for r in rows)
    with _warnings() as said:
        source = jsonl.jsonl_source(ctx.write("pairs.jsonl", content))
    expected = {"broken JSON": 1, "not UTF-8": 1, "wrong type": 2, "missing field": 1, "empty text": 1}
    assert len(source) == 2 and dict(source.bad.counts) == expected, source.bad.summary()
    assert len(said) == 6 and all(":" in w and "\n" not in w for w in said), said
    return f"2 rows kept; {source.bad.summary()}; one warning per row naming file:line"


def _text_cut(ctx) -> str:
    from cvxdpo.data.tokenizer import load_tokenizer

    tok, seen = load_tokenizer("gpt2"), []

    class Recording:
        eos_id = pad_id = tok.eos_id

        def encode(self, text):
            seen.append(len(text))
            return tok.encode(text)

    cfg = pipeline.TokenizeConfig(max_length=32, max_prompt_length=16)
    pipeline.Tokenize(Recording(), cfg, "pairs").map((0, Pair("Tell me.", "bright clear kind " * 110_000, "dull")))
    assert max(seen) <= 32 * pipeline.MAX_CHARS_PER_TOKEN, max(seen)
    return f"the tokenizer saw at most {max(seen)} characters of the 2 MB text"


def _imdb_field_over_cap(ctx) -> str:
    path = ctx.write("reviews.csv", 'text,label\n"a fine film",1\n"' + "y" * (2 * MB) + '",0\n"a poor film",0\n')
    reviews, bad = imdb.from_csv(path)
    assert len(reviews) == 2 and bad.counts["row too large"] == 1, bad.summary()
    return f"{len(reviews)} reviews kept; {bad.summary()}"


def _tutor_equal_dropped(ctx) -> str:
    same = {"utterances": [["tutor", "Hi."], ["student", "Same."], ["tutor", "Same."], ["student", "Other."]]}
    loaded = tutor.load_tutor_pairs(_jsonl(ctx, [same]), slide=True)
    assert loaded.dropped_equal == 1 and len(loaded.pairs) == 1, loaded.summary()
    return loaded.summary()


def _changed_row(ctx, second_line: str):
    path = _jsonl(ctx, [GOOD, dict(GOOD, prompt="Second."), GOOD])
    source = jsonl.jsonl_source(path)
    with open(path) as f:
        first = f.readline()
    with open(path, "w") as f:
        f.write(first + second_line)
    return source[1]


def _pairs_with_bad_rows(ctx) -> None:
    with open(ctx.pairs) as f:
        good = f.read()
    ctx.write("pairs.jsonl", good + '{"prompt": "x", "cho\n{"prompt": "p", "chosen": "", "rejected": "r"}\n')


def _bad_rows_in_a_run(proc, ctx) -> str:
    skipped = [line.split("] ", 1)[-1] for line in proc.stderr.splitlines() if "skipping" in line]
    assert len(skipped) == 2, proc.stderr[-2000:]
    return "trained; one warning per bad row: " + " / ".join(skipped)


def weight_cases() -> list[Case]:
    tiny_hf = hub.config_to_hf(gpt2.preset("tiny", vocab_size=320))

    def model_dir(ctx, config, weights: bytes | None = b"", index: str | None = None) -> str:
        ctx.write("model/config.json", config if isinstance(config, str) else json.dumps(config))
        if weights is not None:
            ctx.write("model/model.safetensors", weights)
        if index is not None:
            ctx.write("model/model.safetensors.index.json", index)
        return ctx.path("model")

    def w(name, shown, make, error, expect):
        return raises("weights", name, shown, lambda ctx: hub.load_pretrained(make(ctx)), error, expect)

    return [
        w("garbage-weights", "model.safetensors: 2 KB of random bytes",
          lambda ctx: model_dir(ctx, tiny_hf, os.urandom(2048)), CheckpointError, "not a readable safetensors file"),
        w("empty-weights", "model.safetensors: empty", lambda ctx: model_dir(ctx, tiny_hf), CheckpointError,
          "not a readable safetensors file"),
        w("config-is-a-list", "config.json: [1, 2]", lambda ctx: model_dir(ctx, "[1, 2]"), ConfigError,
          "holds a JSON list, not an object of GPT-2 settings"),
        w("config-field-type", 'config.json: "n_layer": "two"',
          lambda ctx: model_dir(ctx, '{"model_type": "gpt2", "n_layer": "two"}'), ConfigError,
          "n_layer is 'two', not an integer"),
        w("config-not-json", "config.json: `{not json`", lambda ctx: model_dir(ctx, "{not json"), ConfigError,
          "not valid JSON"),
        w("not-a-gpt2", 'config.json: "model_type": "llama"',
          lambda ctx: model_dir(ctx, {**tiny_hf, "model_type": "llama"}), ConfigError,
          "model_type is 'llama', not 'gpt2'"),
        w("no-config", "a folder with weights and no config.json",
          lambda ctx: os.path.dirname(ctx.write("model/model.safetensors", b"x")), MissingFileError, "no config.json"),
        w("no-weights", "config.json and no weights", lambda ctx: model_dir(ctx, tiny_hf, None), MissingFileError,
          "cvxdpo reads safetensors weights only"),
        w("index-without-weight-map", 'model.safetensors.index.json: {"metadata": {}}',
          lambda ctx: model_dir(ctx, tiny_hf, None, '{"metadata": {}}'), ConfigError, "has no 'weight_map' object"),
        w("index-is-a-list", "model.safetensors.index.json: []", lambda ctx: model_dir(ctx, tiny_hf, None, "[]"),
          ConfigError, "has no 'weight_map' object"),
        w("tensor-missing", "the finished run's weights without wpe", lambda ctx: _edited_weights(ctx, drop="wpe"),
          ConfigError, "tensor 'wpe.weight' is missing from the weights"),
        w("tensor-wrong-shape", "the finished run's weights with wpe cut to 64 rows",
          lambda ctx: _edited_weights(ctx, cut="wpe"), ConfigError,
          "has shape (64, 64), config.json implies (128, 64)"),
        train_refused("weights", "init-from-garbage-weights", ["--config.train.init_from={dir}/sft"],
                      "model.safetensors: not a readable safetensors file", _garbage_run),
        train_refused("weights", "init-from-nan-weights", ["--config.train.init_from={dir}/nan"],
                      "holds non-finite weights: parameter wte has NaN or infinite values", _nan_run),
        train_refused("weights", "tokenizer-larger-than-vocabulary",
                      ["--config.train.init_from={finished}", "--config.tokenizer.spec=gpt2"],
                      "tokenizer 'gpt2' has 50257 tokens but the model only 320"),
        cli_refused("weights", "sample-garbage-weights", "launch.sample", ["--model={dir}/sft"],
                    "not a readable safetensors file", _garbage_run),
        cli_refused("weights", "sample-missing-model", "launch.sample", ["--model={dir}/nowhere"],
                    "does not exist (or is not a directory)"),
    ]


def _weights_file(run: str) -> str:
    return os.path.join(run, "hf", "model.safetensors")


def _edited_weights(ctx, drop: str | None = None, cut: str | None = None) -> str:
    import safetensors.numpy

    folder = shutil.copytree(os.path.join(ctx.ws.finished, "hf"), ctx.path("model"))
    tensors = safetensors.numpy.load_file(os.path.join(folder, "model.safetensors"))
    key = next(k for k in tensors if k.split(".")[-2] == (drop or cut))
    if drop:
        del tensors[key]
    else:
        tensors[key] = tensors[key][:64]
    safetensors.numpy.save_file(tensors, os.path.join(folder, "model.safetensors"))
    return folder


def _garbage_run(ctx) -> None:
    ctx.write("sft/hf/config.json", json.dumps(hub.config_to_hf(gpt2.preset("tiny", vocab_size=320))))
    ctx.write("sft/hf/model.safetensors", os.urandom(4096))


def _nan_run(ctx) -> None:
    import safetensors.numpy

    shutil.copytree(os.path.join(ctx.ws.finished, "hf"), ctx.path("nan/hf"))
    path = _weights_file(ctx.path("nan"))
    tensors = safetensors.numpy.load_file(path)
    key = next(k for k in tensors if k.split(".")[-2] == "wte")
    tensors[key] = np.full_like(tensors[key], np.nan)
    safetensors.numpy.save_file(tensors, path)


def checkpoint_cases() -> list[Case]:
    damages = {"truncated-array-file": faults.truncate, "overwritten-array-file": faults.overwrite,
               "deleted-array-files": faults.delete_arrays, "overwritten-metadata": faults.overwrite_metadata,
               "empty-step-folder": None}
    cases = [Case("checkpoints", f"damaged-newest-checkpoint-{name}", f"checkpoint 12: {name.replace('-', ' ')}"
                  if damage else "an empty folder checkpoints/20 (a copy cut short)", _recovers(damage), True)
             for name, damage in damages.items()]
    return cases + [
        Case("checkpoints", "no-intact-checkpoint", "checkpoints 8 and 12 without their arrays",
             _no_intact_checkpoint, True),
        train_refused("checkpoints", "resume-under-another-shape", ["--config.model.overrides.n_embd=128"],
                      "cannot be restored into this run's state (was the config changed?)"),
        train_refused("checkpoints", "resume-under-another-method", ["--config.train.method=dpo_convex"],
                      "cannot be restored into this run's state (was the config changed?)"),
        Case("checkpoints", "checkpoints-path-is-a-file", "<run>/checkpoints is a file", _checkpoints_a_file, True),
        Case("checkpoints", "rerun-of-a-finished-run", "the same command again", _rerun_finished, True),
        Case("checkpoints", "full-disk-at-a-checkpoint", "No space left on device at the save of step 8",
             _full_disk, True),
        Case("checkpoints", "sigterm-mid-run", "SIGTERM once step 6 is logged", _sigterm, True),
        Case("checkpoints", "sigkill-mid-checkpoint-write", "SIGKILL right after the save of step 8 starts, then "
             "the same command", _sigkill_then_rerun, True),
        Case("checkpoints", "divergence", "train.learning_rate=1e6", _diverges, True),
        behaves("checkpoints", "torn-metrics-line", 'metrics.jsonl ending in `{"step": 4, "lo`', _torn_metrics),
        raises("checkpoints", "full-disk-under-the-metrics", "No space left on device writing TensorBoard events",
               _metrics_disk_full, OutputError, "cannot write the metrics of"),
    ]


def _recovers(damage) -> Callable[[Context], Outcome]:
    """The finished run with its newest checkpoint damaged (or an empty step folder past it), rerun: one
    warning, the step before restored, the run finished again."""
    def run(ctx):
        workdir = ctx.finished_copy()
        if damage:
            damage(os.path.join(workdir, "checkpoints", "12"))
        else:
            os.makedirs(os.path.join(workdir, "checkpoints", "20"))
        proc, command = ctx.launch("launch.train", ctx.train_args(workdir))

        def check():
            assert proc.returncode == 0, _last_line(proc.stderr)
            warning = _stderr_warning(proc, "is damaged or incomplete")
            assert os.path.isfile(_weights_file(workdir))
            return f"one warning: {warning}; the run finished from the step before"
        return behaviour_outcome(f"exit {proc.returncode}", check, TRACEBACK in proc.stderr, "nothing", command)
    return run


def _no_intact_checkpoint(ctx) -> Outcome:
    workdir = ctx.finished_copy()
    for step in ("8", "12"):
        faults.delete_arrays(os.path.join(workdir, "checkpoints", step))
    before = snapshot(workdir)
    proc, command = ctx.launch("launch.train", ctx.train_args(workdir))
    return error_outcome(proc, "steps 12, 8 are damaged or incomplete; move the directory away",
                         changes(before, snapshot(workdir)), command)


def _checkpoints_a_file(ctx) -> Outcome:
    workdir = ctx.finished_copy()
    shutil.rmtree(os.path.join(workdir, "checkpoints"))
    ctx.write("run/checkpoints", "x")
    before = snapshot(workdir)
    proc, command = ctx.launch("launch.train", ctx.train_args(workdir))
    return error_outcome(proc, "checkpoints is a file, not a directory of checkpoints",
                         changes(before, snapshot(workdir)), command)


def _rerun_finished(ctx) -> Outcome:
    workdir = ctx.finished_copy()
    before = snapshot(workdir)
    proc, command = ctx.launch("launch.train", ctx.train_args(workdir))

    def check():
        assert proc.returncode == 0, _last_line(proc.stderr)
        assert snapshot(workdir) == before, changes(before, snapshot(workdir))
        return "nothing trained or written; the report read back from metrics.jsonl, the model exported again"
    return behaviour_outcome(f"exit {proc.returncode}", check, TRACEBACK in proc.stderr, "nothing", command)


def _full_disk(ctx) -> Outcome:
    run = faults.TinyRun(ctx.path("run"), ctx.pairs, ctx.ws.cache)
    proc = run.start("enospc-at-save:8")
    _, err = proc.communicate(timeout=900)
    outcome = error_outcome(subprocess.CompletedProcess([], proc.returncode, "", err),
                            "No space left on device; the newest complete checkpoint is step 4", "n/a",
                            "python tests/fault_hook.py enospc-at-save 8 ...")
    outcome.lost = "nothing (checkpoint 4 kept)" if run.checkpoints() == [4] else f"checkpoints {run.checkpoints()}"
    return outcome


def _sigterm(ctx) -> Outcome:
    run = faults.TinyRun(ctx.path("run"), ctx.pairs, ctx.ws.cache)
    proc = run.signal_at_step(6, signal.SIGTERM)
    _, err = proc.communicate(timeout=900)
    outcome = error_outcome(subprocess.CompletedProcess([], proc.returncode, "", err), "stopped by SIGTERM at step",
                            "n/a", "python -m launch.train ... (SIGTERM once step 6 is logged)")
    stopped = re.search(r"at step (\d+)", outcome.message)
    kept = stopped and max(run.checkpoints(), default=0) == int(stopped.group(1)) == run.logged_step()
    outcome.lost = "nothing (the stopped step checkpointed)" if kept else f"checkpoints {run.checkpoints()}"
    return outcome


def _sigkill_then_rerun(ctx) -> Outcome:
    run = faults.TinyRun(ctx.path("run"), ctx.pairs, ctx.ws.cache)
    run.kill_during_save(8)
    resumed_from = max(run.checkpoints(), default=0)
    proc = run.start()
    _, err = proc.communicate(timeout=900)

    def check():
        assert proc.returncode == 0, _last_line(err)
        assert run.checkpoints()[-1] == run.steps and os.path.isfile(_weights_file(run.workdir))
        return f"the rerun resumed from checkpoint {resumed_from} and finished"
    return behaviour_outcome(f"exit {proc.returncode}", check, TRACEBACK in err, "nothing",
                             "python tests/fault_hook.py kill-after-save 8 ...; python -m launch.train ...")


def _diverges(ctx) -> Outcome:
    workdir = ctx.path("run")
    proc, command = ctx.launch("launch.train", ctx.train_args(workdir) + ["--config.train.learning_rate=1e6"])
    exported = os.path.exists(os.path.join(workdir, "hf"))
    return error_outcome(proc, "became NaN, infinite or out of range", "exported anyway" if exported else "n/a",
                         command)


def _torn_metrics(ctx) -> str:
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)]
    ctx.write(METRICS_FILE, "".join(rows) + '{"step": 4, "lo')
    with _warnings() as said:
        writer = MetricsWriter(ctx.dir, resume_step=3, enabled=True)
        writer.close()
    with open(ctx.path(METRICS_FILE)) as f:
        assert f.read() == "".join(rows), "the complete rows were not kept"
    assert len(said) == 1, said
    return f"one warning: {said[0]}; the complete rows kept"


def _metrics_disk_full(ctx):
    from tensorboardX.record_writer import RecordWriter

    writer = MetricsWriter(ctx.dir, resume_step=0, enabled=True)
    with mock.patch.object(RecordWriter, "flush", side_effect=OSError(28, os.strerror(28))):
        writer.write(1, {"loss": 0.5})


def convex_cases() -> list[Case]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 3))
    y = (X[:, 0] > 0).astype(int)
    fitted = {}

    def fitted_classifier():
        if not fitted:
            fitted["clf"] = ConvexReLUClassifier(num_gates=4, max_iter=20).fit(X, y)
        return fitted["clf"]

    def c(name, shown, call, error, expect):
        return raises("convex", name, shown, lambda ctx: call(), error, expect)

    def fit(X_=X, y_=y, **kwargs):
        return ConvexReLUClassifier(**{"num_gates": 4, "max_iter": 20, **kwargs}).fit(X_, y_)

    mesh = jax.make_mesh((1, 1, 2), ("data", "fsdp", "tensor"))
    return [
        c("empty-X", "fit(X of shape (0, 3))", lambda: fit(np.zeros((0, 3)), np.zeros(0)), DataError,
          "needs at least one sample and one feature"),
        c("no-gates", "num_gates=0", lambda: fit(num_gates=0), ConfigError, "num_gates must be a positive integer"),
        c("negative-gates", "num_gates=-3", lambda: fit(num_gates=-3), ConfigError, "got -3"),
        c("fractional-gates", "num_gates=2.5", lambda: fit(num_gates=2.5), ConfigError, "got 2.5"),
        c("text-X", 'fit("some text", y)', lambda: fit("some text"), DataError, "X must hold real numbers"),
        c("one-dimensional-X", "fit(X[:, 0], y)", lambda: fit(X[:, 0]), DataError, "X must be a 2-D"),
        c("nan-in-X", "X with a NaN row", lambda: fit(np.where(np.arange(40)[:, None] == 7, np.nan, X)), DataError,
          "NaN or infinite values"),
        c("y-wrong-length", "y of 39 labels for 40 rows", lambda: fit(y_=y[:-1]), DataError, "y has shape (39,)"),
        c("labels-not-binary", "labels 0, 1, 2", lambda: fit(y_=y + (X[:, 1] > 1)), DataError,
          "labels must be +-1 or 0/1"),
        c("one-class", "every label 1", lambda: fit(y_=np.ones(40, int)), DataError, "a classifier needs both classes"),
        c("predict-before-fit", "predict before fit", lambda: ConvexReLUClassifier().predict(X), ConfigError,
          "not fitted yet: call fit"),
        c("objective-before-fit", "objective before fit", lambda: ConvexReLUClassifier().objective(), ConfigError,
          "not fitted yet: call fit"),
        c("wrong-feature-count", "predict on 2 features after fitting 3",
          lambda: fitted_classifier().predict(X[:, :2]), DataError, "X has 2 features; the classifier was fitted on 3"),
        c("gap-of-relu-variant", "duality_gap() of variant='relu'",
          lambda: fit(variant="relu").duality_gap(), ConfigError, "defined for the gated model only"),
        c("unknown-convex-loss", "loss='hinge'", lambda: fit(loss="hinge"), ConfigError,
          "convex loss 'hinge' is not one of"),
        c("unknown-variant", "variant='leaky'", lambda: fit(variant="leaky"), ConfigError,
          "convex variant 'leaky' is not one of"),
        c("unknown-preconditioner", "preconditioner='ilu'", lambda: fit(preconditioner="ilu"), ConfigError,
          "preconditioner 'ilu' is not one of"),
        c("beta-zero", "beta=0", lambda: fit(beta=0.0), ConfigError, "convex beta must be positive"),
        c("no-iterations", "max_iter=0", lambda: fit(max_iter=0), ConfigError, "ADMM needs rho > 0, max_iter > 0"),
        c("negative-rho", "ADMMConfig(rho=-1)", lambda: admm.ADMMConfig(rho=-1.0), ConfigError, "ADMM needs rho > 0"),
        c("nystrom-sharded", "preconditioner='nystrom' with gates split over a mesh",
          lambda: fit(preconditioner="nystrom", mesh=mesh), ConfigError, "the nystrom preconditioner needs all gates"),
        c("gates-not-dividing-mesh", "num_gates=3 over a tensor axis of 2", lambda: fit(num_gates=3, mesh=mesh),
          ConfigError, "num_gates=3 is not divisible by the mesh's tensor axis of size 2"),
        c("rows-not-dividing-mesh", "39 rows over a row axis of 2",
          lambda: fit(X[:39], y[:39], mesh=mesh, gate_axis="data", row_axis="tensor"), ConfigError,
          "39 rows are not divisible by the mesh's tensor axis of size 2"),
        c("solver-diverges", "X scaled by 1e200 (infinite in float32)", lambda: fit(X * 1e200), DataError,
          "ADMM diverged (residuals became NaN or infinite)"),
    ]


def dpo_convex_cases() -> list[Case]:
    def d(name, changes_, expect):
        return config_refused("dpo-convex", name, {"train.method": "dpo_convex", **changes_}, expect)
    return [
        d("unknown-signal", {"signal.name": "reward"},
          "signal.name='reward' is not one of distill, margin, soft_label"),
        d("unknown-signal-scale", {"signal.scale": "robust"}, "signal.scale='robust' is not one of"),
        d("signal-tau-zero", {"signal.tau": 0.0}, "signal.tau must be positive and signal.eps in (0, 0.5)"),
        d("signal-eps-half", {"signal.eps": 0.5}, "signal.tau must be positive and signal.eps in (0, 0.5)"),
        d("anchor-dim-zero", {"anchor.dim": 0}, "anchor.dim must be positive, got 0"),
        d("anchor-buffer-not-batch-multiple", {"anchor.buffer": 12},
          "anchor.buffer=12 must be a multiple of train.batch_size=8"),
        d("anchor-buffer-zero", {"anchor.buffer": 0}, "anchor.buffer must be positive, got 0"),
        d("anchor-refresh-zero", {"anchor.refresh_every": 0}, "anchor.refresh_every must be positive, got 0"),
        d("anchor-gates-zero", {"anchor.num_gates": 0}, "anchor.num_gates must be positive, got 0"),
        d("anchor-iterations-zero", {"anchor.admm_iters": 0}, "anchor.admm_iters must be positive, got 0"),
        d("anchor-reg-zero", {"anchor.reg": 0.0}, "anchor.reg must be positive, got 0.0"),
        d("anchor-unknown-loss", {"anchor.loss": "hinge"}, "anchor.loss='hinge' is not one of"),
        d("anchor-unknown-probe", {"anchor.probe": "mlp"}, "anchor.probe='mlp' is not one of convex, linear"),
        d("anchor-unknown-control", {"anchor.control": "random"},
          "anchor.control='random' is not one of none, shuffled, constant"),
        d("anchor-unknown-features", {"anchor.features": "reference"},
          "anchor.features='reference' is not one of policy, frozen"),
        train_refused("dpo-convex", "anchor-setting-through-launch", ["--config.train.method=dpo_convex",
                                                                       "--config.anchor.buffer=12"],
                      "anchor.buffer=12 must be a multiple of train.batch_size=8"),
        train_refused("dpo-convex", "signal-gamma-nan", ["--config.train.method=dpo_convex",
                                                          "--config.signal.gamma=nan"],
                      "signal.gamma is NaN; it needs a number"),
        train_refused("dpo-convex", "anchor-field-typo", ["--config.anchor.num_gate=4"],
                      "did you mean anchor.num_gates?"),
    ]


def all_cases() -> list[Case]:
    return (command_line_cases() + config_cases() + mesh_cases() + file_cases() + row_cases() + weight_cases()
            + checkpoint_cases() + convex_cases() + dpo_convex_cases())


# --- running and reporting ------------------------------------------------------------------------------------

def run_case(ws: Workspace, case: Case) -> dict:
    start = time.perf_counter()
    try:
        outcome = case.run(Context(ws, case))
    except Exception as e:  # noqa: BLE001 (a case that cannot run is recorded, not fatal)
        outcome = Outcome("tool error", f"{type(e).__name__}: {e}", False, "n/a", ["the case itself failed"])
    return {"category": case.category, "case": case.name, "input": case.shown, "result": outcome.status,
            "message": outcome.message, "traceback": outcome.traceback, "lost": outcome.lost,
            "verdict": "ok" if not outcome.problems else "open: " + "; ".join(outcome.problems),
            "command": outcome.command, "seconds": round(time.perf_counter() - start, 1)}


def normalized(record: dict, tmp: str) -> dict:
    """Machine-specific paths out: the workspace becomes <tmp>, the repository and the Python install go."""
    replacements = [(sys.executable, "python"), (sys.prefix, "<venv>"), (sys.base_prefix, "<python>"),
                    (tmp, "<tmp>"), (os.path.realpath(tempfile.gettempdir()), "<tmp>"), (os.path.join(ROOT, ""), ""),
                    (ROOT, "."), (os.path.expanduser("~"), "~")]
    out = {}
    for key, value in record.items():
        if isinstance(value, str):
            for old, new in replacements:
                value = value.replace(old, new)
        out[key] = value
    return out


def _cell(text, width: int = 220) -> str:
    text = str(text).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= width else text[:width - 1] + "…"


def markdown(records: list[dict], seconds: float) -> str:
    ok = sum(r["verdict"] == "ok" for r in records)
    lines = [
        "# Reliability: what bad input does",
        "",
        "Made by `python tools/reliability.py` (do not edit by hand: rerun it after a change). "
        f"{len(records)} cases, {ok} ok, {len(records) - ok} open; the run took {seconds / 60:.0f} minutes.",
        "",
        "The contract: a user's mistake (a bad flag, config value, file, row, mesh, weights or checkpoint) is "
        "one line on stderr, `error: ...` saying what is wrong and where, with exit status 2 and no traceback "
        "(`--debug` shows one), and nothing already in the run directory is lost. Some inputs are not errors "
        "and have a documented behaviour instead: a bad row is skipped and counted, a damaged newest "
        "checkpoint is replaced by the one before, SIGTERM checkpoints and stops.",
        "",
        "Each case runs its input. `launch.*` cases are subprocesses; `launch.train` refusals run "
        "`python -m launch.train --config=tests/tiny_config.py:PAIRS --workdir=RUN` plus the flags shown, RUN "
        "being a copy of a finished tiny run (checkpoints 8 and 12, exported model), and **lost** compares its "
        "config.json, metrics.jsonl, checkpoints and exported weights before and after. FINISHED_RUN is that "
        "run. The other cases call the library function that checks the input; for them **traceback** means an "
        "exception that is not one of the toolkit's user errors, which a launcher would print with its "
        "traceback. **result** is the exit status or the exception raised, **message** the `error:` line (or "
        "the message, or what the documented behaviour reported), <tmp> the temporary folder of the run. "
        "**verdict** ok: one line, non-zero exit, no traceback, nothing lost, or the documented behaviour.",
        "",
        "| category | cases | ok | open |",
        "|---|---|---|---|",
    ]
    for category in dict.fromkeys(r["category"] for r in records):
        rows = [r for r in records if r["category"] == category]
        good = sum(r["verdict"] == "ok" for r in rows)
        lines.append(f"| {category} | {len(rows)} | {good} | {len(rows) - good} |")
    open_cases = [r for r in records if r["verdict"] != "ok"]
    lines += ["", "## Open cases", ""]
    lines += [f"- **{r['case']}** ({r['category']}): {_cell(r['verdict'], 400)} — {_cell(r['message'], 400)}"
              for r in open_cases] or ["None."]
    lines += ["", "## All cases", "", "| # | category | case | input | result | message | traceback | lost | verdict |",
              "|---|---|---|---|---|---|---|---|---|"]
    for k, r in enumerate(records, start=1):
        lines.append(f"| {k} | {r['category']} | {r['case']} | {_cell(r['input'], 160)} | {r['result']} | "
                     f"{_cell(r['message'])} | {'yes' if r['traceback'] else 'no'} | {_cell(r['lost'], 60)} | "
                     f"{_cell(r['verdict'], 120)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run the cases whose category or name holds this word")
    parser.add_argument("--work", default="", help="working folder, kept with its compilation cache (default: a "
                        "temporary one, removed after)")
    parser.add_argument("--markdown", default=None, help="the table's file, and its .json beside it (default: "
                        "docs/reliability.md; none with --only)")
    args = parser.parse_args(argv)
    if args.markdown is None:
        args.markdown = "" if args.only else os.path.join(ROOT, "docs", "reliability.md")
    cases = [c for c in all_cases() if args.only in c.category or args.only in c.name]
    names = [c.name for c in cases]
    assert len(set(names)) == len(names), "case names must be unique"
    work = args.work or tempfile.mkdtemp(prefix="reliability-")
    os.makedirs(work, exist_ok=True)
    start = time.perf_counter()
    try:
        ws = Workspace(os.path.realpath(work))
        jax.config.update("jax_compilation_cache_dir", ws.cache)
        ws.make_finished_run()
        records = {c.name: run_case(ws, c) for c in cases if not c.subprocess}
        with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
            futures = {c.name: pool.submit(run_case, ws, c) for c in cases if c.subprocess}
            records.update({name: f.result() for name, f in futures.items()})
        ordered = [normalized(records[name], ws.root) for name in names]
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - start
    table = markdown(ordered, seconds)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
        with open(os.path.splitext(args.markdown)[0] + ".json", "w") as f:
            json.dump({"command": "python tools/reliability.py", "seconds": round(seconds), "cases": ordered}, f,
                      indent=1)
    return 0 if all(r["verdict"] == "ok" for r in ordered) else 1


if __name__ == "__main__":
    sys.exit(main())
