#!/usr/bin/env python3
"""Time the LM head with its soft-capped loss, forward and backward, on one micro-batch, for several ways of
computing the head's product: the part of a step that step 43's profile gives ~31% of the GPU's time.

    python bench/head_microbench.py --script 43-add-regional-compile.py fp8 bf16
    python bench/head_microbench.py --script 44-....py fp8 bf16 script:FP8ForwardLinear

A variant is `bf16` (the head's product under no float8), `fp8` (the script's FP8Linear), `fused` (the script's
FP8HeadLoss: product, loss and gradient in one forward; `fused:64x128x8` with its kernel's tile set: rows, vocabulary
columns, warps) or `script:NAME` (any autograd Function of the script called as NAME.apply(x, w, grad_bound), like
FP8Linear). Each is compiled (unless
--compile=0), run 3 times untimed, then timed over --iters runs with CUDA events. It prints one line per variant:
milliseconds per micro-batch, compile seconds, peak memory, the gradients of x and w against the first variant's
(relative errors; flagged NOT FINITE where any is NaN or infinite) and the loss, which must agree between variants.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/: profile_step's loader of a lineage script
from profile_step import load_script  # noqa: E402


def head_and_loss(module, variant, softcap, softcap_form="tanh"):
    """loss(x, w, targets) as the script's GPT.head computes it in training, with the head's product by `variant`.
    softcap_form=sigmoid caps as 2c * sigmoid(z / (c/2)) (record #28's form): that is c * tanh(z / c) + c, the same
    cross-entropy (a softmax ignores a constant shift) by another kernel."""
    if variant == "fused" or variant.startswith("fused:"):  # product, capped loss and float8 gradient at once
        if not hasattr(module, "FP8HeadLoss"):
            raise SystemExit(f"variant {variant!r}: the script has no FP8HeadLoss (--fused_head_loss, step 45 on)")
        tile = tuple(int(n) for n in variant[len("fused:"):].split("x") if n.isdigit()) if ":" in variant else None
        if tile is not None and len(tile) != 3:
            raise SystemExit(f"variant {variant!r}: fused:MxVxW, M rows and V columns per tile and W warps")

        def fused(x, w, targets):
            if tile is not None:  # the kernel's tile, read at each launch (a new tile compiles a new kernel)
                module.FUSED_LOSS_TILE = tile
            # step 63 on: the kernel's fast math, as the script's default has it
            fast = (module.Config().fused_loss_fast_math,) if hasattr(module.Config, "fused_loss_fast_math") else ()
            return module.FP8HeadLoss.apply(x, w, targets, softcap, -1, *fast)
        return fused
    if variant == "bf16":
        product = None
    elif variant == "fp8":
        product = module.FP8Linear
    elif variant.startswith("script:") and hasattr(module, variant[len("script:"):]):
        product = getattr(module, variant[len("script:"):])
    else:
        raise SystemExit(f"variant {variant!r}: use bf16, fp8, fused or script:NAME with NAME an autograd Function "
                         "of the script")

    def loss(x, w, targets):
        if product is None:
            logits = x @ w.to(x.dtype).t()
        else:
            logits = product.apply(x, w, torch.tensor(1.0 / targets.numel(), device=x.device))
        if softcap > 0 and softcap_form == "sigmoid":
            logits = 2 * softcap * torch.sigmoid(logits.float() / (softcap / 2))
        elif softcap > 0:
            logits = softcap * torch.tanh(logits.float() / softcap)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))
    return loss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--script", required=True, help="a lineage script with FP8Linear (step 39 on)")
    parser.add_argument("--tokens", type=int, default=65536, help="tokens in the micro-batch (bench100m: 8 x 8,192)")
    parser.add_argument("--n_embd", type=int, default=1024)
    parser.add_argument("--vocab_size", type=int, default=50304)
    parser.add_argument("--softcap", type=float, default=15.0, help="the logits' soft-cap; 0 = off")
    parser.add_argument("--softcap_form", choices=("tanh", "sigmoid"), default="tanh",
                        help="c * tanh(z / c) (the scripts') or 2c * sigmoid(2z / c) (the same loss, record #28's)")
    parser.add_argument("--iters", type=int, default=10, help="timed runs per variant")
    parser.add_argument("--compile", type=int, default=1, help="torch.compile each variant (0 = eager)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("variants", nargs="+", help="bf16, fp8, fused or script:NAME")
    args = parser.parse_args(argv)
    module = load_script(args.script)
    # every variant is resolved before any work: a bad name fails at once
    functions = {variant: head_and_loss(module, variant, args.softcap, args.softcap_form) for variant in args.variants}
    device = torch.device(args.device)
    generator = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(args.tokens, args.n_embd, device=device, generator=generator).to(torch.bfloat16)
    w = (0.02 * torch.randn(args.vocab_size, args.n_embd, device=device, generator=generator)).requires_grad_()
    targets = torch.randint(0, args.vocab_size, (args.tokens,), device=device, generator=generator)
    cuda = device.type == "cuda"
    lines = []
    reference = None  # the first variant's name and gradients, which the others are compared with
    for variant, function in functions.items():
        function = torch.compile(function) if args.compile else function
        x = x0.clone().requires_grad_()
        start = time.time()
        for _ in range(3):
            function(x, w, targets).backward()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        warm_s = time.time() - start
        start = time.perf_counter()
        for _ in range(args.iters):
            loss = function(x, w, targets)
            loss.backward()
        if cuda:
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1000 / args.iters
        peak = f"{torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB" if cuda else "n/a"
        # one more pass from zero gradients: the loss is not all a head must get right (a NaN gradient once trained)
        x.grad, w.grad = None, None
        function(x, w, targets).backward()
        grads = (x.grad.float().clone(), w.grad.float().clone())  # w.grad would be accumulated into next
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        if reference is None:
            reference = (variant, grads)
            check = "gradients"
        else:
            errors = [((g - r).norm() / r.norm()).item() for g, r in zip(grads, reference[1])]
            check = f"gradients vs {reference[0]}: x {errors[0]:.4f}, w {errors[1]:.4f}"
        check += "" if finite else " NOT FINITE"
        lines.append(f"{variant}: {ms:.2f} ms per micro-batch (forward + backward), compile + 3 runs {warm_s:.0f} s, "
                     f"peak {peak}, {check}, loss {loss.item():.4f}")
        print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    main()
