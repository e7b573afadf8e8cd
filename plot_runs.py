"""Plot one or more training runs from their log.txt into a single PNG.

    python plot_runs.py runs/20250101-120000                        # one run dir
    python plot_runs.py 20250101-120000 runs/other/log.txt --labels=baseline,ddp --smooth=0.9 --out=cmp.png

Four panels: train and val loss vs tokens seen, the same vs training time, learning rate vs step and
throughput (tok/s) vs step. Runs are overlaid, one colour per run.

The log format (see the run-directory conventions) is a line of space-separated key:value pairs, e.g.
    step:12/50 loss:6.123456 lr:5.9000e-04 grad_norm:1.2345 dt:123.4ms tok/s:12345 tokens:6291456 train_time:1234ms
Lines are read by key, so keys added by later scripts are ignored, and lines that are not run output (the
script's own source, tracebacks) are skipped. `parse_log` is the one log parser of the project's tools:
push_to_hub.py uses it too.
"""
import argparse
import math
import os
import re
import sys

# A key is a name, optionally with a "/" (tok/s); a value runs to the next key (so "gpu:NVIDIA H100 80GB HBM3"
# keeps its spaces).
KEY = re.compile(r"^([A-Za-z_][\w/]*):(.*)$")
NUMBER = re.compile(r"^([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)([A-Za-z]*)$")
SECONDS_PER_UNIT = {"": 1e-3, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0}  # bare numbers: ms, as logged

TRAIN_KEYS = ("step", "loss", "lr", "tokens", "train_time", "tok_s")
VAL_KEYS = ("step", "val_loss", "tokens", "train_time")
HELLASWAG_KEYS = ("step", "acc", "correct", "total")


def parse_pairs(line):
    """'a:1 gpu:NVIDIA H100 b:2ms' -> {'a': '1', 'gpu': 'NVIDIA H100', 'b': '2ms'} (values stay strings)."""
    pairs, key = {}, None
    for token in line.split():
        match = KEY.match(token)
        if match:
            key = match.group(1)
            pairs[key] = match.group(2)
        elif key is not None:
            pairs[key] += " " + token
    return pairs


def number(value):
    """'6.12' -> 6.12, '123.4ms' -> 123.4 (the unit is dropped; see seconds()), anything else -> nan."""
    match = NUMBER.match(value or "")
    return float(match.group(1)) if match else math.nan


def seconds(value):
    """A logged duration ('1234ms', '12s', a bare number of ms) in seconds; nan when unreadable."""
    match = NUMBER.match(value or "")
    if not match or match.group(2) not in SECONDS_PER_UNIT:
        return math.nan
    return float(match.group(1)) * SECONDS_PER_UNIT[match.group(2)]


def _append(series, row):
    """Append one logged step. A step not after the last one means the run was resumed from an earlier
    checkpoint and logged those steps again: the new lines replace the old ones from that step on."""
    steps = series["step"]
    while steps and steps[-1] >= row["step"]:
        for values in series.values():
            values.pop()
    for key, value in row.items():
        series[key].append(value)


def parse_log(path):
    """Read a run's log.txt into plain lists, one entry per logged step.

    Returns {
      "train":     {"step", "loss", "lr", "tokens", "train_time", "tok_s"},   # one entry per train line
      "val":       {"step", "val_loss", "tokens", "train_time"},              # one per val line (maybe none)
      "hellaswag": {"step", "acc", "correct", "total"},                       # one per hellaswag line
      "header":    {key: str},   # script, run_dir, device, gpu, torch, world_size, model_params, ...
      "done":      {key: str},   # the done line's pairs; {} when the run did not finish
    }
    Numbers are floats (nan where a line lacks the key), step is an int, train_time is in seconds.
    """
    log = {
        "train": {key: [] for key in TRAIN_KEYS},
        "val": {key: [] for key in VAL_KEYS},
        "hellaswag": {key: [] for key in HELLASWAG_KEYS},
        "header": {},
        "done": {},
    }
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("done "):
                log["done"] = parse_pairs(line[len("done "):])
                continue
            pairs = parse_pairs(line)
            if not line.startswith("step:"):
                # Header lines (script:, device: gpu:, model_params:) start with a key; source code does not.
                if KEY.match(line.split(" ", 1)[0]) and not line[:1].isspace():
                    log["header"].update(pairs)
                continue
            step = re.match(r"^(\d+)(?:/\d+)?$", pairs["step"])
            if step is None:
                continue
            step = int(step.group(1))
            if "loss" in pairs:
                _append(log["train"], {
                    "step": step, "loss": number(pairs["loss"]), "lr": number(pairs.get("lr")),
                    "tokens": number(pairs.get("tokens")), "train_time": seconds(pairs.get("train_time")),
                    "tok_s": number(pairs.get("tok/s")),
                })
            elif "val_loss" in pairs:
                _append(log["val"], {
                    "step": step, "val_loss": number(pairs["val_loss"]), "tokens": number(pairs.get("tokens")),
                    "train_time": seconds(pairs.get("train_time")),
                })
            elif "hellaswag_acc" in pairs:
                _append(log["hellaswag"], {
                    "step": step, "acc": number(pairs["hellaswag_acc"]),
                    "correct": number(pairs.get("hellaswag_correct")), "total": number(pairs.get("hellaswag_total")),
                })
    return log


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
    """Draw runs ([(label, parse_log result), ...]) into one PNG at `out`; returns the matplotlib figure."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    # Minutes once any run trained for more than a few minutes, else seconds, so the axis stays readable.
    longest = max((t for _, log in runs for t in log["train"]["train_time"] if not math.isnan(t)), default=0.0)
    time_unit, time_scale = ("min", 60.0) if longest > 180 else ("s", 1.0)

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    by_tokens, by_time, lr_axis, speed_axis = axes.flat
    for index, (label, log) in enumerate(runs):
        color = f"C{index % 10}"
        train, val = log["train"], log["val"]
        loss = ema(train["loss"], smooth)
        times = [t / time_scale for t in train["train_time"]]
        by_tokens.plot(train["tokens"], loss, color=color, linewidth=1, label=label)
        by_time.plot(times, loss, color=color, linewidth=1, label=label)
        if val["step"]:
            by_tokens.plot(val["tokens"], val["val_loss"], color=color, linestyle="--", marker="o", markersize=3)
            by_time.plot([t / time_scale for t in val["train_time"]], val["val_loss"],
                         color=color, linestyle="--", marker="o", markersize=3)
        lr_axis.plot(train["step"], train["lr"], color=color, label=label)
        speed_axis.plot(train["step"], train["tok_s"], color=color, label=label)

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
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return fig


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories, log.txt paths or run names under --runs-dir")
    parser.add_argument("--runs-dir", default="runs", help="where run names are looked up (default: runs)")
    parser.add_argument("--labels", default="", help="comma-separated legend labels, one per run (default: run names)")
    parser.add_argument("--out", default="runs_plot.png", help="PNG to write (default: runs_plot.png)")
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
        log = parse_log(path)
        if not log["train"]["step"]:
            sys.exit(f"error: {path} has no train lines (step:N/M loss:...): is it a run's log.txt?")
        runs.append((labels[index] if labels else run_label(path), log))
    plot(runs, args.out, args.smooth)
    print(f"wrote {args.out} ({len(runs)} run{'s' if len(runs) > 1 else ''})")
    return args.out


if __name__ == "__main__":
    main()
