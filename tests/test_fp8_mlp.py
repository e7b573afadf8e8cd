"""--fp8_mlp (step 55, full by default): in training, each MLP's two matrix products go through float8 (e4m3 operands,
torch._scaled_mm, which runs on the CPU too), each operand scaled by its own largest entry. `forward` quantizes the
forward's products and keeps the backward's in bf16 from the saved x and w; `full` quantizes the backward's too
(e5m2 gradient). Both share the forward bit for bit, only `full` changes the gradients, the losses follow the exact
ones, evaluation keeps the exact products, shapes float8 cannot tile and cards without float8 are refused before
any GPU work, and off the step is its parent (step 54). The demo preset (CPUs, MPS) keeps it off."""
import pytest
import torch

from lever_helpers import (assert_float8_evaluates_exactly, assert_float8_trains_like_exact, batch, build,
                           float8_products_per_mode, lever_and_parent, train)

lever, parent_step = lever_and_parent("fp8_mlp")
# zero-initialized output projections would make every MLP's first output 0, whatever its products' precision
MLP_ON = dict(zero_init_projections=False)


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def loss_and_gradients(mode, seed=0):
    """The first loss of a tiny model with --fp8_mlp=mode and the gradients of its MLP weights."""
    model, _ = build(lever, seed=seed, fp8_mlp=mode, **MLP_ON)
    x, y = batch()
    loss = model(x, y)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if ".mlp." in name}
    return loss.item(), grads


def test_full_by_default_and_off_is_the_parent():
    assert lever.Config().fp8_mlp == "full" and not hasattr(parent_step.Config, "fp8_mlp")
    assert lever.parse_config(["--preset=demo"]).fp8_mlp == "off"
    model, cfg = build(lever, fp8_mlp="off", **MLP_ON)
    parent, parent_cfg = build(parent_step, **MLP_ON)
    parent_losses = train(parent, parent_cfg, parent_step, 3)
    assert train(model, cfg, lever, 3) == parent_losses
    default, default_cfg = build(lever, **MLP_ON)
    assert train(default, default_cfg, lever, 3) != parent_losses


def test_every_mlp_product_is_float8_in_training_and_none_in_evaluation(monkeypatch):
    """Per forward, each block's MLP adds two float8 products; `full` adds its backward's four; evaluation none."""
    counts, cfg = float8_products_per_mode(lever, monkeypatch, "fp8_mlp", **MLP_ON)
    blocks = cfg.n_layer
    assert counts["forward"] - counts["off"] == 2 * blocks
    assert counts["full"] - counts["off"] == 6 * blocks


def test_both_modes_share_the_forward_and_only_full_quantizes_the_gradients():
    exact_loss, exact = loss_and_gradients("off")
    forward_loss, forward = loss_and_gradients("forward")
    full_loss, full = loss_and_gradients("full")
    assert forward_loss == full_loss != exact_loss
    assert forward_loss == pytest.approx(exact_loss, abs=0.01)
    for name in exact:
        assert not torch.equal(full[name], forward[name]), name
        # bf16 backward products from the float8 forward: close to the exact gradients; e5m2 ones less so
        assert relative_error(forward[name], exact[name]) < 0.1, name
        assert 0 < relative_error(full[name], exact[name]) < 0.25, name


def test_evaluation_keeps_the_exact_products():
    assert_float8_evaluates_exactly(lever, "fp8_mlp", **MLP_ON)


@pytest.mark.parametrize("mode", ["forward", "full"])
def test_fp8_losses_follow_the_exact_ones(mode):
    assert_float8_trains_like_exact(lever, "fp8_mlp", mode, **MLP_ON)


def test_gated_mlps_and_biases_go_through_it_too():
    for overrides in (dict(activation="swiglu"), dict(bias=True)):
        model, cfg = build(lever, fp8_mlp="full", **MLP_ON, **overrides)
        fp8 = train(model, cfg, lever, 4)
        model, cfg = build(lever, fp8_mlp="off", **MLP_ON, **overrides)
        exact = train(model, cfg, lever, 4)
        assert fp8 != exact and fp8 == pytest.approx(exact, abs=0.05), overrides


def test_bad_values_and_shapes_float8_cannot_tile_are_refused():
    with pytest.raises(SystemExit, match="--fp8_mlp='on' is not one of: off, forward, full"):
        lever.parse_config(["--fp8_mlp=on"])
    with pytest.raises(SystemExit, match=r"--fp8_mlp needs --n_embd, its MLP width .* not 768, 3079.68, 8192"):
        lever.parse_config(["--fp8_mlp=full", "--mlp_ratio=4.01"])
    assert lever.parse_config(["--mlp_ratio=4.01", "--fp8_mlp=off"]).fp8_mlp == "off"
    assert lever.parse_config(["--fp8_mlp=forward"]).fp8_mlp == "forward"


def test_cards_without_float8_are_refused_before_any_gpu_work(monkeypatch):
    """On an Ampere card (8.0) or MPS it fails at once and names the fix; Hopper (9.0) and the CPU pass."""
    monkeypatch.setattr(lever.torch.cuda, "get_device_name", lambda device: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(lever.torch.cuda, "get_device_capability", lambda device: (8, 0))
    cuda = torch.device("cuda", 0)
    no_head = dict(fp8_head=False, fused_head_loss=False)
    with pytest.raises(SystemExit, match=r"--fp8_mlp needs float8 matmuls .* A100-SXM4-80GB is 8.0: set --fp8_mlp=off"):
        lever.check_device(lever.Config(**no_head), cuda)
    lever.check_device(lever.Config(fp8_mlp="off", **no_head), cuda)
    with pytest.raises(SystemExit, match="--fp8_mlp needs float8 matmuls, which MPS does not have: set --fp8_mlp=off"):
        lever.check_device(lever.Config(fp8_mlp="forward", **no_head), torch.device("mps"))
    # the defaults ask float8 of the head and the MLPs: one message names both, and the whole fix
    with pytest.raises(SystemExit, match=r"--fp8_head and --fp8_mlp need float8 matmuls .* is 8.0: "
                                         r"set --fp8_head=false --fused_head_loss=false --fp8_mlp=off$"):
        lever.check_device(lever.Config(), cuda)
    monkeypatch.setattr(lever.torch.cuda, "get_device_capability", lambda device: (9, 0))
    lever.check_device(lever.Config(fp8_mlp="full"), cuda)
    lever.check_device(lever.Config(fp8_mlp="full"), torch.device("cpu"))
