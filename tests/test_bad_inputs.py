"""Bad inputs a user can hand the toolkit: each gives one clear error line (or a skipped, counted row), never a
traceback. Command-line cases run launch.* as subprocesses (flag parsing happens there, before main); the
rest call the function that checks, in process. The table of cases is in docs/reliability.md."""

import gzip
import json
import logging
import os
import re
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from cvxdpo import config as config_lib
from cvxdpo.convex.classifier import ConvexReLUClassifier
from cvxdpo.data import imdb, jsonl, pipeline, tutor
from cvxdpo.data.records import Pair
from cvxdpo.data.tokenizer import load_tokenizer
from cvxdpo.errors import CheckpointError, ConfigError, DataError, MissingFileError
from cvxdpo.model import gpt2, hub
from cvxdpo.train import data as data_lib
from cvxdpo.train.checkpoint import Checkpointer
from cvxdpo.train.logs import MetricsWriter, read_metrics
from cvxdpo.train.trainer import Trainer
from data_fixtures import write_jsonl
from launch import common
from tiny_config import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = {"prompt": "Tell me about stars.", "chosen": " bright clear kind", "rejected": " dull vague rude"}
MB = 1 << 20
LOG_RECORD = re.compile(r"^([IWEF]\d{4} |\S+:\d+: \w+: )")  # an absl log record, or a warning (launch/common.py)


def _cli(*args, module="launch.train"):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def _assert_one_line_error(proc, expected: str) -> None:
    """Exit status 2, no traceback, and the last stderr line is `error: ...` holding `expected`; any other
    stderr line is a one-line log record (a warning), not a banner or a continuation."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("error: ") and expected in lines[-1], lines[-1]
    assert all(LOG_RECORD.match(line) for line in lines[:-1]), lines


@pytest.fixture
def tiny(pairs):
    """The tiny config with GPT-2's own tokenizer (nothing to train before the data loads)."""
    c = get_config(pairs)
    c.tokenizer.spec = "gpt2"
    return c


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2")


def _write_config_file(tmp_path, body: str) -> str:
    path = tmp_path / "my_config.py"
    path.write_text("from cvxdpo.config import default_config\n\n\ndef get_config():\n" + body)
    return str(path)


# --- the command line: flags, config files, overrides (all parsed before main runs) ------------------------

@pytest.mark.parametrize("args, expected", [
    (["--config.train.foo=1"], "unknown config key train.foo; train has batch_size, "),
    (["--config.loss.betta=0.1"], "unknown config key loss.betta; did you mean loss.beta?"),
    (["--config.loss.beta.x=1"], "unknown config key loss.beta.x: loss.beta is a float, not a section"),
    (["--config.model.overrides.n_layer=two"], "flag --config.model.overrides.n_layer=two: invalid literal for int()"),
    (["--config.train.steps=1.5"], "flag --config.train.steps=1.5: invalid literal for int()"),
    (["--config.model.overrides.vocab=5"], "unknown config key model.overrides.vocab; model.overrides has "
                                            "layer_norm_epsilon, n_embd"),
    (["--foo=1"], "Unknown command line flag 'foo'"),
    (["--mesh"], "Missing value for flag --mesh"),
], ids=["unknown-field", "typo", "below-a-value", "override-wrong-type", "float-for-int", "unknown-override",
        "unknown-flag", "flag-without-value"])
def test_bad_command_line_is_one_line(tmp_path, pairs, args, expected):
    _assert_one_line_error(_cli(f"--config=tests/tiny_config.py:{pairs}", f"--workdir={tmp_path / 'run'}", *args),
                           expected)


@pytest.mark.parametrize("body, expected", [
    (None, "config file 'no/such/config.py' does not exist"),
    ("    return None\n", "get_config() returned NoneType, not a ConfigDict (a missing return statement?)"),
    ("    return default_config(\n", "SyntaxError: "),
    ("    c = default_config()\n    c.train.steps = 'many'\n    return c\n",
     "TypeError: Could not override field 'steps'"),
    ("    return open('/no/such/file')\n", "No such file or directory: '/no/such/file'"),
    ("    import no_such_module\n", "ModuleNotFoundError: No module named 'no_such_module' ("),
], ids=["missing", "returns-none", "syntax-error", "wrong-type", "reads-a-missing-file", "bad-import"])
def test_bad_config_file_is_one_line(tmp_path, body, expected):
    config = "no/such/config.py" if body is None else _write_config_file(tmp_path, body)
    _assert_one_line_error(_cli(f"--config={config}", f"--workdir={tmp_path / 'run'}"), expected)


