#!/usr/bin/env python3
"""Time the float8 cast of an MLP activation, compiled, for three ways of scaling it: what a per-tensor amax costs
before the cast, and what scaling that needs no pass of its own would save (step 58's profile: ~47 ms a step of
kernels that carry amaxes and casts).

    python bench/fp8_cast_microbench.py
    python bench/fp8_cast_microbench.py --rows 65536 --cols 3072 768 --iters 50

For an input h (rows x cols, bf16, what the MLP's first product gives) each variant makes relu(h)^2 in float8 e4m3:
  tensor   the steps' way (to_float8): the whole tensor's amax first, then the cast with it (two passes over h)
  delayed  the cast with a scale known before (the previous step's amax), the new amax as per-row maxima
           taken in the same pass (TransformerEngine's delayed scaling; one pass, if the compiler fuses it)
  row      each row scaled by its own amax (torch._scaled_mm takes per-row scales): one pass per row
It prints, per shape and variant, milliseconds per call (CUDA events over --iters calls after 3 untimed ones),
how many kernels the compiled function launched, and the largest relative error of the dequantized result.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/: profile_step's timer
from profile_step import ms_per_call  # noqa: E402

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max


def tensor_scaled(h, scale):
    x = torch.relu(h).square()
    s = (x.abs().amax().float() / E4M3_MAX).clamp(min=1e-12)
    return (x.float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), s


def delayed_scaled(h, scale):
    x = torch.relu(h).square()
    x8 = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return x8, x.abs().amax(dim=-1, keepdim=True).float()  # the row maxima: the next call's scale comes from them


def row_scaled(h, scale):
    x = torch.relu(h).square()
    s = (x.abs().amax(dim=-1, keepdim=True).float() / E4M3_MAX).clamp(min=1e-12)
    return (x.float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), s


VARIANTS = {"tensor": tensor_scaled, "delayed": delayed_scaled, "row": row_scaled}


def dequantized(variant, x8, s, scale):
    return x8.float() * (scale if variant == "delayed" else s)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=65536, help="tokens of a micro-batch (bench100m: 8 x 8,192)")
    parser.add_argument("--cols", type=int, nargs="+", default=[3072, 768], help="widths (MLP hidden, model)")
    parser.add_argument("--iters", type=int, default=50, help="timed calls per shape and variant")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu (a check of the variants, not a timing)")
    parser.add_argument("--compile", type=int, default=1, help="torch.compile each variant (0: eager)")
    parser.add_argument("variants", nargs="*", default=list(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}: use {', '.join(VARIANTS)}")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    lines = []
    for cols in args.cols:
        generator = torch.Generator().manual_seed(0)
        h = torch.randn(args.rows, cols, generator=generator).to(device, torch.bfloat16)
        exact = torch.relu(h.float()).square()
        # the delayed variant's scale: the amax of a previous call on data like this one (here: of this one)
        scale = (exact.abs().amax() / E4M3_MAX).clamp(min=1e-12)
        for variant in args.variants:
            fn = torch.compile(VARIANTS[variant], dynamic=False) if args.compile else VARIANTS[variant]
            x8, s = fn(h, scale)  # compiles
            error = ((dequantized(variant, x8, s, scale) - exact).abs().max() / exact.abs().max()).item()
            for _ in range(2):
                fn(h, scale)
            with torch.profiler.profile() as profiler:
                fn(h, scale)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            kernels = sum(1 for event in profiler.events() if event.device_type == torch.autograd.DeviceType.CUDA)
            ms = ms_per_call(lambda: fn(h, scale), args.iters, device)
            lines.append(f"{args.rows}x{cols} {variant}: {ms:.3f} ms, {kernels} GPU kernels, "
                         f"max relative error {error:.2e}")
            print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    main()
