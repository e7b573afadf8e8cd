"""--fp8_head_backward (step 44, bf16 by default): with `bf16`, the FP8 head's logits are still the float8
product, but its backward multiplies the gradient, unquantized, by the saved x and w in bf16 instead of float8
copies. The forward is step 43's bit for bit, the gradients are within bf16's rounding (closer than float8's), and
`fp8` is the parent (step 43)."""
import pytest
import torch

from lever_helpers import batch, build, lever_and_parent, train

lever, parent_step = lever_and_parent("fp8_head_backward")


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def products(function, x, w, grad):
    """function(x, w)'s output and its two gradients for the incoming gradient `grad`."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    out = function(x, w)
    out.backward(grad)
    return out, x.grad, w.grad


def operands(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 32, generator=generator)
    w = 0.02 * torch.randn(48, 32, generator=generator)
    return x, w, torch.randn(64, 48, generator=generator)


def test_bf16_by_default_and_fp8_is_the_parent():
    assert lever.Config().fp8_head_backward == "bf16" and not hasattr(parent_step.Config, "fp8_head_backward")
    model, cfg = build(lever, fp8_head_backward="fp8")
    parent, parent_cfg = build(parent_step)
    assert list(model.state_dict()) == list(parent.state_dict())
    parent_losses = train(parent, parent_cfg, parent_step, 3)
    assert train(model, cfg, lever, 3) == parent_losses
    default, default_cfg = build(lever)
    assert train(default, default_cfg, lever, 3) != parent_losses


def test_bf16_changes_the_gradients_not_the_logits_and_trains(monkeypatch):
    """The first loss is the parent's (the same float8 forward), the next ones are not (other gradients), and only
    training goes through the new Function."""
    calls = []
    original = lever.FP8ForwardLinear.apply
    monkeypatch.setattr(lever.FP8ForwardLinear, "apply", lambda *a: calls.append(1) or original(*a))
    parent, parent_cfg = build(parent_step)
    parent_losses = train(parent, parent_cfg, parent_step, 3)
    model, cfg = build(lever, fp8_head_backward="bf16")
    losses = train(model, cfg, lever, 8)
    assert len(calls) == 8
    assert losses[0] == parent_losses[0] and losses[:3] != parent_losses
    assert losses[-1] < losses[0] - 0.5, losses
    calls.clear()
    fp8, fp8_cfg = build(lever, fp8_head_backward="fp8")
    train(fp8, fp8_cfg, lever, 2)
    assert not calls  # fp8: step 43's FP8Linear
    model.eval()
    with torch.no_grad():
        model(*batch())
    assert not calls  # evaluation: the exact head


def test_same_forward_and_gradients_within_bf16_rounding():
    """The logits equal FP8Linear's bit for bit; both gradients are within bf16's rounding (8 mantissa bits) of the
    float32 products, and closer to them than FP8Linear's e5m2 gradients (2 mantissa bits)."""
    x, w, grad = operands()
    bound = grad.abs().max()
    out, grad_x, grad_w = products(lambda x, w: lever.FP8ForwardLinear.apply(x, w, bound), x, w, grad)
    fp8_out, fp8_grad_x, fp8_grad_w = products(lambda x, w: lever.FP8Linear.apply(x, w, bound), x, w, grad)
    _, exact_grad_x, exact_grad_w = products(lambda x, w: x @ w.t(), x, w, grad)
    assert out.dtype == torch.bfloat16 and torch.equal(out, fp8_out)
    assert grad_w.dtype == w.dtype and grad_x.shape == x.shape
    errors = {"x": relative_error(grad_x, exact_grad_x), "w": relative_error(grad_w, exact_grad_w)}
    fp8_errors = {"x": relative_error(fp8_grad_x, exact_grad_x), "w": relative_error(fp8_grad_w, exact_grad_w)}
    for name in errors:
        assert 0 < errors[name] < 0.01 < fp8_errors[name], (errors, fp8_errors)


def test_the_backward_saves_x_and_w_not_float8_copies():
    """Under autocast x arrives in bfloat16: that and the float32 weight are what the backward keeps (FP8Linear keeps
    their float8 copies and scales)."""
    x, w, grad = operands()
    saved = {}
    for function in (lever.FP8ForwardLinear, lever.FP8Linear):
        dtypes = saved.setdefault(function.__name__, [])
        with torch.autograd.graph.saved_tensors_hooks(lambda t: dtypes.append(t.dtype) or t, lambda t: t):
            function.apply(x.to(torch.bfloat16).requires_grad_(), w.clone().requires_grad_(), grad.abs().max())
    assert saved["FP8ForwardLinear"] == [torch.bfloat16, torch.float32]
    assert torch.float8_e4m3fn in saved["FP8Linear"]


def test_bad_values_are_refused():
    with pytest.raises(SystemExit, match="--fp8_head_backward='fp16' is not one of: fp8, bf16"):
        lever.parse_config(["--fp8_head_backward=fp16"])
    assert lever.parse_config(["--fp8_head_backward=bf16"]).fp8_head_backward == "bf16"
