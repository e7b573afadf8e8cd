#!/usr/bin/env python3
"""Where a training step's time goes: run a lineage script's main() under torch.profiler for a few steps and
write the GPU time by kind of kernel (matrix multiplies, attention, compiled fused kernels, ...) and the
profiler's kernel table.

    python bench/profile_step.py --out prof --skip 403 --steps 6 36-add-muon-momentum-warmup.py \\
        --preset=bench100m --compile=1 --data=/tmp/pycorpus/npy --max_steps=420 --val_every=0

The window opens after --skip optimizer steps (a script's untimed kernel warm-up steps count: they call the
optimizer too), so that compile and the first steps stay outside it; pick --max_steps past --skip + --steps + 2.
A step is one call of the script's Muon (or AdamW, for --optimizer=adamw) step. The groups count kernels only
(a CPU op and the kernels it launches are not both counted); `profile.txt` in --out holds it all.
"""

import argparse
import collections
import importlib.util
import os
import re
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile, schedule

# Kernel names -> what they do. The first pattern that matches names the group.
GROUPS = [
    ("nccl (communication)", r"nccl"),
    ("memcpy / memset", r"memcpy|memset"),
    ("attention (flex / sdpa)", r"flex_attention|flash|attention|fmha|attn"),
    ("matrix multiply (cuBLAS / CUTLASS)", r"gemm|nvjet|cutlass|sm90_xmma|sm80_xmma|splitk"),
    ("loss (log-softmax, the fused head's loss and transpose)", r"log_softmax|softcapped_cross_entropy|transpose_bytes"),
    ("compiled fused kernels (triton)", r"^triton_"),
]


def kernel_group(name):
    for group, pattern in GROUPS:
        if re.search(pattern, name, re.IGNORECASE):
            return group
    return "other kernels (eager ops: optimizers, ...)"


def device_time_us(event):
    """Self device time of a profiler event average, in microseconds (the attribute was renamed in torch 2.4)."""
    value = getattr(event, "self_device_time_total", None)
    return getattr(event, "self_cuda_time_total", 0) if value is None else value


def is_kernel(event):
    """A GPU kernel: on the device and not a user annotation. The profiler also puts each annotated range
    (ProfilerStep#N, Optimizer.step#..., record_function) on the GPU's timeline, with every kernel inside it as its
    own time: counted as kernels, they double the busy time (bench/RESULTS.md 2026-11-26 (f))."""
    return str(getattr(event, "device_type", "")).endswith("CUDA") and not getattr(event, "is_user_annotation", False)


def kernel_events(events):
    return [e for e in events if is_kernel(e) and device_time_us(e) > 0]


def load_script(path):
    spec = importlib.util.spec_from_file_location("profiled_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["profiled_script"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def ms_per_call(fn, iters, device):
    """Milliseconds per call of fn() over `iters` calls, after the caller's untimed ones: CUDA events on a GPU (what
    the GPU spent, queued calls included), the wall clock elsewhere. The microbenchmarks' one timer."""
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) * 1000 / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def report(events, script_args, skip, steps, step_ms):
    """The text of profile.txt: per-group kernel time, the user ranges of the optimizers, the table."""
    kernels = kernel_events(events)
    busy = sum(device_time_us(e) for e in kernels)
    groups = collections.Counter()
    for event in kernels:
        groups[kernel_group(event.key)] += device_time_us(event)
    lines = [" ".join(script_args), f"profiled steps: {steps} after {skip} optimizer steps"]
    if step_ms is not None:
        lines.append(f"wall time per step inside the window (profiler on): {step_ms:.1f} ms")
    lines.append(f"GPU busy: {busy / 1000 / steps:.1f} ms per step (kernels only)")
    for group, total in groups.most_common():
        lines.append(f"  {total / 1000 / steps:8.1f} ms/step  {100 * total / busy:5.1f}%  {group}")
    ranges = [e for e in events if e.key.startswith("Optimizer.step#") and device_time_us(e) > 0]
    for event in ranges:  # the GPU side of the optimizers' user ranges: their kernels, also counted above
        lines.append(f"  inside {event.key}: {device_time_us(event) / 1000 / steps:.1f} ms/step")
    sort_by = "self_cuda_time_total" if kernels else "self_cpu_time_total"
    lines += ["", events.table(sort_by=sort_by, row_limit=60, max_name_column_width=90)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for profile.txt")
    parser.add_argument("--skip", type=int, default=400, help="optimizer steps before the profiled window")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps profiled")
    parser.add_argument("script", help="a lineage script (NN-....py)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="--key=value overrides for the script")
    args = parser.parse_args(argv)
    if args.skip < 0 or args.steps < 1:
        parser.error(f"--skip={args.skip} must be >= 0 and --steps={args.steps} >= 1")
    module = load_script(args.script)
    module.parse_config(args.overrides)  # a bad override fails here, before any GPU work
    os.makedirs(args.out, exist_ok=True)

    warmup = 2  # profiler steps recorded then thrown away: its own start-up cost stays out of the window
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    profiler = profile(activities=activities,
                       schedule=schedule(wait=args.skip, warmup=warmup, active=args.steps, repeat=1))
    marks = []
    optimizer_class = module.Muon if "--optimizer=adamw" not in args.overrides else torch.optim.AdamW
    original_step = optimizer_class.step

    def step(self, *step_args, **step_kwargs):
        result = original_step(self, *step_args, **step_kwargs)
        profiler.step()
        marks.append(time.perf_counter())
        return result
    optimizer_class.step = step
    try:
        with profiler:
            module.main(args.overrides)
    finally:
        optimizer_class.step = original_step
    first = args.skip + warmup - 1  # the mark that closes the last step before the window
    window = marks[first:first + args.steps + 1]
    if len(window) < args.steps + 1:
        raise SystemExit(f"the run made {len(marks)} optimizer steps, fewer than --skip + 2 + --steps "
                         f"({args.skip + warmup + args.steps}): raise the script's --max_steps")
    step_ms = (window[-1] - window[0]) / args.steps * 1000
    text = report(profiler.key_averages(), [args.script] + args.overrides, args.skip, args.steps, step_ms)
    with open(os.path.join(args.out, "profile.txt"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text[:4000])
    return text


if __name__ == "__main__":
    main()
