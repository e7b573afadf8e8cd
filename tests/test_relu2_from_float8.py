"""--relu2_from_float8 (step 66): with --fp8_mlp=full and ReLU², the MLP's backward reads relu(h) as the root of the
float8 copy of relu(h)^2 that its second product keeps anyway, so h itself (bf16, as wide as the MLP) is not kept.
The forward is step 65's bit for bit, only the gradients move (and stay close), what the backward keeps shrinks by
what it claims, eager and compiled, evaluation keeps the exact products, and off the step is its parent."""
import pytest
import torch

from lever_helpers import REAL_COMPILE, assert_float8_evaluates_exactly, batch, build, lever_and_parent, train

lever, parent_step = lever_and_parent("relu2_from_float8")
# zero-initialized output projections would make every MLP's first output 0, and its backward trivial
MLP_ON = dict(zero_init_projections=False, fp8_mlp="full")


def mlp_gradients(model):
    return {name: p.grad for name, p in model.named_parameters() if ".mlp." in name}


def first_loss_and_gradients(on, autocast=False):
    model, _ = build(lever, relu2_from_float8=on, **MLP_ON)
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(x, y)
    loss.backward()
    return loss.item(), mlp_gradients(model), model


def saved_bytes_per_token(model, forward, tokens):
    """Bytes a token of what autograd keeps for the backward of one forward (saved-tensor hooks), counting only the
    tensors that grow with the tokens."""
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        forward(model)
    return sum(t.numel() * t.element_size() for t in kept if tokens in t.shape) / tokens


def test_off_by_default_and_off_is_the_parent():
    assert lever.Config().relu2_from_float8 is False and not hasattr(parent_step.Config, "relu2_from_float8")
    model, cfg = build(lever, **MLP_ON)
    parent, parent_cfg = build(parent_step, **MLP_ON)
    assert train(model, cfg, lever, 3) == train(parent, parent_cfg, parent_step, 3)


@pytest.mark.parametrize("autocast", [False, True])
def test_the_forward_is_the_same_and_only_the_gradients_move(autocast):
    off_loss, off, _ = first_loss_and_gradients(False, autocast)
    on_loss, on, model = first_loss_and_gradients(True, autocast)
    assert on_loss == off_loss
    last = f"transformer.h.{len(model.transformer.h) - 1}.mlp.c_proj.weight"
    assert last in on
    for name in on:
        error = ((on[name].float() - off[name].float()).norm() / off[name].float().norm()).item()
        if name == last:  # the last block's second product meets the gradient before any 2 relu(h) does
            assert error == 0, (name, error)
        else:  # the rest come through some block's 2 relu(h): now the float8 root's
            assert 0 < error < 0.1, (name, error)


def test_it_trains_like_the_exact_backward():
    model, cfg = build(lever, relu2_from_float8=True, **MLP_ON)
    on = train(model, cfg, lever, 8, autocast=True)
    model, cfg = build(lever, **MLP_ON)
    off = train(model, cfg, lever, 8, autocast=True)
    assert on != off and on == pytest.approx(off, abs=0.05)
    assert on[-1] < on[0] - 0.5


def test_the_backward_keeps_one_byte_less_a_hidden_unit_and_token_compiled():
    """Inductor's partition of the compiled step: step 65 keeps h (bf16) and remakes the float8 copy from it; on, only
    the float8 copy (1 byte) is kept. So the kept bytes a token fall by the MLPs' hidden units, once each."""
    x, y = batch()
    kept = {}
    for on in (False, True):
        model, cfg = build(lever, relu2_from_float8=on, **MLP_ON)
        compiled = REAL_COMPILE(model, backend="inductor")

        def forward(m):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return compiled(x, y)

        kept[on] = saved_bytes_per_token(compiled, forward, x.numel())
    hidden = round(cfg.mlp_ratio * cfg.n_embd)
    assert kept[False] - kept[True] == pytest.approx(cfg.n_layer * hidden, abs=cfg.n_embd)


def test_eager_keeps_no_bf16_tensor_as_wide_as_the_mlp():
    """Eager, step 65 keeps relu(h) in bf16 for ReLU²'s backward besides the float8 copy; on, only the copy."""
    x, y = batch()
    for on in (False, True):
        model, cfg = build(lever, relu2_from_float8=on, **MLP_ON)
        hidden = round(cfg.mlp_ratio * cfg.n_embd)
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(x, y)
        wide = {t.dtype for t in kept if t.dim() and t.shape[-1] == hidden and t.numel() == x.numel() * hidden}
        assert wide == ({torch.float8_e4m3fn} if on else {torch.float8_e4m3fn, torch.bfloat16}), on


def test_evaluation_keeps_the_exact_products():
    """Trained with it (and the float8 MLP), the model evaluates as the same weights through exact products."""
    assert_float8_evaluates_exactly(lever, "fp8_mlp", zero_init_projections=False, relu2_from_float8=True)


def test_it_needs_the_float8_mlp_and_relu2():
    assert lever.parse_config(["--relu2_from_float8=true"]).relu2_from_float8 is True
    with pytest.raises(SystemExit, match=r"--relu2_from_float8 .* needs --fp8_mlp=full and --activation=relu2, not "
                                         r"forward and relu2; set them, or --relu2_from_float8=false"):
        lever.parse_config(["--relu2_from_float8=true", "--fp8_mlp=forward"])
    with pytest.raises(SystemExit, match="not full and gelu"):
        lever.parse_config(["--relu2_from_float8=true", "--activation=gelu"])
    assert lever.parse_config(["--preset=demo"]).relu2_from_float8 is False


def test_a_card_without_float8_gets_the_whole_fix_in_one_message(monkeypatch):
    monkeypatch.setattr(lever.torch.cuda, "get_device_name", lambda device: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(lever.torch.cuda, "get_device_capability", lambda device: (8, 0))
    cfg = lever.parse_config(["--relu2_from_float8=true", "--fp8_head=false", "--fused_head_loss=false",
                              "--fp8_attention=off"])
    with pytest.raises(SystemExit, match=r"--fp8_mlp needs float8 matmuls .*: set --fp8_mlp=off "
                                         r"--relu2_from_float8=false$"):
        lever.check_device(cfg, torch.device("cuda", 0))
    fixed = lever.parse_config(["--fp8_head=false", "--fused_head_loss=false", "--fp8_attention=off", "--fp8_mlp=off"])
    lever.check_device(fixed, torch.device("cuda", 0))
