"""--fused_head_loss (step 50, off): in training, the FP8 head's product, the soft-capped cross-entropy and the
logits' float8 gradient come from one forward, a chunk of rows at a time (a Triton kernel on CUDA, torch ops
elsewhere); the backward transposes each chunk's gradient as it uses it. The loss and the gradients are the unfused
FP8 head's to float8 rounding, and the same in chunks as whole; evaluation keeps the exact head, bad combinations
fail early, and off the step is its parent (step 49)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lever_helpers import batch, build, lever_and_parent, train

lever, parent_step = lever_and_parent("fused_head_loss")


def exact_loss_and_grad(logits, targets, softcap, pad_token):
    z = logits.float().requires_grad_()
    capped = softcap * torch.tanh(z / softcap) if softcap else z
    losses = F.cross_entropy(capped, targets, ignore_index=pad_token, reduction="none")
    losses.sum().backward()
    return losses.detach(), z.grad


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_off_by_default_and_off_is_the_parent():
    assert lever.Config().fused_head_loss is False and not hasattr(parent_step.Config, "fused_head_loss")
    model, cfg = build(lever)
    parent, parent_cfg = build(parent_step)
    assert train(model, cfg, lever, 3) == train(parent, parent_cfg, parent_step, 3)


@pytest.mark.parametrize("softcap, pad_token", [(15.0, -1), (0.0, -1), (2.0, 7)])
def test_the_loss_and_the_float8_gradient_in_both_layouts(softcap, pad_token):
    """Each row's loss is the exact one (0 where the target is padding); the gradient, times E5M2_MAX in float8, is
    the exact gradient of the summed loss to e5m2's rounding (zero on padding rows), and transpose_float8 is its
    transpose."""
    generator = torch.Generator().manual_seed(0)
    logits = (5 * torch.randn(48, 80, generator=generator)).to(torch.bfloat16)
    targets = torch.randint(0, 80, (48,), generator=generator)
    if pad_token >= 0:
        targets[::3] = pad_token
    losses, g8 = lever.softcapped_cross_entropy(logits, targets, softcap, pad_token)
    g8_t = lever.transpose_float8(g8)
    exact_losses, exact_grad = exact_loss_and_grad(logits, targets, softcap, pad_token)
    torch.testing.assert_close(losses, exact_losses, rtol=1e-5, atol=1e-5)
    assert g8.dtype == g8_t.dtype == torch.float8_e5m2 and torch.equal(g8_t.float(), g8.float().t())
    assert 0 < relative_error(g8.float() / lever.E5M2_MAX, exact_grad) < 0.06
    if pad_token >= 0:
        assert (losses[::3] == 0).all() and (g8.float()[::3] == 0).all()


def test_loss_and_gradients_are_the_unfused_fp8_heads():
    """The same forward product and the same float8 gradient values: the loss to float rounding, the input's and
    the weight's gradients to a bf16 rounding of the gradient before its float8 one (the unfused head's path)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 32, generator=generator)
    w = 0.3 * torch.randn(96, 32, generator=generator)
    targets = torch.randint(0, 96, (64,), generator=generator)
    grads = {}
    for fused in (True, False):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        if fused:
            loss = lever.FP8HeadLoss.apply(xi, wi, targets, 15.0, -1)
        else:
            logits = lever.FP8Linear.apply(xi, wi, torch.tensor(1 / 64))
            loss = F.cross_entropy(15 * torch.tanh(logits.float() / 15), targets)
        (0.5 * loss).backward()  # a loss scaled after the head (accumulation) scales both ways the same
        grads[fused] = (loss.item(), xi.grad, wi.grad)
    assert grads[True][0] == pytest.approx(grads[False][0], rel=1e-5)
    assert relative_error(grads[True][1], grads[False][1]) < 0.03
    assert relative_error(grads[True][2], grads[False][2]) < 0.03


