#!/usr/bin/env python3
"""Where a run's peak memory is: run a lineage script's main() and report torch's peak allocated memory in each
phase, so that a run's one "peak memory" number can be traced to what holds it.

    python bench/memory_phases.py --out mem 65-add-compiled-muon.py --preset=bench100m --compile=1 \\
        --data=/tmp/pycorpus/npy --max_steps=6 --val_every=3 --val_tokens=1048576 --batch_size=16

The phases, in order: what comes before the first optimizer step ("start": the model, data, compile), each
optimizer step with the forwards and backwards before it ("step N": the script's kernel warm-up steps come first
and count), each validation ("validation N", the warm-up's one included) and the rest between them ("between").
A phase's number is the most memory torch held at once inside it (torch.cuda.max_memory_allocated, reset at each
phase's start); the largest is the run's peak, which bench/run.py reports. memory.txt in --out holds the table.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/: profile_step's loader of a lineage script
from profile_step import load_script  # noqa: E402

MIB = 2 ** 20


class Phases:
    """The peak of each phase: close(name) ends the current phase under `name` and starts the next one. peak() and
    reset() read and reset the allocator's peak (torch.cuda's by default; a test passes its own)."""

    def __init__(self, peak=None, reset=None):
        self.peak = peak or torch.cuda.max_memory_allocated
        self.reset = reset or torch.cuda.reset_peak_memory_stats
        self.rows = []  # (phase, peak bytes)
        self.reset()

    def close(self, name):
        self.rows.append((name, self.peak()))
        self.reset()

    def table(self):
        top = max(peak for _, peak in self.rows)
        lines = [f"{'phase':<16} {'peak MiB':>10}"]
        lines += [f"{name:<16} {peak / MIB:>10,.0f}{'  <- the run peak' if peak == top else ''}"
                  for name, peak in self.rows]
        return "\n".join(lines) + "\n"


def measure(module, overrides, phases):
    """Run module.main(overrides) with phases closed at each optimizer step and around each validation."""
    optimizer_class = module.Muon if module.parse_config(overrides).optimizer == "muon" else torch.optim.AdamW
    original_step, original_evaluate = optimizer_class.step, module.evaluate
    counts = {"step": 0, "validation": 0}

    def step(self, *args, **kwargs):
        result = original_step(self, *args, **kwargs)
        counts["step"] += 1
        phases.close(f"step {counts['step']}")
        return result

    def evaluate(*args, **kwargs):
        phases.close("start" if not counts["step"] and not counts["validation"] else "between")
        result = original_evaluate(*args, **kwargs)
        counts["validation"] += 1
        phases.close(f"validation {counts['validation']}")
        return result
    optimizer_class.step, module.evaluate = step, evaluate
    try:
        module.main(overrides)
    finally:
        optimizer_class.step, module.evaluate = original_step, original_evaluate
    phases.close("end")
    return phases


def main(argv=None, phases=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for memory.txt")
    parser.add_argument("script", help="a lineage script (NN-....py)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="--key=value overrides for the script")
    args = parser.parse_args(argv)
    module = load_script(args.script)
    module.parse_config(args.overrides)  # a bad override fails here, before any GPU work
    if phases is None and not torch.cuda.is_available():
        raise SystemExit("memory_phases.py reads torch.cuda's allocator: run it on a CUDA machine")
    os.makedirs(args.out, exist_ok=True)
    phases = measure(module, args.overrides, phases or Phases())
    text = " ".join([args.script] + args.overrides) + "\n" + phases.table()
    with open(os.path.join(args.out, "memory.txt"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return phases


if __name__ == "__main__":
    main()
