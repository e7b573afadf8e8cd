"""plot_runs.py: the plot is a real PNG from real and synthetic runs (the logs are read by runlog.py, tested in
test_runlog.py)."""
import os
import sys

import pytest

from conftest import REPO, TINY, load_script, script_number, scripts_from, tiny_args

sys.path.insert(0, REPO)
import plot_runs  # noqa: E402  (a repo-root tool, not a package)
import runlog  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A log as the conventions define it, plus lines the parser must skip (a traceback, a key it does not know).
SYNTHETIC_LOG = """\
script:04-add-validation.py
run_dir:runs/with-val
device:cuda:0 gpu:NVIDIA H100 80GB HBM3 torch:2.11.0+cu130 world_size:1
model_params:1234 grad_accum_steps:1 tokens_per_step:128
step:1/4 loss:10.000000 lr:1.0000e-03 grad_norm:1.5000 dt:100.0ms tok/s:1280 tokens:128 train_time:100ms
step:2/4 loss:8.000000 lr:8.0000e-04 grad_norm:1.2000 dt:50.0ms tok/s:2560 tokens:256 train_time:150ms
step:2/4 val_loss:8.500000 val_ppl:4914.77 tokens:256 train_time:150ms
Traceback (most recent call last): not run output
step:3/4 loss:7.000000 lr:5.0000e-04 grad_norm:1.1000 dt:50.0ms tok/s:2560 tokens:384 train_time:200ms new_key:42
step:4/4 loss:6.000000 lr:2.0000e-04 grad_norm:1.0000 dt:50.0ms tok/s:2560 tokens:512 train_time:250ms
step:4/4 val_loss:6.500000 val_ppl:665.14 tokens:512 train_time:250ms
step:4/4 hellaswag_acc:0.2500 hellaswag_correct:25 hellaswag_total:100
done steps:4 tokens:512 train_time:250ms peak_mem:0MiB
"""

# A run before validation existed (01-03): train lines only.
NO_VAL_LOG = """\
script:01-gpt2-baseline.py
device:cpu gpu:none torch:2.13.0+cpu world_size:1
step:1/3 loss:11.000000 lr:1.0000e-03 grad_norm:2.0000 dt:200.0ms tok/s:640 tokens:128 train_time:200ms
step:2/3 loss:9.000000 lr:6.0000e-04 grad_norm:1.5000 dt:100.0ms tok/s:1280 tokens:256 train_time:300ms
step:3/3 loss:7.500000 lr:1.0000e-04 grad_norm:1.2000 dt:100.0ms tok/s:1280 tokens:384 train_time:400ms
done steps:3 tokens:384 train_time:400ms peak_mem:0MiB
"""


def write_run(root, name, log):
    run_dir = os.path.join(root, name)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "log.txt"), "w") as f:
        f.write(log)
    return run_dir


def test_ema_is_bias_corrected_and_zero_is_off():
    assert plot_runs.ema([1.0, 2.0, 3.0], 0) == [1.0, 2.0, 3.0]
    # beta 0.5: averages 0.5, 1.25 over weights 0.5, 0.75 -> 1, 5/3
    assert plot_runs.ema([1.0, 2.0], 0.5) == pytest.approx([1.0, 5 / 3])


def test_two_synthetic_runs_overlaid_with_labels_and_smoothing(tmp_path, monkeypatch):
    with_val = write_run(tmp_path, "with-val", SYNTHETIC_LOG)
    no_val = os.path.join(write_run(tmp_path, "no-val", NO_VAL_LOG), "log.txt")  # a log path works too
    figures = []
    real_plot = plot_runs.plot
    monkeypatch.setattr(plot_runs, "plot", lambda *a, **k: figures.append(real_plot(*a, **k)) or figures[-1])
    out = tmp_path / "cmp.png"
    plot_runs.main([with_val, no_val, "--labels=baseline,old", "--smooth=0.5", f"--out={out}"])

    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 10_000
    by_tokens = figures[0].axes[0]
    assert [t.get_text() for t in by_tokens.get_legend().get_texts()] == ["baseline", "old"]
    # The train curve is the EMA of the loss (the --smooth option is used), the val curve the raw val loss.
    train_line, val_line = by_tokens.lines[0], by_tokens.lines[1]
    assert list(train_line.get_ydata()) == pytest.approx(plot_runs.ema([10.0, 8.0, 7.0, 6.0], 0.5))
    assert list(val_line.get_xdata()) == [256, 512] and list(val_line.get_ydata()) == [8.5, 6.5]
    assert len(by_tokens.lines) == 3  # the no-val run adds its train curve only