@pytest.mark.parametrize("args, expected", [
    (["--config=configs/base.py:nosuch,dpo", "--workdir=W"], "dataset 'nosuch' is not one of tutor, shp, imdb, hh "
                                                             "(configs/base.py"),
    (["--config=configs/base.py:tutor", "--workdir=W"], "should be configs/base.py:DATASET,METHOD"),
    (["--config=configs/quickstart.py", "--workdir=W", "--config.stages=sft,bogus"],
     "names stage 'bogus', but the config has no section config.bogus"),
    (["--config.loss.beta=1", "--config=configs/quickstart.py", "--workdir=W"],
     "before a value for --config was specified"),
    (["--config=configs/quickstart.py"], "flag --workdir=None: Flag --workdir must have a value other than None"),
], ids=["base-unknown-dataset", "base-one-name", "unknown-stage", "override-before-config", "no-workdir"])
def test_bad_experiment_choice_is_one_line(tmp_path, args, expected):
    args = [arg.replace("--workdir=W", f"--workdir={tmp_path / 'run'}") for arg in args]
    _assert_one_line_error(_cli(*args), expected)


def test_debug_shows_the_traceback(tmp_path, pairs):
    proc = _cli(f"--config=tests/tiny_config.py:{pairs}", f"--workdir={tmp_path}", "--config.loss.betta=0.1", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.parametrize("module", ["launch.train", "launch.sample", "launch.evaluate"])
def test_help_lists_the_shared_flags(module):
    out = _cli("--help", module=module).stdout
    assert "--mesh:" in out and "--[no]debug:" in out and "--coordinator_address:" in out


def test_warnings_are_one_line():
    assert common.format_warning("first\nsecond", UserWarning, "f.py", 3, "warn(x)") == \
        "f.py:3: UserWarning: first | second\n"


def test_model_override_of_a_scratch_preset_reaches_the_model(tmp_path, pairs):
    """`--config.model.overrides.n_layer=...` parses (it was an unknown key) and reaches the preset: a zero
    says so in one line; an unset override keeps the preset's value."""
    proc = _cli(f"--config=tests/tiny_config.py:{pairs}", f"--workdir={tmp_path}", "--config.model.overrides.n_layer=0")
    _assert_one_line_error(proc, "GPT2Config.n_layer must be positive, got 0")
    assert gpt2.preset("tiny", **get_config().model.overrides.to_dict()).n_layer == 2
    assert gpt2.preset("tiny", n_layer=3, n_embd=None).n_layer == 3


def test_errors_inside_main_are_one_line(tmp_path, pairs):
    (tmp_path / "file").write_text("x")
    proc = _cli(f"--config=tests/tiny_config.py:{pairs}", f"--workdir={tmp_path / 'file' / 'run'}")
    _assert_one_line_error(proc, "cannot be created: '" + str(tmp_path / "file") + "' is a file, not a directory")
    proc = _cli(f"--config=tests/tiny_config.py:{pairs}", f"--workdir={tmp_path / 'run'}", "--mesh=a,b")
    _assert_one_line_error(proc, "mesh shape 'a,b' is not a comma-separated list of integers")


def test_init_from_garbage_weights_is_one_line(tmp_path, pairs):
    hf = tmp_path / "sft" / "hf"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text(json.dumps(hub.config_to_hf(gpt2.preset("tiny", vocab_size=320))))
    (hf / "model.safetensors").write_bytes(os.urandom(4096))
    proc = _cli(f"--config=tests/tiny_config.py:{pairs}", f"--workdir={tmp_path / 'run'}",
                f"--config.train.init_from={tmp_path / 'sft'}")
    _assert_one_line_error(proc, f"{hf / 'model.safetensors'}: not a readable safetensors file")


def test_evaluate_on_a_split_with_no_usable_pairs(tmp_path, tok, mesh1):
    model_dir = str(tmp_path / "model")
    hub.save_pretrained(gpt2.create(gpt2.preset("tiny", vocab_size=tok.vocab_size), seed=0, mesh=mesh1), model_dir)
    split = write_jsonl(str(tmp_path / "split.jsonl"), [{"prompt": "p", "chosen": "c"}, [1, 2]])
    proc = _cli(f"--model={model_dir}", "--data_source=jsonl", f"--data_path={split}", f"--out={tmp_path / 'out'}",
                module="launch.evaluate")
    _assert_one_line_error(proc, "gave no usable pairs; skipped: {'missing field': 1, 'wrong type': 1}")


# --- the run directory ----------------------------------------------------------------------------------

def test_workdir_whose_parent_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        config_lib.check_workdir(str(tmp_path / "file" / "a" / "run"))


def test_read_only_workdir(tmp_path, monkeypatch):
    """A workdir nobody may write in. Root ignores permission bits: there the refusal is simulated."""
    parent = tmp_path / "ro"
    parent.mkdir()
    os.chmod(parent, 0o555)
    if os.access(parent, os.W_OK):
        def refuse(path, *args, **kwargs):
            raise PermissionError(13, "Permission denied", path)
        monkeypatch.setattr(os, "makedirs", refuse)
    try:
        with pytest.raises(ConfigError, match=r"--workdir '.*run' is not writable \(Permission denied\)"):
            config_lib.check_workdir(str(parent / "run"))
    finally:
        os.chmod(parent, 0o755)


# --- one huge row (item 1 of the issue): capped before reading, cut before tokenizing -----------------------

def _file_with_a_huge_row(path, huge_bytes: int) -> str:
    huge = dict(GOOD, chosen="x" * huge_bytes)
    return write_jsonl(str(path), [GOOD, huge, GOOD, huge, GOOD])


def test_rows_over_max_row_bytes_are_skipped_and_counted_in_one_warning(tmp_path, caplog):
    path = _file_with_a_huge_row(tmp_path / "pairs.jsonl", 4 * MB)
    with caplog.at_level(logging.WARNING):
        source = jsonl.jsonl_source(path, max_row_bytes=MB)
    assert len(source) == 3 and source.bad.counts["row too large"] == 2
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [f"skipped 2 rows of {path} larger than data.max_row_bytes={MB} bytes (lines 2, 4)"]
    with pytest.raises(DataError, match=rf"{path}:2: row too large: \d+ bytes > data.max_row_bytes={MB}"):
        jsonl.jsonl_source(path, strict=True, max_row_bytes=MB)


def test_loading_memory_is_bounded_by_max_row_bytes(tmp_path):
    """An 8 MB row costs no more than the 64 KiB cap to index: only cap + 1 bytes of it are ever held."""
    path = _file_with_a_huge_row(tmp_path / "pairs.jsonl", 8 * MB)
    tracemalloc.start()
    try:
        source = jsonl.jsonl_source(path, max_row_bytes=64 * 1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(source) == 3 and peak < MB


def test_text_is_cut_by_characters_before_tokenizing(tok):
    """A 2 MB response is cut to max_length * MAX_CHARS_PER_TOKEN characters before the tokenizer sees it, and
    the tokens kept are those of the whole text."""
    seen = []

    class Recording:
        eos_id = pad_id = tok.eos_id

        def encode(self, text):
            seen.append(len(text))
            return tok.encode(text)

    cfg = pipeline.TokenizeConfig(max_length=32, max_prompt_length=16)
    pair = Pair("Tell me about stars.", "bright clear kind " * 110_000, "dull")
    out = pipeline.Tokenize(Recording(), cfg, "pairs").map((0, pair))
    assert max(seen) <= 32 * pipeline.MAX_CHARS_PER_TOKEN
    short = Pair(pair.prompt, pair.chosen[:5000], pair.rejected)
    expected = pipeline.Tokenize(tok, cfg, "pairs").map((0, short))
    np.testing.assert_array_equal(out["input_ids"][0], expected["input_ids"][0])


def test_imdb_csv_field_over_max_row_bytes_is_skipped(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text('text,label\n"a fine film",1\n"' + "y" * (2 * MB) + '",0\n"a poor film",0\n')
    reviews, bad = imdb.from_csv(str(path))
    assert [r.text for r in reviews] == ["a fine film", "a poor film"] and bad.counts["row too large"] == 1


# --- no held-out split (item 3) and the bundled data's cache (item 4) ---------------------------------------

def test_eval_fraction_zero_trains_without_held_out_evaluation(tmp_path, pairs):
    c = get_config(pairs)
    c.data.eval_fraction = 0
    c.train.update(steps=2, export_hf=False)
    trainer = Trainer(c, str(tmp_path / "run"))
    assert len(trainer.train_source) == 240 and len(trainer.eval_source) == 0
    report = trainer.run()
    assert report["steps"] == 2 and report["eval_before"] == {} and report["eval_after"] == {}
    assert all(set(row) != {"step"} for row in read_metrics(str(tmp_path / "run")))  # no empty evaluation rows


def test_an_empty_evaluation_writes_no_metrics_row(tmp_path):
    writer = MetricsWriter(str(tmp_path), resume_step=0, enabled=True)
    writer.write(0, {}, "eval/")
    writer.write(1, {"loss": 0.5})
    writer.close()
    assert read_metrics(str(tmp_path)) == [{"step": 1, "loss": 0.5}]


def test_bundled_tutor_data_is_unpacked_once_into_the_cache_dir(tmp_path):
    c = config_lib.default_config()
    c.tokenizer.spec = "gpt2"
    data_lib.load_data(c, str(tmp_path / "run"))  # data.cache_dir = "": <workdir>/cache
    cache = tmp_path / "run" / "cache"
    (copy,) = [p for p in cache.iterdir() if not p.name.endswith(".source")]
    first = copy.stat().st_mtime_ns
    data_lib.load_data(c, str(tmp_path / "run"))
    c.data.cache_dir = str(cache)
    data_lib.load_data(c, str(tmp_path / "again"))
    assert sorted(p.name for p in cache.iterdir()) == [copy.name, copy.name + ".source"]
    assert copy.stat().st_mtime_ns == first  # reused, not unpacked again
    assert not (tmp_path / "again" / "cache").exists()  # the config's cache_dir, not the workdir's


# --- ConvexReLUClassifier (item 5) ------------------------------------------------------------------------

def _fitted():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 3))
    return ConvexReLUClassifier(num_gates=4, max_iter=20).fit(X, (X[:, 0] > 0).astype(int)), X


@pytest.mark.parametrize("call, error, message", [
    (lambda X, y: ConvexReLUClassifier().fit(np.zeros((0, 3)), np.zeros(0)), DataError,
     r"X has shape \(0, 3\): it needs at least one sample and one feature"),
    (lambda X, y: ConvexReLUClassifier(num_gates=0).fit(X, y), ConfigError,
     "num_gates must be a positive integer, got 0"),
    (lambda X, y: ConvexReLUClassifier(num_gates=-3).fit(X, y), ConfigError, "got -3"),
    (lambda X, y: ConvexReLUClassifier(num_gates=2.5).fit(X, y), ConfigError, "got 2.5"),
    (lambda X, y: ConvexReLUClassifier().fit("some text", y), DataError, "X must hold real numbers, got an array of "
                                                                         "dtype <U9"),
    (lambda X, y: ConvexReLUClassifier().predict(X), ConfigError, "not fitted yet: call fit"),
    (lambda X, y: ConvexReLUClassifier().objective(), ConfigError, "not fitted yet: call fit"),
    (lambda X, y: _fitted()[0].predict(X[:, :2]), DataError, "X has 2 features; the classifier was fitted on 3"),
], ids=["empty-X", "no-gates", "negative-gates", "fractional-gates", "string-X", "predict-before-fit",
        "objective-before-fit", "wrong-features"])
def test_classifier_bad_arguments(call, error, message):
    _, X = _fitted()
    with pytest.raises(error, match=message) as caught:
        call(X, (X[:, 0] > 0).astype(int))
    assert isinstance(caught.value, ValueError) and "\n" not in str(caught.value)


# --- config values, checked before any work ---------------------------------------------------------------

@pytest.mark.parametrize("changes, message", [
    ({"data.max_row_bytes": 0}, "data.max_row_bytes must be positive, got 0"),
    ({"data.workers": -1}, "data.workers must be >= 0, got -1"),
    ({"data.eval_fraction": 1.0}, r"data.eval_fraction must be in \[0, 1\), got 1.0"),
    ({"data.source": "csv"}, "data.source='csv' is not one of tutor, shp, imdb, hh, jsonl"),
    ({"train.learnig_rate": 1e-3}, "unknown config key train.learnig_rate; did you mean train.learning_rate?"),
    ({"model.overrides.vocab_size": 10}, "unknown config key model.overrides.vocab_size; model.overrides has "),
    ({"optimiser": "adamw"}, "unknown config key optimiser; the config has anchor, data, loss, mesh"),
    ({"train.learning_rate": float("nan")}, "train.learning_rate is NaN; it needs a number"),
    ({"train.method": "dpo_convex", "signal.gamma": float("nan")}, "signal.gamma is NaN; it needs a number"),
    ({"train.max_abs_loss": 0.0}, "train.max_abs_loss must be positive, got 0.0"),
], ids=["row-cap", "workers", "eval-fraction-1", "source", "field-typo", "override-field", "top-level-typo",
        "nan-learning-rate", "nan-signal-gamma", "guard-bound-zero"])
def test_impossible_config_values(tiny, changes, message):
    for key, value in changes.items():
        *sections, field = key.split(".")
        node = tiny
        for section in sections:
            node = node[section]
        node[field] = value
    with pytest.raises(ConfigError, match=message):
        config_lib.validate(tiny)


# --- data files ------------------------------------------------------------------------------------------

def _load(c, tmp_path):
    return data_lib.load_data(c, str(tmp_path / "run"))


@pytest.mark.parametrize("content, error, message", [
    (b"", DataError, "gave no usable training examples"),
    (b"[1, 2]\n\"a string\"\n", DataError, "gave no usable training examples"),
    (b'{"prompt": "p", "chosen": "", "rejected": ""}\n', DataError, "gave no usable training examples"),
    (b'{"prompt": "p\xff\xfe", "chosen": "c", "rejected": "r"}\n', DataError, "gave no usable training examples"),
    (b"\x89PNG\r\n\x1a\n\x00\x00binary", DataError, "gave no usable training examples"),
], ids=["empty-file", "rows-not-objects", "empty-strings", "not-utf8", "binary-file"])
def test_data_file_with_no_usable_rows(tmp_path, tiny, content, error, message):
    (tmp_path / "pairs.jsonl").write_bytes(content)
    tiny.data.path = str(tmp_path / "pairs.jsonl")
    with pytest.raises(error, match=re.escape(f"data.path='{tiny.data.path}' (data.source=jsonl) {message}")):
        _load(tiny, tmp_path)


@pytest.mark.parametrize("line, reason", [
    ('{"prompt": "p", "cho', "Unterminated string starting at column 17"),
    ('{"prompt": "p", "chosen": ', "Expecting value at column 27"),
    ('{"prompt": "p"} x', "Extra data at column 17"),
], ids=["cut-in-a-string", "cut-after-a-key", "extra-data"])
def test_broken_json_row_is_named_by_file_line_and_column(tmp_path, line, reason):
    """json's own messages end in "at" and expect the position after them."""
    path = write_jsonl(str(tmp_path / "pairs.jsonl"), [GOOD, line])
    with pytest.raises(DataError, match=f"pairs.jsonl:2: broken JSON: {reason}$"):
        jsonl.jsonl_source(path, strict=True)


def test_missing_chosen_is_named_by_file_and_line_in_strict_mode(tmp_path, tiny):
    tiny.data.update(path=write_jsonl(str(tmp_path / "pairs.jsonl"), [GOOD, {"prompt": "p", "rejected": "r"}]),
                     strict=True)
    with pytest.raises(DataError, match=r"pairs.jsonl:2: missing field: 'chosen'"):
        _load(tiny, tmp_path)


@pytest.mark.parametrize("setup, error, message", [
    (lambda d: {"data.max_prompt_length": 64}, ConfigError, r"need 0 < max_prompt_length \(64\) < max_length \(32\)"),
    (lambda d: {"data.truncation": "middle"}, ConfigError, "truncation 'middle' is not one of keep_end, keep_start"),
    (lambda d: {"data.buckets": (0, 16)}, ConfigError, r"length buckets \(0, 16\) must lie in \(0, max_length=32\]"),
    (lambda d: {"data.path": str(d)}, MissingFileError, "is not a file"),
    (lambda d: {"data.path": ""}, ConfigError, "data.path is required for data.source='jsonl'"),
    (lambda d: {"data.path": str(d / "no.jsonl")}, MissingFileError, "no.jsonl' does not exist"),
    (lambda d: {"data.path": _write(d / "x.jsonl.gz", b"not gzip at all")}, DataError, "cannot decompress"),
    (lambda d: {"data.path": _write(d / "x.jsonl.gz", gzip.compress(b'{"prompt": "p"}\n' * 100)[:40])}, DataError,
     "cannot decompress"),
    (lambda d: {"data.eval_path": _write(d / "eval.jsonl", b"[1]\n")}, DataError,
     "data.eval_path='.*eval.jsonl' \\(data.source=jsonl\\) gave no usable examples"),
    (lambda d: {"data.source": "tutor", "data.path": _write(d / "c.jsonl", b'{"a": 1}\n')}, DataError,
     "gave no usable training examples"),
    (lambda d: {"data.source": "imdb", "data.path": _write(d / "r.csv", b"review,sentiment\nfine,1\n")}, DataError,
     "CSV lacks column\\(s\\) label, text \\(it has review, sentiment\\); IMDb needs text and label"),
    (lambda d: {"data.source": "imdb", "data.path": _write(d / "r.csv", b"text,label\nfine,1\nbad \xff byte,0\n")},
     DataError, r"r.csv:3: not UTF-8 \(invalid start byte\)$"),
    (lambda d: {"data.source": "imdb", "data.path": _write(d / "r.csv", b"text,label\ngood,1\nfine,pos\n")},
     ConfigError, "IMDb labeled pairs need both positive and negative reviews"),
], ids=["prompt-longer-than-max", "truncation", "bucket", "path-is-a-directory", "no-path", "missing-file", "not-gzip",
        "truncated-gzip", "empty-eval-file", "tutor-without-conversations", "imdb-wrong-columns", "imdb-not-utf8",
        "imdb-one-label"])
def test_bad_data_settings(tmp_path, tiny, setup, error, message):
    for key, value in setup(tmp_path).items():
        section, field = key.split(".")
        tiny[section][field] = value
    with pytest.raises(error, match=message):
        _load(tiny, tmp_path)


def test_checkpoints_path_that_is_a_file_is_refused_before_anything_is_written(tmp_path):
    """Orbax saw no checkpoint in a file, so the run started over (its metrics file emptied) until the first save."""
    (tmp_path / "checkpoints").write_text("x")
    with pytest.raises(CheckpointError, match="checkpoints is a file, not a directory of checkpoints; move it away$"):
        Checkpointer(str(tmp_path / "checkpoints"), keep=2)


def test_init_from_a_file(tmp_path):
    with pytest.raises(MissingFileError, match="train.init_from='.*a_file' is not a run's directory"):
        data_lib.init_from_dir(_write(tmp_path / "a_file", b"x"))


def _write(path, content: bytes) -> str:
    path.write_bytes(content)
    return str(path)


# --- model directories ------------------------------------------------------------------------------------

def _model_dir(tmp_path, config, weights: bytes | None = b"") -> str:
    (tmp_path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if weights is not None:
        (tmp_path / "model.safetensors").write_bytes(weights)
    return str(tmp_path)


TINY_HF = hub.config_to_hf(gpt2.preset("tiny", vocab_size=320))


@pytest.mark.parametrize("config, weights, index, error, message", [
    (TINY_HF, os.urandom(2048), None, CheckpointError, "model.safetensors: not a readable safetensors file"),
    (TINY_HF, b"", None, CheckpointError, "not a readable safetensors file .*header too small"),
    ("[1, 2]", b"", None, ConfigError, "config.json: holds a JSON list, not an object of GPT-2 settings"),
    ('{"model_type": "gpt2", "n_layer": "two"}', b"", None, ConfigError,
     "config.json: n_layer is 'two', not an integer"),
    ("{not json", b"", None, ConfigError, "config.json: not valid JSON"),
    (TINY_HF, None, '{"metadata": {}}', ConfigError, "has no 'weight_map' object of tensor name -> file name"),
    (TINY_HF, None, "[]", ConfigError, "has no 'weight_map' object"),
], ids=["garbage-weights", "empty-weights", "config-is-a-list", "config-field-type", "config-not-json",
        "index-without-weight-map", "index-is-a-list"])
def test_bad_model_directory(tmp_path, config, weights, index, error, message):
    directory = _model_dir(tmp_path, config, weights)
    if index is not None:
        (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(error, match=message):
        hub.load_pretrained(directory)


# --- sequence lengths and the model's positions ------------------------------------------------------------

def test_max_length_longer_than_the_models_positions_is_refused(tmp_path, pairs):
    """JAX clamps the position lookup: a longer sequence would train on wrong positions, silently."""
    c = get_config(pairs)
    c.data.max_length = 256  # the tiny preset has 128 positions
    with pytest.raises(ConfigError, match=r"^data.max_length=256 is longer than the model's n_positions=128: "):
        Trainer(c, str(tmp_path / "run"))


def test_evaluate_caps_max_length_to_the_models_positions(tmp_path, tok, mesh1):
    """The default --max_length=512 on a 128-position model: one warning, then the capped lengths (the
    README evaluates the 256-position quickstart model with the defaults)."""
    model_dir = str(tmp_path / "model")
    hub.save_pretrained(gpt2.create(gpt2.preset("tiny", vocab_size=tok.vocab_size), seed=0, mesh=mesh1), model_dir)
    split = write_jsonl(str(tmp_path / "split.jsonl"), [GOOD, dict(GOOD, prompt="Tell me about rivers.")])
    proc = _cli(f"--model={model_dir}", "--data_source=jsonl", f"--data_path={split}", f"--out={tmp_path / 'out'}",
                module="launch.evaluate")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "positions" in line]
    assert len(warnings) == 1 and warnings[0].endswith("--max_length=512 is longer than the model's 128 positions: "
                                                       "evaluating with --max_length=128 --max_prompt_length=64")
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["n_pairs"] == 2


# --- a data file changed after it was indexed, and a tutor file written as one JSON list --------------------

@pytest.mark.parametrize("second_line, message", [
    ('{"prompt": "Second.", "cho\n', "no longer parses (JSONDecodeError)"),
    ('{"prompt": "Second.", "rejected": "r"}\n', "is no longer usable (missing field: 'chosen')"),
    ("", "is past the end of the file"),
], ids=["broken-json", "field-gone", "truncated"])
def test_a_row_changed_after_indexing_is_named_by_file_and_line(tmp_path, second_line, message):
    path = write_jsonl(str(tmp_path / "pairs.jsonl"), [GOOD, dict(GOOD, prompt="Second."), GOOD])
    source = jsonl.jsonl_source(path)
    with open(path) as f:
        first = f.readline()
    with open(path, "w") as f:
        f.write(first + second_line)
    with pytest.raises(DataError, match=f"^{re.escape(path)}:2: the row indexed at this line {re.escape(message)}; "
                                        "the file changed after it was loaded$"):
        source[1]


def test_a_whole_file_json_list_is_bounded_by_max_row_bytes(tmp_path):
    """A JSON list is parsed whole: over 16 rows' worth of data.max_row_bytes it is refused (gzipped too,
    read no further than the bound), under it read as before."""
    conversations = [{"sample_id": k, "utterances": [["a", f"Hello {k}."], ["b", "Hi."], ["a", "Bye."]]}
                     for k in range(1000)]
    document = json.dumps(conversations).encode()
    for path in (_write(tmp_path / "c.json", document), _write(tmp_path / "c.json.gz", gzip.compress(document))):
        with pytest.raises(DataError, match=rf"^{re.escape(path)}: a JSON list is parsed whole and this one is over "
                                            r"16384 bytes \(16 x data.max_row_bytes=1024\); write one conversation "
                                            r"per line \(JSONL\)"):
            tutor.load_tutor_pairs(path, max_row_bytes=1024)
        assert len(tutor.load_tutor_pairs(path, max_row_bytes=MB).pairs) == 1000
