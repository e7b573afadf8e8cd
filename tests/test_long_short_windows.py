"""--long_window_layers (step 46, off: it trades loss for speed): the listed blocks attend over the window, the
others over half of it (whole 128-token blocks with window_unit=block, at least one), with a second mask built once
per forward; the half follows a window the schedule changes in place; bad lists fail early; empty, the step is its
parent (step 45)."""
import pytest
import torch

from lever_helpers import batch, build, lever_and_parent, train

lever, parent_step = lever_and_parent("long_window_layers")
WINDOWED = dict(window=8, window_unit="token")  # T = 32: token windows, the dense-mask (SDPA) path of the CPU


def test_off_by_default_and_off_is_the_parent():
    assert lever.Config().long_window_layers == "" and not hasattr(parent_step.Config, "long_window_layers")
    model, cfg = build(lever, **WINDOWED)
    parent, parent_cfg = build(parent_step, **WINDOWED)
    assert train(model, cfg, lever, 3) == train(parent, parent_cfg, parent_step, 3)


def test_listed_blocks_get_the_window_and_the_others_half(monkeypatch):
    model, cfg = build(lever, long_window_layers="1", **WINDOWED)
    seen = {}
    for layer, block in enumerate(model.transformer.h):
        def spy(x, mask=None, value_embedding=None, x0=None, layer=layer, forward=block.forward):
            seen[layer] = mask
            return forward(x, mask, value_embedding, x0)
        monkeypatch.setattr(block, "forward", spy)
    x, _ = batch()
    model(x)
    for layer, width in ((0, 4), (1, 8)):
        expected = lever.dense_mask(lever.mask_function(cfg, x, torch.tensor(width)), 1, 32, x.device)
        assert torch.equal(seen[layer], expected)
    assert not torch.equal(seen[0], seen[1])


@pytest.mark.parametrize("unit, window, short, short_of_twice", [
    ("block", 1792, 896, 1792), ("block", 1280, 640, 1280), ("block", 384, 128, 384), ("block", 128, 128, 128),
    ("token", 9, 4, 9), ("token", 1, 1, 1)])
def test_the_short_window_is_half_in_whole_blocks(unit, window, short, short_of_twice):
    model, _ = build(lever, window=window, window_unit=unit, long_window_layers="0")
    assert model.short_window().item() == short
    model.window.fill_(2 * window)  # the schedule fills the window in place: the half follows
    assert model.short_window().item() == short_of_twice


def test_training_with_short_windows_differs_and_learns():
    model, cfg = build(lever, long_window_layers="0", **WINDOWED)
    losses = train(model, cfg, lever, 8)
    model, cfg = build(lever, **WINDOWED)
    assert losses != train(model, cfg, lever, 8) and losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize("value, message", [
    ("0,x", "--long_window_layers='0,x' must list block indices 0..7 separated by commas, e.g. 0,4,7"),
    ("8", "--long_window_layers='8' must list block indices 0..7"),
    ("0,,1", "--long_window_layers='0,,1' must list block indices")])
def test_bad_lists_fail_early(value, message):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)")):
        lever.parse_config([f"--long_window_layers={value}"])
    with pytest.raises(SystemExit, match="--window=0 has no width"):
        lever.parse_config(["--long_window_layers=0", "--window=0", "--window_ramp=false"])
    assert lever.parse_config(["--long_window_layers=0,3,7"]).long_window_layers == "0,3,7"
