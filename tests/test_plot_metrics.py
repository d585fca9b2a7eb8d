"""tools/plot_metrics.py on SYNTHETIC metrics.jsonl files (made-up values of known formulas, not a real run):
the PNG the command line writes, the panels and lines of the figure, the cut last line, the one-line errors."""

import importlib.util
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "plot_metrics.py")
TRAIN_STEPS = range(1, 9)
EVAL_STEPS = (0, 4, 8)
OFFSETS = {"synthetic_alpha": 0.0, "synthetic_beta": 0.3}  # run name -> shift of its loss curve


def _load_tool():
    spec = importlib.util.spec_from_file_location("plot_metrics", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


pm = _load_tool()


def train_loss(step, offset):
    return 1.0 - 0.05 * step + offset


def eval_accuracy(step):
    return 0.6 + 0.01 * step


def synthetic_rows(name: str) -> list[dict]:
    """Training rows with the DPO names (plus non-default ones), held-out rows with interval families (an
    accuracy, shown by default, and a margin, not); only the alpha run logs a KL, so its panel must still appear."""
    offset, rows = OFFSETS[name], []
    for step in range(0, 9):
        if step in EVAL_STEPS:
            acc = eval_accuracy(step)
            rows.append({"step": step, "eval/loss": train_loss(step, offset) + 0.1, "eval/accuracy/raw/mean": acc,
                         "eval/accuracy/raw/lo": acc - 0.1, "eval/accuracy/raw/hi": acc + 0.1,
                         "eval/margin/raw/mean": 0.2, "eval/margin/raw/lo": 0.1, "eval/margin/raw/hi": 0.3,
                         "eval/n_pairs": 64})
        if step in TRAIN_STEPS:
            row = {"step": step, "loss": train_loss(step, offset), "rewards/accuracies": 0.5 + 0.05 * step,
                   "grad_norm": 1.0, "lr": 1e-4, "time/step_s": 0.2}
            if name == "synthetic_alpha":
                row["kl"] = 0.01 * step
            rows.append(row)
    return rows


@pytest.fixture
def runs_dir(tmp_path):
    """Two synthetic run directories, named after their run, each with a metrics.jsonl."""
    for name in OFFSETS:
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in synthetic_rows(name))
    return tmp_path


def run_dirs(root) -> list[str]:
    return [str(root / name) for name in OFFSETS]


def run_tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=120)