def test_default_labels_are_run_names_and_names_resolve_under_runs_dir(tmp_path, monkeypatch):
    runs_dir = tmp_path / "runs"
    write_run(runs_dir, "20250101-120000", NO_VAL_LOG)
    seen = []
    monkeypatch.setattr(plot_runs, "plot", lambda runs, out, smooth: seen.extend(label for label, _ in runs))
    plot_runs.main(["20250101-120000", f"--runs-dir={runs_dir}", f"--out={tmp_path / 'x.png'}"])
    assert seen == ["20250101-120000"]


@pytest.mark.parametrize("argv, message", [
    (["{tmp}/nowhere"], "no log for"),
    (["{tmp}/empty"], "no log for"),
    (["{tmp}/not-a-log.txt"], "has no train lines"),
    (["{tmp}/with-val", "--labels=a,b"], "--labels has 2 labels for 1 runs"),
    (["{tmp}/with-val", "--smooth=1.5"], "--smooth=1.5"),
])
def test_bad_input_is_a_clear_error(tmp_path, argv, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "not-a-log.txt").write_text("hello\n")
    write_run(tmp_path, "with-val", SYNTHETIC_LOG)
    with pytest.raises(SystemExit) as exit_info:
        plot_runs.main([arg.format(tmp=tmp_path) for arg in argv] + [f"--out={tmp_path / 'x.png'}"])
    assert message in str(exit_info.value.code) and str(exit_info.value.code).startswith("error: ")
    assert not (tmp_path / "x.png").exists()


def test_out_in_a_missing_folder_is_created(tmp_path, capsys):
    run_dir = write_run(tmp_path, "with-val", SYNTHETIC_LOG)
    out = tmp_path / "plots" / "today" / "cmp.png"
    plot_runs.main([run_dir, f"--out={out}"])
    assert out.read_bytes()[:8] == PNG_MAGIC and f"wrote {out}" in capsys.readouterr().out


# The real thing: tiny CPU runs of the baseline (01) and of the first script with validation (04), once they exist
# (the parameter list is built at collection time, so a real-run case is there exactly when its script is).
@pytest.mark.parametrize("source", ["synthetic"] + scripts_from(1, 1) + scripts_from(4, 4))
def test_plot_from_a_run_log(source, tmp_path, shakespeare):
    if source == "synthetic":
        run_dir, steps, tokens_per_step = write_run(tmp_path, "with-val", SYNTHETIC_LOG), 4, 128
    else:
        result = load_script(source).main(tiny_args(source, shakespeare, str(tmp_path / "runs"), run_name="tiny"))
        run_dir, steps, tokens_per_step = result["run_dir"], TINY["max_steps"], TINY["total_batch_size"]
    log = runlog.parse_log(os.path.join(run_dir, "log.txt"))
    train, val = log["train"], log["val"]
    assert [row["step"] for row in train] == list(range(1, steps + 1))
    assert [row["tokens"] for row in train] == [tokens_per_step * row["step"] for row in train]
    times = [row["train_time"] for row in train]
    assert all(row["loss"] > 0 for row in train) and times == sorted(times)
    if source == "synthetic" or script_number(source) >= 4:  # validation exists from 04 (at least at the end)
        assert val and val[-1]["step"] == steps and val[-1]["tokens"] == train[-1]["tokens"]
        assert all(row["val_loss"] > 0 for row in val)
    out = tmp_path / "plot.png"
    plot_runs.main([run_dir, f"--out={out}"])
    assert out.read_bytes()[:8] == PNG_MAGIC