def test_in_chunks_of_rows_as_whole_and_transposed_only_in_the_backward(monkeypatch):
    """FUSED_LOSS_ROWS rows at a time: the loss and both gradients are the whole product's (the weight's summed over
    the chunks); no transposed gradient is made in the forward, one a chunk in the backward."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(64, 32, generator=generator)
    w = 0.3 * torch.randn(96, 32, generator=generator)
    targets = torch.randint(0, 96, (64,), generator=generator)
    results = {}
    for rows in (64, 16):
        monkeypatch.setattr(lever, "FUSED_LOSS_ROWS", rows)
        transposed = []
        monkeypatch.setattr(lever, "transpose_float8", lambda a: transposed.append(a.shape) or a.t().contiguous())
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = lever.FP8HeadLoss.apply(xi, wi, targets, 15.0, -1)
        assert transposed == []
        loss.backward()
        assert transposed == [(rows, 96)] * (64 // rows)
        results[rows] = (loss.item(), xi.grad, wi.grad)
    assert results[16][0] == pytest.approx(results[64][0], rel=1e-6)
    assert torch.equal(results[16][1], results[64][1])
    torch.testing.assert_close(results[16][2], results[64][2], rtol=1e-5, atol=1e-6)


def test_training_uses_it_and_evaluation_does_not(monkeypatch):
    calls = []
    original = lever.FP8HeadLoss.apply
    monkeypatch.setattr(lever.FP8HeadLoss, "apply", lambda *a: calls.append(1) or original(*a))
    model, cfg = build(lever, fused_head_loss=True, fp8_head_backward="fp8")
    fused = train(model, cfg, lever, 8)
    assert len(calls) == 8 and fused[-1] < fused[0] - 0.5
    model, cfg = build(lever, fp8_head_backward="fp8")
    assert fused == pytest.approx(train(model, cfg, lever, 8), abs=0.02)  # the unfused FP8 head's curve
    calls.clear()
    model.eval()
    x, y = batch()
    with torch.no_grad():
        model(x, y)
    assert not calls


def test_bad_combinations_fail_early():
    with pytest.raises(SystemExit, match="--fused_head_loss is the FP8 head's: set --fp8_head=true"):
        lever.parse_config(["--fused_head_loss=true", "--fp8_head=false"])
    with pytest.raises(SystemExit, match="--fused_head_loss's backward is float8: set --fp8_head_backward=fp8"):
        lever.parse_config(["--fused_head_loss=true", "--fp8_head_backward=bf16"])
    with pytest.raises(SystemExit, match="--fused_head_loss's backward is float8"):  # step 44's default is bf16
        lever.parse_config(["--fused_head_loss=true"])
    assert lever.parse_config(["--fused_head_loss=true", "--fp8_head_backward=fp8"]).fused_head_loss is True


KERNEL_CHECK = """
import importlib.util, json, sys, torch
spec = importlib.util.spec_from_file_location("step", sys.argv[1]); step = importlib.util.module_from_spec(spec)
sys.modules["step"] = step; spec.loader.exec_module(step)
device = "cuda" if torch.cuda.is_available() else "cpu"
out = []
# 70 x 300: ragged tiles; 128 x 384: sizes divisible by 16 (training's case), where a transposed store from the
# loss's kernel came out wrong on an H100
for softcap, pad_token, rows, vocab in ((15.0, -1, 70, 300), (0.0, -1, 70, 300), (2.0, 7, 70, 300), (15.0, -1, 128, 384)):
    generator = torch.Generator().manual_seed(0)
    logits = (5 * torch.randn(rows, vocab, generator=generator)).to(torch.bfloat16).to(device)
    targets = torch.randint(0, vocab, (rows,), generator=generator).to(device)
    if pad_token >= 0:
        targets[::3] = pad_token
    kernel = step.softcapped_cross_entropy_triton(logits, targets, softcap, pad_token)
    reference = step.softcapped_cross_entropy_reference(logits, targets, softcap, pad_token)
    k8, r8 = kernel[1].float().cpu(), reference[1].float().cpu()
    differ = k8 != r8
    transposed = step.transpose_float8_triton(kernel[1])
    out.append(dict(loss_error=(kernel[0] - reference[0]).abs().max().item(),
                    transposed=torch.equal(transposed.float().cpu(), k8.t()), differ=differ.float().mean().item(),
                    error=((k8 - r8).norm() / r8.norm()).item()))
print(json.dumps(out))
"""


def test_the_triton_kernel_is_the_reference():
    """Where Triton is installed (every CUDA machine; on the CPU it runs in Triton's interpreter). On a GPU the float8
    gradients are the reference's but where float32 rounding (the kernel caps through a sigmoid, the reference through
    tanh) falls on the other side of an e5m2 rounding boundary: 0.12% of them in one case on an H100. Triton's interpreter (3.6)
    converts a value just below a power of two, or below e5m2's smallest, to half the right float8 (the hardware rounds
    up): there ~6% of them differ, and only a bound on the whole error is checked."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0" if torch.cuda.is_available() else "1")
    result = subprocess.run([sys.executable, "-c", KERNEL_CHECK, lever.__file__], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for case in json.loads(result.stdout.strip().splitlines()[-1]):
        assert case["loss_error"] < 1e-4 and case["transposed"]
        if torch.cuda.is_available():
            assert case["differ"] < 5e-3 and case["error"] < 0.01
        else:
            assert case["differ"] < 0.1 and case["error"] < 0.1


def test_the_kernel_compiles_for_hopper():
    """Where Triton is installed: both kernels compile to H100 code (sm_90) with no GPU present, the loss's float8
    conversion rounding to nearest and saturating. The interpreter runs what the compiler refuses (a Python global in
    the kernel did so once)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    signature = {"logits_ptr": "*bf16", "targets_ptr": "*i64", "losses_ptr": "*fp32", "grad_ptr": "*fp8e5",
                 "N": "i32", "softcap": "fp32", "pad_token": "i32", "V": "constexpr", "HAS_CAP": "constexpr",
                 "BLOCK_M": "constexpr", "BLOCK_V": "constexpr"}
    hopper = GPUTarget("cuda", 90, 32)
    for has_cap in (True, False):
        source = triton.compiler.ASTSource(fn=lever.softcapped_cross_entropy_kernel, signature=signature,
                                           constexprs={"V": 50304, "HAS_CAP": has_cap, "BLOCK_M": 64, "BLOCK_V": 128})
        kernel = triton.compile(source, target=hopper, options={"num_warps": 8})
        assert "cvt.rn.satfinite.e5m2x2.f32" in kernel.asm["ptx"]
    source = triton.compiler.ASTSource(fn=lever.transpose_bytes_kernel, constexprs={"BLOCK_R": 64, "BLOCK_C": 64},
                                       signature={"src_ptr": "*u8", "dst_ptr": "*u8", "R": "i32", "C": "i32",
                                                  "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"})
    assert "st.global" in triton.compile(source, target=hopper, options={"num_warps": 4}).asm["ptx"]
