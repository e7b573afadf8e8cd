"""--fused_loss_fast_math (step 63, on): the fused head's loss kernel caps the logits by the GPU's tanh.approx and
takes its exponentials by exp2, where step 62's takes a sigmoid (two special-function instructions) and exp. Off, the
step is its parent; the setting reaches the kernel (the op is given it; compiled for an H100, only the fast kernel
holds tanh.approx); on a GPU the fast kernel's loss and float8 gradient are the reference's to its rounding."""
import json
import os
import subprocess
import sys

import pytest
import torch

from lever_helpers import build, lever_and_parent, train

lever, parent_step = lever_and_parent("fused_loss_fast_math")

FUSED = dict(fp8_head=True, fused_head_loss=True, fp8_head_backward="fp8", logit_softcap=15.0)


def test_on_by_default_and_off_is_the_parent():
    assert lever.Config().fused_loss_fast_math is True
    model, cfg = build(lever, **FUSED, fused_loss_fast_math=False)
    parent_model, parent_cfg = build(parent_step, **FUSED)
    assert train(model, cfg, lever, 3) == train(parent_model, parent_cfg, parent_step, 3)


def test_the_setting_reaches_the_loss_op(monkeypatch):
    """On the CPU the op runs the exact reference either way: what the test can see is the flag the model hands it."""
    given = []
    original = lever.softcapped_cross_entropy
    monkeypatch.setattr(lever, "softcapped_cross_entropy", lambda *a: given.append(a[-1]) or original(*a))
    for fast in (True, False):
        model, cfg = build(lever, **FUSED, fused_loss_fast_math=fast)
        losses = train(model, cfg, lever, 4)
        assert losses[-1] < losses[0]
    assert given == [True] * 4 + [False] * 4


def test_only_the_fast_kernel_compiles_to_tanh_approx():
    """Where Triton is installed: both forms compile to H100 code (sm_90) with no GPU present."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    signature = {"logits_ptr": "*bf16", "targets_ptr": "*i64", "losses_ptr": "*fp32", "grad_ptr": "*fp8e5",
                 "N": "i32", "softcap": "fp32", "pad_token": "i32", "V": "constexpr", "HAS_CAP": "constexpr",
                 "BLOCK_M": "constexpr", "BLOCK_V": "constexpr", "FAST": "constexpr"}
    ptx = {}
    for fast in (True, False):
        source = triton.compiler.ASTSource(fn=lever.softcapped_cross_entropy_kernel, signature=signature,
                                           constexprs={"V": 50304, "HAS_CAP": True, "BLOCK_M": 64, "BLOCK_V": 128,
                                                       "FAST": fast})
        ptx[fast] = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]
        assert "cvt.rn.satfinite.e5m2x2.f32" in ptx[fast]
    assert "tanh.approx.f32" in ptx[True] and "tanh.approx.f32" not in ptx[False]


FAST_CHECK = """
import importlib.util, json, sys, torch
spec = importlib.util.spec_from_file_location("step", sys.argv[1]); step = importlib.util.module_from_spec(spec)
sys.modules["step"] = step; spec.loader.exec_module(step)
out = []
for softcap, pad_token, rows, vocab in ((15.0, -1, 70, 300), (0.0, -1, 70, 300), (2.0, 7, 70, 300), (15.0, -1, 128, 384)):
    generator = torch.Generator().manual_seed(0)
    logits = (5 * torch.randn(rows, vocab, generator=generator)).to(torch.bfloat16).cuda()
    targets = torch.randint(0, vocab, (rows,), generator=generator).cuda()
    if pad_token >= 0:
        targets[::3] = pad_token
    fast = step.softcapped_cross_entropy_triton(logits, targets, softcap, pad_token, True)
    reference = step.softcapped_cross_entropy_reference(logits, targets, softcap, pad_token)
    f8, r8 = fast[1].float().cpu(), reference[1].float().cpu()
    out.append(dict(loss_error=(fast[0] - reference[0]).abs().max().item(), differ=(f8 != r8).float().mean().item(),
                    error=((f8 - r8).norm() / r8.norm()).item()))
print(json.dumps(out))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="tanh.approx is a GPU instruction: Triton's interpreter "
                    "cannot run it")
def test_the_fast_kernel_is_the_reference_on_a_gpu():
    result = subprocess.run([sys.executable, "-c", FAST_CHECK, lever.__file__], capture_output=True, text=True,
                            env=dict(os.environ, TRITON_INTERPRET="0"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for case in json.loads(result.stdout.strip().splitlines()[-1]):
        assert case["loss_error"] < 1e-3 and case["differ"] < 0.02 and case["error"] < 0.01, case
