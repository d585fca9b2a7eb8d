"""What every entry point shares: --mesh, the multi-host flags, and one-line errors for user mistakes.

A user's mistake (a bad flag or config value, a missing or unreadable file,
bad data) is printed as one line, `error: ...` on stderr, and the process exits
with status 2; `--debug` shows the traceback instead. Anything else is a bug
and keeps its traceback.
"""

import contextlib
import logging as std_logging
import os
import re
import sys
import traceback
import warnings

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from cvxdpo import config as config_lib
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
DEBUG = flags.DEFINE_bool("debug", False, "Show the full traceback of an error instead of one line.")

EXIT_USER_ERROR = 2
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


# --- one-line errors -------------------------------------------------------------------------------------

def one_line(text: str) -> str:
    """A message on one line: the lines of a multi-line message joined with " | "."""
    return " | ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())


def _debug_requested(argv) -> bool:
    """--debug, whether or not flag parsing got as far as it (it may be what failed)."""
    if flags.FLAGS.is_parsed() and DEBUG.value:
        return True
    return any(re.fullmatch(r"--?debug(=(true|1|t|yes))?", arg, re.IGNORECASE) for arg in argv[1:])


@contextlib.contextmanager
def user_errors(argv, types, describe=str):
    """Turns an exception of `types` into `error: <describe(e)>` on one line and exit status 2 (with --debug
    it propagates, traceback and all)."""
    try:
        yield
    except types as e:
        if _debug_requested(argv):
            raise
        print(f"error: {one_line(describe(e))}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def format_warning(message, category, filename, lineno, line=None) -> str:
    """warnings.formatwarning on one line: without the source line that warned, a multi-line message joined."""
    return f"{filename}:{lineno}: {category.__name__}: {one_line(message)}\n"


def _config_flags() -> list:
    """The flags that name a config file (launch.train's --config)."""
    return [flags.FLAGS[name] for name in flags.FLAGS if isinstance(flags.FLAGS[name].parser, ConfigFileFlagParser)]


def _flag_value(name: str, argv) -> str | None:
    """The value of --NAME on the command line (`--NAME=VALUE` or `--NAME VALUE`), read before absl has
    parsed it (it may be what fails)."""
    for k, arg in enumerate(argv):
        if arg.startswith((f"--{name}=", f"-{name}=")):
            return arg.split("=", 1)[1]
        if arg in (f"--{name}", f"-{name}") and k + 1 < len(argv):
            return argv[k + 1]
    return None


def _missing_config_file(argv) -> str | None:
    """A config flag whose file does not exist (ml_collections says so only when the config is first used)."""
    for flag in _config_flags():
        spec = _flag_value(flag.name, argv)
        path = spec.split(":", 1)[0] if spec else None
        if path and not os.path.isfile(path):
            return f"--{flag.name}: config file {path!r} does not exist"
    return None


def _bad_override(argv) -> str | None:
    """The first `--config.a.b=...` that names no field of its config (the file is loaded again: absl's
    message for it is a 57-line traceback from inside ml_collections)."""
    for flag in _config_flags():
        spec = _flag_value(flag.name, argv)
        if spec is None:
            continue
        try:
            config = flag.parser.parse(spec)
        except Exception:  # the file itself fails to load: the caller describes that error
            return None
        if not isinstance(config, ml_collections.ConfigDict):
            return None
        prefix = re.compile(rf"^--?(no)?{re.escape(flag.name)}\.")
        for arg in argv:
            problem = prefix.match(arg) and config_lib.unknown_key(config, prefix.sub("", arg.split("=", 1)[0]))
            if problem:
                return problem
    return None


def _user_frames(error: BaseException) -> list:
    """The frames of `error`'s traceback in the user's code (a config file, cvxdpo), not in installed packages."""
    installed = tuple(os.path.join(p, "") for p in {sys.prefix, sys.base_prefix})
    return [f for f in traceback.extract_tb(error.__traceback__)
            if not f.filename.startswith(installed) and not f.filename.startswith("<")]


def _describe_exception(error: BaseException) -> str:
    """`Type: message (FILE, line N)` for the deepest exception of a chain (absl and ml_collections re-raise
    a config file's errors, wrapped) raised through the user's code, or for the innermost one."""
    chain = [error]
    while (chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    inner = next((e for e in reversed(chain) if _user_frames(e)), chain[-1])
    if isinstance(inner, SyntaxError):
        return f"SyntaxError: {inner.msg} ({inner.filename}, line {inner.lineno})"
    message = (str(inner).strip().splitlines() or [""])[0]
    frames = _user_frames(inner)
    where = f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
    kind = "" if isinstance(inner, CvxdpoError) else f"{type(inner).__name__}: "  # a CvxdpoError says what it is
    return f"{kind}{message}{where}"


def _unloaded_config(argv) -> str | None:
    """A config flag that parsed but holds no ConfigDict: get_config returned something else, or
    ml_collections kept the file's load error for the config's first use."""
    for flag in _config_flags():
        if flag.using_default_value or isinstance(flag.value, ml_collections.ConfigDict):
            continue
        try:
            flag.value.to_dict()  # the stand-in for a failed load raises the load error here
        except OSError as e:
            return f"--{flag.name}: {e}"
        except AttributeError:
            pass
        hint = " (a missing return statement?)" if flag.value is None else ""
        return (f"--{flag.name}={_flag_value(flag.name, argv)}: get_config() returned "
                f"{type(flag.value).__name__}, not a ConfigDict{hint}")
    return None


def describe_flag_error(error: BaseException, argv) -> str:
    """One line for anything raised while parsing the command line: a flag, a config file or an override."""
    problem = _missing_config_file(argv) or _unloaded_config(argv) or _bad_override(argv)
    if problem:
        return problem
    if isinstance(error, flags.Error) and len(str(error).strip().splitlines()) == 1:
        return str(error)  # absl's own: an unknown flag, a missing required flag, a value of the wrong type
    return _describe_exception(error)


class _DropConfigLoaderRecords(std_logging.Filter):
    """ml_collections logs only when a config file fails to load (get_config() returning None, a failed
    import): the error line that follows says the same, and absl prefixes the first record logged before
    flags are parsed with a banner line of its own."""

    def filter(self, record):
        return "ml_collections" not in record.pathname


def parse_flags(argv) -> list[str]:
    """absl's flag parsing with every failure (a flag, a config file, a config override) as one line."""
    drop = _DropConfigLoaderRecords()
    std_logging.getLogger("absl").addFilter(drop)
    try:
        with user_errors(argv, Exception, lambda e: describe_flag_error(e, argv)):
            rest = flags.FLAGS(argv)
            problem = _unloaded_config(argv)
            if problem:
                raise flags.Error(problem)
            return rest
    finally:
        std_logging.getLogger("absl").removeFilter(drop)


def _describe_error(e: Exception) -> str:
    """A user error's message; an OSError as what failed on which path."""
    if isinstance(e, OSError) and not isinstance(e, CvxdpoError):
        reason = e.strerror or str(e)
        return f"{reason}: {e.filename!r}" if e.filename else reason
    return str(e)


def run(main):
    """absl.app.run(main) with multi-host set up first and user errors printed as one line (exit 2).

    jax.distributed is initialized before main runs any other JAX code; process
    0 logs warnings (INFO with --verbosity=0), the others errors only. An
    OSError (permission denied, disk full, a path through a file) is the
    environment's, not a bug: it is one line too.
    """
    warnings.formatwarning = format_warning

    def guarded(argv):
        with user_errors(argv, (CvxdpoError, OSError), _describe_error):
            if not flags.FLAGS["verbosity"].present:
                logging.set_verbosity(logging.WARNING)  # keep the progress bar and report readable
            mesh_lib.initialize_distributed(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value,
                                            auto=MULTIHOST.value)
            if jax.process_index() != 0:
                logging.set_verbosity(logging.ERROR)
            return main(argv)

    app.run(guarded, flags_parser=parse_flags)
