"""--fp8_attention (step 58, full by default: RESULTS 2026-11-26 (m)): in training, each attention's q, k, v projection and its output
projection go through step 55's float8 products (forward: the forward's only; full: the backward's too). Off, the
step is its parent (step 57); on, exactly those two products per attention block become float8 (none in the
attention-free blocks, none in evaluation), the losses follow the exact ones, and bad values, untileable shapes and
cards without float8 are refused before any GPU work."""
import pytest
import torch

from lever_helpers import (assert_float8_evaluates_exactly, assert_float8_trains_like_exact, build,
                           float8_products_per_mode, lever_and_parent, train)

lever, parent_step = lever_and_parent("fp8_attention")
# the MLPs exact, so that every float8 product counted here is the attention's; output projections not zero at first
ATTENTION_ONLY = dict(fp8_mlp="off", zero_init_projections=False)


def test_full_by_default_and_off_is_the_parent():
    assert lever.Config().fp8_attention == "full" and not hasattr(parent_step.Config, "fp8_attention")
    assert lever.parse_config(["--preset=demo"]).fp8_attention == "off"
    model, cfg = build(lever, fp8_attention="off", **ATTENTION_ONLY)
    parent, parent_cfg = build(parent_step, **ATTENTION_ONLY)
    parent_losses = train(parent, parent_cfg, parent_step, 3)
    assert train(model, cfg, lever, 3) == parent_losses
    on, on_cfg = build(lever, fp8_attention="full", **ATTENTION_ONLY)
    assert train(on, on_cfg, lever, 3) != parent_losses


@pytest.mark.parametrize("free", ["", "1"])
def test_each_attention_block_adds_its_two_products_in_training_and_none_in_evaluation(monkeypatch, free):
    counts, cfg = float8_products_per_mode(lever, monkeypatch, "fp8_attention", attention_free_layers=free,
                                           **ATTENTION_ONLY)
    attending = cfg.n_layer - (1 if free else 0)
    assert counts["forward"] - counts["off"] == 2 * attending  # the head's own products are in all three
    assert counts["full"] - counts["off"] == 6 * attending


@pytest.mark.parametrize("mode", ["forward", "full"])
def test_fp8_losses_follow_the_exact_ones(mode):
    assert_float8_trains_like_exact(lever, "fp8_attention", mode, **ATTENTION_ONLY)


def test_evaluation_keeps_the_exact_products():
    assert_float8_evaluates_exactly(lever, "fp8_attention", **ATTENTION_ONLY)


def test_bad_values_and_shapes_float8_cannot_tile_are_refused():
    with pytest.raises(SystemExit, match="--fp8_attention='on' is not one of: off, forward, full"):
        lever.parse_config(["--fp8_attention=on"])
    # 64 heads of 12, one key/value head: a key/value width of 12, not a multiple of 16
    with pytest.raises(SystemExit, match=r"--fp8_attention needs .* not 768, 12, 8192; .* --fp8_attention=off"):
        lever.parse_config(["--fp8_attention=full", "--n_head=64", "--n_kv_head=1"])
    assert lever.parse_config(["--fp8_attention=forward"]).fp8_attention == "forward"


def test_cards_without_float8_are_refused_before_any_gpu_work(monkeypatch):
    monkeypatch.setattr(lever.torch.cuda, "get_device_name", lambda device: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(lever.torch.cuda, "get_device_capability", lambda device: (8, 0))
    cuda = torch.device("cuda", 0)
    others_off = dict(fp8_head=False, fused_head_loss=False, fp8_mlp="off")
    with pytest.raises(SystemExit, match=r"--fp8_attention needs float8 matmuls .* 8.0: set --fp8_attention=off"):
        lever.check_device(lever.Config(fp8_attention="full", **others_off), cuda)
    lever.check_device(lever.Config(fp8_attention="off", **others_off), cuda)
    with pytest.raises(SystemExit, match="--fp8_attention needs float8 matmuls, which MPS does not have"):
        lever.check_device(lever.Config(fp8_attention="forward", **others_off), torch.device("mps"))
    # step 58's defaults ask float8 of the head, the MLPs and the attention: one message, one rerun fixes all three
    fix = "--fp8_head=false --fused_head_loss=false --fp8_mlp=off --fp8_attention=off"
    with pytest.raises(SystemExit, match=rf"--fp8_head and --fp8_mlp and --fp8_attention need .* set {fix}$"):
        lever.check_device(lever.Config(), cuda)
    with pytest.raises(SystemExit, match=rf"which MPS does not have: set {fix}$"):
        lever.check_device(lever.Config(), torch.device("mps"))
    off = dict(a.split("=") for a in fix.replace("--", "").split())
    lever.check_device(lever.parse_config([f"--{k}={v}" for k, v in off.items()]), cuda)  # the fix is enough
    monkeypatch.setattr(lever.torch.cuda, "get_device_capability", lambda device: (9, 0))
    lever.check_device(lever.Config(fp8_attention="full"), cuda)
