#!/usr/bin/env python3
"""Time FlexAttention alone, forward and backward, on one micro-batch of a lineage script's benchmark shape, for
several sets of its Triton kernels' options (flex_attention's kernel_options): which tiles, warps and stages.

    python bench/flex_microbench.py --script 61-add-backout.py default \\
        fwd_BLOCK_M=128,fwd_BLOCK_N=128 bwd_BLOCK_M1=64,bwd_BLOCK_N1=128,bwd_BLOCK_M2=128,bwd_BLOCK_N2=64

A variant is `default` (none: torch's own choice) or KEY=N items, KEY one of OPTIONS (fwd_ or bwd_ in front sets one
direction's only), tiles powers of 2 from 16 that divide the block mask's 128-token tiles. The shape is the script's
(step 46 on) --preset=bench100m micro-batch (8 sequences of 8,192 tokens, 6 heads of 128) at a fixed --window and at
half of it (the long and the short blocks), the block mask the model builds. Each variant is compiled, run 3 times
untimed, then timed over --iters runs with CUDA events. It prints one line per variant and width: milliseconds per
call (forward and backward; forward only off CUDA, where FlexAttention has no backward), compile seconds, and the
largest difference of its output from the first variant's (tiles must not change it beyond rounding). A variant
that fails (tiles past the card's shared memory) prints `failed:` and its error, and the next one runs.
2026-11-26 (n), H200: none of seven sets beat torch's default (bench/RESULTS.md), so no step sets them.
"""

import argparse
import inspect
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/: profile_step's loader of a lineage script
from profile_step import load_script, ms_per_call  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", required=True, help="a lineage script with FlexAttention (step 46 on)")
    parser.add_argument("--window", type=int, default=2048, help="the long blocks' window; the short get half")
    parser.add_argument("--batch_size", type=int, default=0, help="sequences per call (0: the bench100m preset's)")
    parser.add_argument("--block_size", type=int, default=0, help="tokens per sequence (0: the preset's)")
    parser.add_argument("--n_head", type=int, default=0, help="heads (0: the script's)")
    parser.add_argument("--n_embd", type=int, default=0, help="width, head_dim = n_embd / n_head (0: the script's)")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per variant and width")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu (forward only, uncompiled: a check)")
    parser.add_argument("--compile", type=int, default=1, help="torch.compile each variant (0: eager)")
    parser.add_argument("variants", nargs="+", help="KEY=N,... kernel options (see above), or default")
    return parser.parse_args(argv)


TILES = ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")  # forward's; backward's two passes'
OPTIONS = TILES + ("num_warps", "num_stages")


def kernel_options(variant):
    """A variant as flex_attention's kernel_options dict (None for `default`); a bad one fails before any work."""
    if variant == "default":
        return None
    options = {}
    for item in variant.split(","):
        key, _, value = item.partition("=")
        name = key.removeprefix("fwd_").removeprefix("bwd_")
        if name not in OPTIONS or not value.isdigit() or key in options:
            raise SystemExit(f"variant {variant!r}: {item!r} is not KEY=N with KEY one of {', '.join(OPTIONS)} (fwd_ "
                             "or bwd_ in front sets one direction's only), each once, e.g. fwd_BLOCK_M=128")
        number = int(value)
        if name in TILES and (number < 16 or number & (number - 1) or 128 % number):
            raise SystemExit(f"variant {variant!r}: {key}={number} must be a power of 2 from 16 that divides the "
                             "block mask's 128-token tiles: 16, 32, 64 or 128")
        options[key] = number
    return options


def config(module, args):
    """The script's bench100m config at the fixed window, checked by the script itself."""
    if "window" not in inspect.signature(module.GPT.attention_mask).parameters:
        raise SystemExit(f"{args.script}: its GPT.attention_mask takes no window (step 46 on)")
    shape = [f"--{key}={getattr(args, key)}" for key in ("batch_size", "block_size", "n_head", "n_embd")
             if getattr(args, key)]
    return module.parse_config(["--preset=bench100m", f"--window={args.window}", "--window_ramp=false",
                                "--attention=flex", *shape])


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    module = load_script(args.script)
    variants = {variant: kernel_options(variant) for variant in args.variants}
    cfg = config(module, args)
    device = torch.device(args.device)
    with torch.device("meta"):
        model = module.GPT(cfg)  # only its attention_mask (and window): no weights needed
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.block_size), generator=generator).to(device)
    head_dim, dtype = cfg.n_embd // cfg.n_head, torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(cfg.batch_size, cfg.n_head, cfg.block_size, head_dim, generator=generator)
               .to(device, dtype).requires_grad_(device.type == "cuda") for _ in range(3))
    grad = torch.randn(q.shape, generator=generator).to(device, dtype)
    lines, first = [], {}
    for width in (args.window, args.window // 2):
        mask = model.attention_mask(idx, flex=True, window=torch.tensor(width, device=device))
        for variant, options in variants.items():

            def call(q, k, v):
                return module.flex_attention(q, k, v, block_mask=mask, kernel_options=options)
            fn = torch.compile(call, dynamic=False) if args.compile else call

            def step():
                out = fn(q, k, v)
                if q.requires_grad:
                    out.backward(grad)
                return out
            t0 = time.time()
            try:  # tiles past the card's shared memory fail here: say so, and time the next variant
                out = step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
            except Exception as error:  # noqa: BLE001 (Triton's and inductor's errors have no common type)
                lines.append(f"window {width:5d} {variant}: failed: {type(error).__name__}: "
                             f"{str(error).splitlines()[0][:200] if str(error) else ''}")
                print(lines[-1], flush=True)
                for t in (q, k, v):
                    t.grad = None
                continue
            compile_s = time.time() - t0
            for _ in range(2):
                step()
            ms = ms_per_call(step, args.iters, device)
            reference = first.setdefault(width, out.detach())
            error = (out.detach().float() - reference.float()).abs().max().item()
            what = "forward+backward" if q.requires_grad else "forward"
            lines.append(f"window {width:5d} {variant}: {ms:.3f} ms ({what}), compile {compile_s:.1f} s, "
                         f"max |out - first| {error:.2e}")
            print(lines[-1], flush=True)
            for t in (q, k, v):
                t.grad = None
    return lines


if __name__ == "__main__":
    main()
