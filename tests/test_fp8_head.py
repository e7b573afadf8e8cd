"""--fp8_head (step 39, on by default): in training, the LM head's logits and both of its gradients come
from float8 products (torch._scaled_mm, which runs on the CPU too) with per-tensor scales. They stay within
float8's rounding of the exact products, training still lowers the loss, evaluation keeps the exact head, and
off the step is its parent (step 38)."""
import pytest
import torch

from lever_helpers import batch, build, lever_and_parent, train

lever, parent_step = lever_and_parent("fp8_head")


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_on_by_default_and_off_is_the_parent():
    assert lever.Config().fp8_head is True and not hasattr(parent_step.Config, "fp8_head")
    model, cfg = build(lever, fp8_head=False)
    parent, parent_cfg = build(parent_step)
    parent_losses = train(parent, parent_cfg, parent_step, 3)
    assert train(model, cfg, lever, 3) == parent_losses
    default, default_cfg = build(lever)
    assert train(default, default_cfg, lever, 3) != parent_losses


def test_products_are_the_exact_ones_to_float8_rounding():
    """Forward e4m3 x e4m3 and backward e5m2 gradients: within a few % of the float32 products (float8 keeps 3
    or 2 mantissa bits), not equal to them (the switch does something), the weight's gradient in its dtype."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=generator, requires_grad=True)
    w = (0.02 * torch.randn(48, 32, generator=generator)).requires_grad_()
    grad = torch.randn(64, 48, generator=generator)
    out = lever.FP8Linear.apply(x, w, grad.abs().max())
    out.backward(grad)
    exact_x, exact_w = x.detach().requires_grad_(), w.detach().requires_grad_()
    exact = exact_x @ exact_w.t()
    exact.backward(grad)
    assert out.dtype == torch.bfloat16 and w.grad.dtype == w.dtype and x.grad.shape == x.shape
    assert 0 < relative_error(out, exact) < 0.06
    assert 0 < relative_error(x.grad, exact_x.grad) < 0.12
    assert 0 < relative_error(w.grad, exact_w.grad) < 0.12


def test_scales_use_the_whole_range_and_never_overflow():
    t = torch.tensor([[0.001, -3.0], [2.0, 0.5]])
    t8, scale = lever.to_float8(t, torch.float8_e4m3fn)
    assert t8.dtype == torch.float8_e4m3fn and t8.float().abs().max() == 448.0
    torch.testing.assert_close(t8.float() * scale, t, rtol=0.07, atol=1e-3)
    zeros8, zero_scale = lever.to_float8(torch.zeros(2, 2), torch.float8_e5m2)
    assert torch.count_nonzero(zeros8.float()) == 0 and zero_scale > 0  # no division by zero


def test_a_gradient_past_its_bound_saturates_instead_of_overflowing():
    t = torch.tensor([[1.0, -4.0], [0.5, 100.0]])
    t8, scale = lever.to_float8(t, torch.float8_e5m2, torch.tensor(2.0))
    largest = torch.finfo(torch.float8_e5m2).max
    assert torch.isfinite(t8.float()).all() and t8.float().abs().max() == largest
    assert (t8.float() * scale)[0, 0] == 1.0 and (t8.float() * scale)[1, 1] == 2.0  # clipped at the bound


def test_the_models_gradient_bound_holds_and_is_tight(monkeypatch):
    """GPT.forward scales the head's gradient by 1 / (scored targets): every logit's gradient is within it (a bound
    that did not hold would clip gradients), and the largest is close to it (a loose one would waste float8's range)."""
    seen = {}
    original = lever.FP8Linear.apply

    def spy(x, w, grad_bound):
        out = original(x, w, grad_bound)
        seen["bound"] = grad_bound
        out.register_hook(lambda grad: seen.setdefault("grad", grad))
        return out
    monkeypatch.setattr(lever.FP8Linear, "apply", spy)
    for pad_token, scored in ((-1, 64), (5, None)):
        seen.clear()
        model, cfg = build(lever, fp8_head=True, logit_softcap=15.0, pad_token=pad_token)
        x, y = batch()
        if scored is None:
            y[:, :8] = pad_token  # 16 targets not scored
            scored = int((y != pad_token).sum())
        model(x, y).backward()
        assert seen["bound"].item() == pytest.approx(1 / scored)
        largest = seen["grad"].abs().max().item()
        assert 0.5 * seen["bound"].item() < largest <= seen["bound"].item()


def test_training_uses_it_and_evaluation_does_not(monkeypatch):
    calls = []
    original = lever.FP8Linear.apply
    monkeypatch.setattr(lever.FP8Linear, "apply", lambda *a: calls.append(1) or original(*a))
    model, cfg = build(lever, fp8_head=True)
    losses = train(model, cfg, lever, 8)
    assert len(calls) == 8 and losses[-1] < losses[0] - 0.5
    calls.clear()
    model.eval()
    x, y = batch()
    with torch.no_grad():
        exact, _ = build(lever, fp8_head=False)
        exact.load_state_dict(model.state_dict())
        exact.eval()
        assert torch.equal(model(x, y), exact(x, y))
    assert not calls


def test_fp8_losses_follow_the_exact_ones():
    model, cfg = build(lever, fp8_head=True)
    fp8 = train(model, cfg, lever, 6)
    model, cfg = build(lever, fp8_head=False)
    exact = train(model, cfg, lever, 6)
    assert fp8 != exact and fp8 == pytest.approx(exact, abs=0.05)


def test_shapes_float8_cannot_tile_are_refused():
    with pytest.raises(SystemExit, match="--fp8_head needs --n_embd, --vocab_size and --block_size multiples of 16"):
        lever.parse_config(["--fp8_head=true", "--vocab_size=50257"])
    assert lever.parse_config(["--fp8_head=true"]).fp8_head is True


def test_cards_without_float8_are_refused_before_any_gpu_work(monkeypatch):
    """On an Ampere card (8.0) or MPS the default fails at once and names the fix; Hopper (9.0) and the CPU pass."""
    monkeypatch.setattr(lever.torch.cuda, "get_device_name", lambda device: "NVIDIA A100-SXM4-80GB")
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(lever.torch.cuda, "get_device_capability", lambda device: (8, 0))
    with pytest.raises(SystemExit, match=r"--fp8_head needs float8 matmuls .* A100-SXM4-80GB is 8.0: set --fp8_head=false"):
        lever.check_device(lever.Config(), cuda)
    lever.check_device(lever.Config(fp8_head=False), cuda)
    monkeypatch.setattr(lever.torch.cuda, "get_device_capability", lambda device: (9, 0))
    lever.check_device(lever.Config(), cuda)
    lever.check_device(lever.Config(), torch.device("cpu"))
    with pytest.raises(SystemExit, match="--fp8_head needs float8 matmuls, which MPS does not have"):
        lever.check_device(lever.Config(), torch.device("mps"))