def png_size(path) -> tuple[int, int]:
    """Width and height from the PNG header (signature, then the IHDR chunk)."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def lines_by_label(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines()}


def test_command_line_writes_a_png_of_the_figure_size(runs_dir, tmp_path):
    out = tmp_path / "plots" / "curves.png"
    result = run_tool(*run_dirs(runs_dir), f"--out={out}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    # 4 default panels (loss, rewards/accuracies, kl, accuracy/raw): 3 columns, 2 rows, plus the legend strip
    width, height = pm.PANEL_W * 3 * pm.DPI, (pm.PANEL_H * 2 + pm.LEGEND_H) * pm.DPI
    assert png_size(out) == (round(width), round(height)) == (1500, 770)


def test_default_panels_are_the_preference_metrics_present_in_any_run(runs_dir):
    runs = pm.load_runs(run_dirs(runs_dir))
    assert [run.name for run in runs] == list(OFFSETS)
    assert pm.select_metrics(runs) == ["loss", "rewards/accuracies", "kl", "accuracy/raw"]
    assert pm.select_metrics(runs, ["eval/loss", "grad_norm", "accuracy/raw/mean", "margin/raw"]) == [
        "loss", "grad_norm", "accuracy/raw", "margin/raw"]


def test_figure_has_one_panel_per_metric_and_one_line_per_run(runs_dir):
    runs = pm.load_runs(run_dirs(runs_dir))
    metrics = pm.select_metrics(runs)
    fig = pm.plot_runs(runs, metrics)
    assert [ax.get_title() for ax in fig.axes] == metrics
    loss, rewards, kl, accuracy = fig.axes
    for name, offset in OFFSETS.items():
        train, held_out = lines_by_label(loss)[f"{name} train"], lines_by_label(loss)[f"{name} eval"]
        np.testing.assert_allclose(train.get_xdata(), TRAIN_STEPS)
        np.testing.assert_allclose(train.get_ydata(), [train_loss(s, offset) for s in TRAIN_STEPS])
        assert train.get_linestyle() == "-" and train.get_marker() in ("None", None, "")
        np.testing.assert_allclose(held_out.get_xdata(), EVAL_STEPS)
        np.testing.assert_allclose(held_out.get_ydata(), [train_loss(s, offset) + 0.1 for s in EVAL_STEPS])
        assert held_out.get_linestyle() == "--" and held_out.get_marker() == "o"
        assert train.get_color() == held_out.get_color()
    assert lines_by_label(loss)["synthetic_alpha train"].get_color() != lines_by_label(loss)[
        "synthetic_beta train"].get_color()
    assert sorted(lines_by_label(rewards)) == ["synthetic_alpha train", "synthetic_beta train"]
    assert sorted(lines_by_label(kl)) == ["synthetic_alpha train"]  # beta logs no KL
    assert sorted(lines_by_label(accuracy)) == ["synthetic_alpha eval", "synthetic_beta eval"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [*OFFSETS, "train", "held-out eval"]


def test_interval_family_is_drawn_as_a_band_around_the_mean(runs_dir):
    runs = pm.load_runs(run_dirs(runs_dir))
    (ax,) = pm.plot_runs(runs, ["accuracy/raw"]).axes
    bands = {band.get_label(): band for band in ax.collections}
    assert sorted(bands) == ["synthetic_alpha eval interval", "synthetic_beta eval interval"]
    np.testing.assert_allclose(lines_by_label(ax)["synthetic_alpha eval"].get_ydata(),
                               [eval_accuracy(s) for s in EVAL_STEPS])
    y = bands["synthetic_alpha eval interval"].get_paths()[0].vertices[:, 1]
    assert y.min() == pytest.approx(eval_accuracy(0) - 0.1) and y.max() == pytest.approx(eval_accuracy(8) + 0.1)


def test_smoothing_is_a_trailing_moving_average_of_training_curves_only(runs_dir):
    runs = pm.load_runs(run_dirs(runs_dir))
    (ax,) = pm.plot_runs(runs, ["loss"], smooth_k=3).axes
    raw = np.asarray([train_loss(s, 0.0) for s in TRAIN_STEPS])
    expected = [raw[max(0, i - 2): i + 1].mean() for i in range(len(raw))]
    np.testing.assert_allclose(lines_by_label(ax)["synthetic_alpha train"].get_ydata(), expected)
    np.testing.assert_allclose(lines_by_label(ax)["synthetic_alpha eval"].get_ydata(),
                               [train_loss(s, 0.0) + 0.1 for s in EVAL_STEPS])


def test_sft_heldout_nll_is_drawn_on_the_loss_panel(tmp_path):
    os.makedirs(tmp_path / "synthetic_sft")
    rows = [{"step": 0, "eval/nll": 3.0, "eval/tokens": 100.0}, {"step": 1, "loss": 2.9, "tokens": 50.0},
            {"step": 2, "loss": 2.7, "tokens": 50.0}, {"step": 2, "eval/nll": 2.8, "eval/tokens": 100.0}]
    (tmp_path / "synthetic_sft" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = pm.load_runs([str(tmp_path / "synthetic_sft")])
    assert pm.select_metrics(runs) == ["loss"]
    (ax,) = pm.plot_runs(runs, ["loss"]).axes
    assert ax.get_title() == "loss (eval: nll)"
    np.testing.assert_allclose(lines_by_label(ax)["synthetic_sft eval"].get_ydata(), [3.0, 2.8])


def test_a_last_line_cut_by_a_kill_is_skipped_with_a_one_line_warning(runs_dir, tmp_path, capsys):
    path = runs_dir / "synthetic_beta" / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 9, "loss": 0.5')
    (beta,) = pm.load_runs([str(runs_dir / "synthetic_beta")])
    assert beta.rows == synthetic_rows("synthetic_beta")
    assert capsys.readouterr().err.count("\n") == 1
    out = tmp_path / "cut.png"
    result = run_tool(*run_dirs(runs_dir), f"--out={out}")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [f"warning: {path}:{len(beta.rows) + 1}: skipped the unparseable last line "
                                          "(cut by a kill?)"]
    png_size(out)


def test_a_damaged_line_before_the_last_is_an_error(runs_dir):
    path = runs_dir / "synthetic_alpha" / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.\n' + path.read_text())
    with pytest.raises(pm.PlotError, match="metrics.jsonl:1: not a JSON object"):
        pm.load_runs([str(runs_dir / "synthetic_alpha")])


def test_no_metric_to_plot_names_the_runs(tmp_path):
    os.makedirs(tmp_path / "synthetic_empty")
    (tmp_path / "synthetic_empty" / "metrics.jsonl").write_text('{"step": 1, "grad_norm": 1.0}\n')
    with pytest.raises(pm.PlotError, match="no metric to plot in .*synthetic_empty"):
        pm.select_metrics(pm.load_runs([str(tmp_path / "synthetic_empty")]))


@pytest.mark.parametrize("case", ["missing run dir", "unknown metric"])
def test_errors_are_one_line_and_exit_status_2(runs_dir, tmp_path, case):
    missing = str(tmp_path / "no_such_run")
    args, named = {"missing run dir": ([run_dirs(runs_dir)[0], missing], missing),
                   "unknown metric": ([*run_dirs(runs_dir), "--metrics=loss,no_such_metric"], "no_such_metric")}[case]
    result = run_tool(*args, f"--out={tmp_path / 'never.png'}")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and named in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "never.png").exists()
