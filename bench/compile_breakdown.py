#!/usr/bin/env python3
"""Where a run's compile and warm-up time goes: run a lineage script's main() (steps 25 on: those with the kernel
warm-up) and write the seconds from the warm-up's start to the end of each of its throwaway optimizer steps and of
its validation, then torch.compile's own table of where its time went (dynamo, inductor, Triton's workers).

    python bench/compile_breakdown.py --out cb 54-add-regional-validation-compile.py --preset=bench100m \\
        --data=/tmp/pycorpus/npy --max_steps=1 --val_every=0 --val_tokens=1048576

The first step holds the training graphs' compile (forward and backward), the validation the eval graph's. Give the
script a short run (--max_steps=1, --val_every=0): only the warm-up is measured. Then each compile of the run on a
line of its own (a forward, or the backward AOTAutograd compiles at the first backward): its seconds in all, in
dynamo, AOTAutograd, inductor and inductor's code generation, its graph's size, the seconds Triton took for its
kernels and the slowest of them; and how many workers compiled Triton kernels. `compile.txt` in --out holds it all.
"""

import argparse
import importlib.util
import json
import os
import sys
import time

import torch


def load_script(path):
    spec = importlib.util.spec_from_file_location("compiled_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["compiled_script"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def seconds(us):
    return "" if us is None else f"{us / 1e6:.1f}"


def compile_table(metrics, slowest=3):
    """One line per torch.compile record (torch._dynamo.utils.get_compilation_metrics()): what was compiled, its
    seconds in all and in each stage (codegen: inductor's scheduling, code and wait for Triton, the rest of inductor
    being its lowering and passes), its graph's nodes, Triton's seconds for its kernels (for a graph's first run:
    timing its kernels' launch configs), and its slowest kernels (name: seconds). Fields a torch version lacks are
    left blank."""
    lines = [f"{'compile':<34} {'s':>6} {'dynamo':>7} {'aot':>6} {'inductor':>8} {'codegen':>7} {'triton':>7} "
             f"{'nodes':>6}  slowest kernels"]
    for m in metrics:
        name = f"{getattr(m, 'compile_id', '') or ''} {getattr(m, 'co_name', '') or ''}".strip()
        runtime = getattr(m, "is_runtime", None) is True  # work at a graph's first run: timing kernels' configs
        kinds = ["backward"] * (getattr(m, "is_forward", None) is False) + ["at first run"] * runtime
        if kinds:
            name += f" ({', '.join(kinds)})"
        triton = getattr(m, "runtime_triton_autotune_time_us" if runtime else "triton_compile_time_us", None)
        duration = getattr(m, "duration_us", None)
        if duration is None and getattr(m, "entire_frame_compile_time_s", None) is not None:
            duration = m.entire_frame_compile_time_s * 1e6
        kernels = getattr(m, "triton_kernel_compile_times_us", None) or "[]"
        try:
            kernels = json.loads(kernels) if isinstance(kernels, str) else list(kernels)
        except ValueError:
            kernels = []
        kernels = sorted(((str(k[0]), float(k[1])) for k in kernels if len(k) == 2), key=lambda k: -k[1])[:slowest]
        slow = ", ".join(f"{kernel}: {us / 1e6:.1f}" for kernel, us in kernels)
        lines.append(f"{name[:34]:<34} {seconds(duration):>6} "
                     f"{seconds(getattr(m, 'dynamo_cumulative_compile_time_us', None)):>7} "
                     f"{seconds(getattr(m, 'aot_autograd_cumulative_compile_time_us', None)):>6} "
                     f"{seconds(getattr(m, 'inductor_cumulative_compile_time_us', None)):>8} "
                     f"{seconds(getattr(m, 'inductor_code_gen_cumulative_compile_time_us', None)):>7} "
                     f"{seconds(triton):>7} "
                     f"{getattr(m, 'graph_node_count', None) or '':>6}  {slow}")
    return "\n".join(lines)


def compile_threads():
    """How many workers compile Triton kernels (inductor's compile_threads; 1: in the main process, one at a time)."""
    from torch._inductor import config
    return config.compile_threads if config.compile_threads is not None else config.decide_compile_threads()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for compile.txt")
    parser.add_argument("script", help="a lineage script (NN-....py), step 25 or later")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="--key=value overrides for the script")
    args = parser.parse_args(argv)
    module = load_script(args.script)
    if not hasattr(module, "warm_up_kernels"):
        raise SystemExit(f"{args.script} has no kernel warm-up (step 25 adds it): nothing to break down")
    cfg = module.parse_config(args.overrides)  # a bad override fails here, before any GPU work
    if cfg.kernel_warmup_steps < 1:
        raise SystemExit("--kernel_warmup_steps=0: the warm-up is off, nothing to break down; give it >= 1")
    os.makedirs(args.out, exist_ok=True)

    marks, start = [], []  # (what ended, seconds since the warm-up started)
    warm_up, evaluate = module.warm_up_kernels, module.evaluate
    optimizer_class = module.Muon if cfg.optimizer == "muon" else torch.optim.AdamW
    optimizer_step = optimizer_class.step

    def mark(what):
        if start:  # inside the warm-up only
            synchronize()
            marks.append((what, time.perf_counter() - start[0]))

    def timed_warm_up(*warm_args, **warm_kwargs):
        synchronize()
        start.append(time.perf_counter())
        result = warm_up(*warm_args, **warm_kwargs)
        mark("the warm-up (restored)")
        start.clear()
        return result

    def timed_evaluate(*eval_args, **eval_kwargs):
        result = evaluate(*eval_args, **eval_kwargs)
        mark("its validation")
        return result

    def timed_step(self, *step_args, **step_kwargs):
        result = optimizer_step(self, *step_args, **step_kwargs)
        mark(f"step {sum(what.startswith('step') for what, _ in marks) + 1}")
        return result
    module.warm_up_kernels, module.evaluate, optimizer_class.step = timed_warm_up, timed_evaluate, timed_step
    try:
        module.main(args.overrides)
    finally:
        module.warm_up_kernels, module.evaluate, optimizer_class.step = warm_up, evaluate, optimizer_step
    lines = [" ".join([args.script] + args.overrides), "seconds from the warm-up's start to the end of:"]
    previous = 0.0
    for what, seconds in marks:
        lines.append(f"  {what:<24} {seconds:8.1f}  (+{seconds - previous:.1f})")
        previous = seconds
    lines += ["", torch._dynamo.utils.compile_times(repr="str", aggregate=True), "",
              f"Triton compile workers: {compile_threads()}",
              compile_table(torch._dynamo.utils.get_compilation_metrics())]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "compile.txt"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
