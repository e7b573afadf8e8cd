#!/usr/bin/env python3
"""Plot val loss against training time (left) and against tokens (right) for several benchmark summaries.

    python bench/plot.py --out plot.png bench_runs/a.summary.json bench_runs/b.summary.json
    python bench/plot.py --out plot.png bench_out/summaries.json          # a session's list of summaries

Training time is the scripts' own train_time (validation is outside it) minus the run's compile + warm-up
estimate (step 1's dt holds torch.compile's compile time). A run with no validation (steps 01-03) is drawn with its
train loss instead, as a thin dashed line, and says so in the legend.
"""

import argparse
import json
import sys

import matplotlib

matplotlib.use("Agg")  # files only: no display on the GPU machine or in CI
import matplotlib.pyplot as plt  # noqa: E402


def load_summaries(paths):
    """Summaries from files that each hold one summary or a list of them."""
    summaries = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
        summaries += payload if isinstance(payload, list) else [payload]
    return summaries


def curves(summary):
    """(label suffix, style, [(seconds, tokens, loss)]): the val points, else the train curve."""
    # The compile time inside the logged train_time: what the runner took out of it (train_time_ex_compile_s).
    # From step 25 on, the kernel warm-up is untimed and so in compile_warmup_s but not in train_time.
    if summary.get("train_time_s") is not None and summary.get("train_time_ex_compile_s") is not None:
        compile_ms = (summary["train_time_s"] - summary["train_time_ex_compile_s"]) * 1000
    else:  # a summary written before the runner recorded it
        compile_ms = max(0.0, summary.get("compile_warmup_s") or 0.0) * 1000

    def seconds(train_time_ms):
        return max(0.0, train_time_ms - compile_ms) / 1000

    val = [(seconds(p["train_time_ms"]), p["tokens"], p["val_loss"]) for p in summary.get("val") or []
           if p.get("train_time_ms") is not None and p.get("tokens") is not None and p.get("val_loss") is not None]
    if val:
        return "val", dict(marker="o", markersize=3, linewidth=1.5), val
    train = [(seconds(t), tokens, loss) for _, tokens, t, loss in summary.get("train_curve") or []
             if t is not None and tokens is not None and loss is not None]
    return "train loss, no val", dict(linestyle="--", linewidth=0.8), train


def plot(summaries, out):
    figure, (by_time, by_tokens) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    cards = sorted({s["card"] for s in summaries if s.get("card")}) or ["?"]
    drawn = 0
    for summary in summaries:
        what, style, points = curves(summary)
        if not points:
            continue
        seconds, tokens, losses = zip(*points)
        label = f"{summary['name']} ({what})"
        line, = by_time.plot(seconds, losses, label=label, **style)
        by_tokens.plot([t / 1e6 for t in tokens], losses, color=line.get_color(), **style)
        drawn += 1
    by_time.set_xlabel("training time (s; compile estimate and validation excluded)")
    by_tokens.set_xlabel("tokens trained (millions)")
    by_time.set_ylabel("loss")
    for axes in (by_time, by_tokens):
        axes.grid(alpha=0.3)
    if drawn:
        by_time.legend(fontsize=8)
    else:
        by_time.text(0.5, 0.5, "no loss points in these summaries", ha="center", transform=by_time.transAxes)
    figure.suptitle(f"bench: loss vs time and tokens on {', '.join(cards)}")
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("summaries", nargs="+", help="summary JSON files (one summary or a list each)")
    parser.add_argument("--out", default="plot.png", help="PNG to write")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    print(plot(load_summaries(args.summaries), args.out))


if __name__ == "__main__":
    main()
