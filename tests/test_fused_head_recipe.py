"""Step 52 turns step 50's fused head loss on by default, with the float8 backward it needs (bench/RESULTS.md
2026-11-26 (j): +6.2% tokens/s on step 51's recipe, the same final val, 1,832 MiB less at peak). Given the old values
back on the command line it is step 51, config for config and loss for loss; the defaults train through the fused
path; the demo and the cards without float8 are told which switches to turn off."""
import dataclasses

import pytest
import torch

from conftest import load_script
from lever_helpers import assert_recipe_defaults, build, train

step = load_script(52)
parent = load_script(51)

RECIPE = dict(fused_head_loss=True, fp8_head_backward="fp8")
OLD = dict(fused_head_loss=False, fp8_head_backward="bf16")


def test_the_defaults_are_the_recipe_and_the_old_values_are_the_parent():
    assert_recipe_defaults(step, parent, RECIPE, OLD)


def test_the_measured_run_is_the_bench_default():
    """RESULTS (j)'s run 51-fused: step 51 with --fused_head_loss=true --fp8_head_backward=fp8 on bench100m."""
    measured = parent.parse_config(["--preset=bench100m", "--fused_head_loss=true", "--fp8_head_backward=fp8"])
    assert dataclasses.asdict(step.parse_config(["--preset=bench100m"])) == dataclasses.asdict(measured)


def test_the_defaults_train_through_the_fused_head_and_the_old_values_as_the_parent():
    model, cfg = build(step, fused_head_loss=OLD["fused_head_loss"], fp8_head_backward=OLD["fp8_head_backward"])
    parent_model, parent_cfg = build(parent)
    assert train(model, cfg, step, 3) == train(parent_model, parent_cfg, parent, 3)
    defaults = {field: getattr(step.Config(), field) for field in RECIPE}
    model, cfg = build(step, **defaults)
    fused = train(model, cfg, step, 8)
    assert fused[-1] < fused[0] - 1.0, fused
    model, cfg = build(step, fused_head_loss=False, fp8_head_backward="fp8")  # the same products, unfused
    unfused = train(model, cfg, step, 8)
    assert fused != unfused and fused == pytest.approx(unfused, abs=0.05)
    model, cfg = build(parent, **defaults)  # step 51 with the switches given: the same run
    assert train(model, cfg, parent, 8) == fused


def test_the_demo_and_cards_without_float8_are_told_every_switch_to_turn_off(monkeypatch):
    demo = step.parse_config(["--preset=demo"])
    assert (demo.fp8_head, demo.fused_head_loss) == (False, False)
    step.check_device(demo, torch.device("mps"))
    with pytest.raises(SystemExit, match="MPS does not have: set --fp8_head=false --fused_head_loss=false$"):
        step.check_device(step.Config(), torch.device("mps"))
    monkeypatch.setattr(step.torch.cuda, "get_device_name", lambda device: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(step.torch.cuda, "get_device_capability", lambda device: (8, 0))
    with pytest.raises(SystemExit, match=r"A100-SXM4-80GB is 8.0: set --fp8_head=false --fused_head_loss=false$"):
        step.check_device(step.Config(), torch.device("cuda", 0))
    with pytest.raises(SystemExit, match="--fused_head_loss is the FP8 head's: set --fp8_head=true, or "
                                         "--fused_head_loss=false"):
        step.parse_config(["--fp8_head=false"])
    cfg = step.parse_config(["--fp8_head=false", "--fused_head_loss=false"])
    step.check_device(cfg, torch.device("mps"))
