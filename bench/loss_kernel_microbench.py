#!/usr/bin/env python3
"""Time the fused head's loss kernel alone (step 50 on: the soft-capped cross-entropy and the float8 gradient of a
chunk of bf16 logits), against variants of it: what the step's 21 ms a step of loss kernels could shed.

    python bench/loss_kernel_microbench.py --script 61-add-backout.py step tanh
    python bench/loss_kernel_microbench.py --script 63-add-fast-loss-kernel-math.py step fast
    python bench/loss_kernel_microbench.py --script 61-add-backout.py --device cpu step   # a check, not a timing

A variant is `step` (the script's own kernel, softcapped_cross_entropy_kernel, its exact math), `fast` (the same with
step 63's --fused_loss_fast_math) or `tanh` (this tool's kernel, for any step from 50): the same two passes with the
cap as c * tanh(z / c) by the GPU's one-instruction tanh (tanh.approx.f32) where the step's kernel takes a sigmoid
(an exponential and a division), and every exponential as exp2 of a prescaled argument. Each variant runs on the same
--rows x --vocab_size bf16 logits (the step's chunk: FUSED_LOSS_ROWS rows), 3 times untimed, then --iters times under
CUDA events. It prints one line per variant: milliseconds per chunk, the bytes moved per second (two reads of the
logits, one float8 write), and its largest differences from the script's reference (torch ops in float32): losses, and
the float8 gradient read back as float. On the CPU only `step` runs, through the script's torch reference: a check of
the shapes, not of a kernel.
"""

import argparse
import inspect
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/: profile_step's loader of a lineage script
from profile_step import load_script, ms_per_call  # noqa: E402

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

VARIANTS = ("step", "fast", "tanh")

if triton is not None:
    @triton.jit
    def fast_tanh(x):
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)

    @triton.jit
    def tanh_kernel(logits_ptr, targets_ptr, losses_ptr, grad_ptr, N, softcap, pad_token, V: tl.constexpr,
                    HAS_CAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
        """The step's softcapped_cross_entropy_kernel, argument for argument, with c * tanh(z / c) by tanh.approx
        and each exp(a) as exp2(a * log2(e)): the same loss and gradient up to the approximations' rounding."""
        LOG2E: tl.constexpr = 1.4426950408889634
        inverse_cap = 1.0 / softcap
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        targets = tl.load(targets_ptr + rows, mask=row_ok, other=0)
        scored = row_ok & (targets != pad_token)
        row_start = rows[:, None].to(tl.int64) * V
        running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_M], tl.float32)
        target_logit = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            ok = row_ok[:, None] & (cols < V)[None, :]
            z = tl.load(logits_ptr + row_start + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            if HAS_CAP:
                z = softcap * fast_tanh(z * inverse_cap)
            z = tl.where((cols < V)[None, :], z, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(z, axis=1))
            running_sum = (running_sum * tl.exp2((running_max - new_max) * LOG2E)
                           + tl.sum(tl.exp2((z - new_max[:, None]) * LOG2E), axis=1))
            running_max = new_max
            target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
        log_sum_exp = running_max + tl.log(running_sum)
        tl.store(losses_ptr + rows, tl.where(scored, log_sum_exp - target_logit, 0.0), mask=row_ok)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            ok = row_ok[:, None] & (cols < V)[None, :]
            z = tl.load(logits_ptr + row_start + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            if HAS_CAP:
                t = fast_tanh(z * inverse_cap)
                z = softcap * t
            grad = tl.exp2((z - log_sum_exp[:, None]) * LOG2E) - tl.where(cols[None, :] == targets[:, None], 1.0, 0.0)
            if HAS_CAP:
                grad = grad * (1 - t * t)  # the cap's slope
            grad = tl.where(scored[:, None], grad, 0.0) * 57344.0  # E5M2_MAX
            tl.store(grad_ptr + row_start + cols[None, :], grad.to(tl.float8e5, fp_downcast_rounding="rtne"), mask=ok)


def launch_tanh(module, logits, targets, softcap):
    """(losses, float8 gradient) by this tool's tanh_kernel, launched as the script launches its own."""
    N, V = logits.shape
    losses = torch.empty(N, dtype=torch.float32, device=logits.device)
    grad8 = torch.empty(N, V, dtype=torch.float8_e5m2, device=logits.device)
    block_m, block_v, warps = module.FUSED_LOSS_TILE
    tanh_kernel[(triton.cdiv(N, block_m),)](logits, targets, losses, grad8, N, float(softcap) or 1.0, -1, V=V,
                                            HAS_CAP=softcap > 0, BLOCK_M=block_m, BLOCK_V=block_v, num_warps=warps)
    return losses, grad8


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", required=True, help="a lineage script with the fused head loss (step 50 on)")
    parser.add_argument("--rows", type=int, default=0, help="rows of logits (0: the script's FUSED_LOSS_ROWS)")
    parser.add_argument("--vocab_size", type=int, default=50304)
    parser.add_argument("--softcap", type=float, default=15.0, help="the logits' soft-cap; 0 = off")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per variant")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu (the script's reference only: a check)")
    parser.add_argument("variants", nargs="+", help=f"of {', '.join(VARIANTS)}")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}: use {', '.join(VARIANTS)}")
    if args.device != "cuda" and args.variants != ["step"]:
        parser.error("off CUDA only `step` runs (the script's torch reference): the variants are Triton kernels")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    module = load_script(args.script)
    if not hasattr(module, "softcapped_cross_entropy_impl"):
        raise SystemExit(f"{args.script} has no fused head loss kernel (step 50 on)")
    if "fast" in args.variants and "fast" not in inspect.signature(module.softcapped_cross_entropy_impl).parameters:
        raise SystemExit(f"variant 'fast': {args.script} has no --fused_loss_fast_math (step 63 on)")
    device = torch.device(args.device)
    rows = args.rows or module.FUSED_LOSS_ROWS
    generator = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(rows, args.vocab_size, generator=generator)).to(device, torch.bfloat16)
    targets = torch.randint(0, args.vocab_size, (rows,), generator=generator).to(device)
    reference = module.softcapped_cross_entropy_reference(logits, targets, args.softcap, -1)
    lines = []
    for variant in args.variants:
        def call():
            if device.type != "cuda":
                return module.softcapped_cross_entropy_impl(logits, targets, args.softcap, -1)
            if variant == "tanh":
                return launch_tanh(module, logits, targets, args.softcap)
            fast = (True,) if variant == "fast" else ()
            return module.softcapped_cross_entropy_triton(logits, targets, args.softcap, -1, *fast)
        losses, grad8 = call()
        loss_error = (losses - reference[0]).abs().max().item()
        grad_error = (grad8.float() - reference[1].float()).abs().max().item() / module.E5M2_MAX
        ms = None
        if device.type == "cuda":
            for _ in range(2):
                call()
            ms = ms_per_call(call, args.iters, device)
        moved = logits.numel() * (2 * logits.element_size() + 1)  # two reads of the logits, one float8 write
        timing = f"{ms:.3f} ms, {moved / ms / 1e9:.2f} TB/s" if ms else "untimed (cpu)"
        lines.append(f"{rows}x{args.vocab_size} {variant}: {timing}, max |loss - reference| {loss_error:.2e}, "
                     f"max |gradient - reference| {grad_error:.2e}")
        print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    main()
