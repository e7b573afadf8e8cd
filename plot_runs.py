"""Plot one or more training runs from their log.txt into a single PNG.

    python plot_runs.py runs/20250101-120000                        # one run dir
    python plot_runs.py 20250101-120000 runs/other/log.txt --labels=baseline,ddp --smooth=0.9 --out=cmp.png

Four panels: train and val loss vs tokens seen, the same vs training time, learning rate vs step and
throughput (tok/s) vs step. Runs are overlaid, one colour per run.

The logs are read by runlog.py, the project's one log parser (keys a later script adds are ignored, lines that
are not run output are skipped). A missing folder in --out is created.
"""
import argparse
import math
import os
import sys

import runlog


def find_log(run, runs_dir="runs"):
    """A run dir, a log file, or a run name under runs_dir -> the path of its log.txt."""
    for path in (run, os.path.join(run, "log.txt"), os.path.join(runs_dir, run, "log.txt")):
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"no log for {run!r}: pass a run directory holding log.txt, a log.txt path, or a run name under {runs_dir}/")


def run_label(log_path):
    """runs/20250101-120000/log.txt -> '20250101-120000' (a log with another name: its file name)."""
    if os.path.basename(log_path) == "log.txt":
        return os.path.basename(os.path.dirname(os.path.abspath(log_path)))
    return os.path.splitext(os.path.basename(log_path))[0]


def ema(values, beta):
    """Exponential moving average with bias correction (the first values are not pulled toward 0);
    beta=0 returns the values unchanged. nan values are passed through and do not enter the average."""
    if beta == 0:
        return list(values)
    smoothed, average, weight = [], 0.0, 0.0
    for value in values:
        if math.isnan(value):
            smoothed.append(value)
            continue
        average = beta * average + (1 - beta) * value
        weight = beta * weight + (1 - beta)
        smoothed.append(average / weight)
    return smoothed


def plot(runs, out, smooth=0.0):
    """Draw runs ([(label, runlog.parse_log result), ...]) into one PNG at `out`; returns the matplotlib figure."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    # train_time is logged in ms. Minutes once any run trained for more than a few minutes, else seconds, so the
    # axis stays readable.
    longest = max((t for _, log in runs for t in runlog.column(log["train"], "train_time") if not math.isnan(t)),
                  default=0.0) / 1000
    time_unit, ms_per_unit = ("min", 60e3) if longest > 180 else ("s", 1e3)

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    by_tokens, by_time, lr_axis, speed_axis = axes.flat
    for index, (label, log) in enumerate(runs):
        color = f"C{index % 10}"
        train, val = log["train"], log["val"]
        steps = [row["step"] for row in train]
        loss = ema(runlog.column(train, "loss"), smooth)
        times = [t / ms_per_unit for t in runlog.column(train, "train_time")]
        by_tokens.plot(runlog.column(train, "tokens"), loss, color=color, linewidth=1, label=label)
        by_time.plot(times, loss, color=color, linewidth=1, label=label)
        if val:
            val_loss = runlog.column(val, "val_loss")
            by_tokens.plot(runlog.column(val, "tokens"), val_loss, color=color, linestyle="--", marker="o",
                           markersize=3)
            by_time.plot([t / ms_per_unit for t in runlog.column(val, "train_time")], val_loss,
                         color=color, linestyle="--", marker="o", markersize=3)
        lr_axis.plot(steps, runlog.column(train, "lr"), color=color, label=label)
        speed_axis.plot(steps, runlog.column(train, "tok/s"), color=color, label=label)

    smoothed = f" (EMA {smooth})" if smooth else ""
    by_tokens.set(title=f"loss vs tokens (solid: train{smoothed}; dashed o: val)", xlabel="tokens", ylabel="loss")
    by_time.set(title="loss vs training time (validation excluded)", xlabel=f"train_time ({time_unit})",
                ylabel="loss")
    lr_axis.set(title="learning rate", xlabel="step", ylabel="lr")
    speed_axis.set(title="throughput (step 1 includes compile time when on)", xlabel="step", ylabel="tok/s")
    for axis in axes.flat:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)  # --out=plots/cmp.png: the folder is made, not an error
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return fig


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories, log.txt paths or run names under --runs-dir")
    parser.add_argument("--runs-dir", default="runs", help="where run names are looked up (default: runs)")
    parser.add_argument("--labels", default="", help="comma-separated legend labels, one per run (default: run names)")
    parser.add_argument("--out", default="runs_plot.png", help="PNG to write (default: runs_plot.png); a missing "
                        "folder is created")
    parser.add_argument("--smooth", type=float, default=0.0,
                        help="EMA coefficient for the train loss in [0, 1), e.g. 0.9 (default: 0 = raw)")
    args = parser.parse_args(argv)

    if not 0 <= args.smooth < 1:
        sys.exit(f"error: --smooth={args.smooth} must be in [0, 1) (0 = off, 0.9 = strong smoothing)")
    labels = args.labels.split(",") if args.labels else []
    if labels and len(labels) != len(args.runs):
        sys.exit(f"error: --labels has {len(labels)} labels for {len(args.runs)} runs: give one per run")
    runs = []
    for index, run in enumerate(args.runs):
        try:
            path = find_log(run, args.runs_dir)
        except FileNotFoundError as e:
            sys.exit(f"error: {e}")
        log = runlog.parse_log(path)
        if not log["train"]:
            sys.exit(f"error: {path} has no train lines (step:N/M loss:...): is it a run's log.txt?")
        runs.append((labels[index] if labels else run_label(path), log))
    plot(runs, args.out, args.smooth)
    print(f"wrote {args.out} ({len(runs)} run{'s' if len(runs) > 1 else ''})")
    return args.out


if __name__ == "__main__":
    main()
