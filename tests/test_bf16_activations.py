"""--bf16_activations (step 40, on by default): under autocast the residual stream (the embedding, every block's
input and output) and the value embeddings are in autocast's dtype, bfloat16, where they were float32 like the
weights. Without autocast nothing changes; off, the step is its parent (step 39)."""
import pytest
import torch

from lever_helpers import batch, build, lever_and_parent, train

lever, parent_step = lever_and_parent("bf16_activations")


def stream_dtypes(model, autocast):
    """The dtype of the residual stream entering each block, and of the value embedding it gets (if any)."""
    seen = []
    hooks = [block.register_forward_pre_hook(
        lambda module, args: seen.append((args[0].dtype, None if args[2] is None else args[2].dtype)))
        for block in model.transformer.h]
    x, y = batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(x, y)
    for hook in hooks:
        hook.remove()
    return seen


def test_on_by_default_and_off_is_the_parent():
    assert lever.Config().bf16_activations is True and not hasattr(parent_step.Config, "bf16_activations")
    model, cfg = build(lever, bf16_activations=False)
    parent, parent_cfg = build(parent_step)
    parent_losses = train(parent, parent_cfg, parent_step, 3, autocast=True)
    assert train(model, cfg, lever, 3, autocast=True) == parent_losses
    default, default_cfg = build(lever)
    assert train(default, default_cfg, lever, 3, autocast=True) != parent_losses


def test_under_autocast_the_stream_is_bfloat16():
    on, _ = build(lever, bf16_activations=True)
    off, _ = build(lever, bf16_activations=False)
    assert stream_dtypes(on, autocast=True) == [(torch.bfloat16, torch.bfloat16)] * 2
    assert stream_dtypes(off, autocast=True) == [(torch.float32, torch.float32)] * 2


def test_without_autocast_nothing_changes():
    on, _ = build(lever, bf16_activations=True)
    off, _ = build(lever, bf16_activations=False)
    assert stream_dtypes(on, autocast=False) == [(torch.float32, torch.float32)] * 2
    x, y = batch()
    with torch.no_grad():
        assert torch.equal(on(x, y), off(x, y))


def test_it_trains_and_follows_the_float32_stream():
    model, cfg = build(lever, bf16_activations=True)
    bf16 = train(model, cfg, lever, 8, autocast=True)
    model, cfg = build(lever, bf16_activations=False)
    fp32 = train(model, cfg, lever, 8, autocast=True)
    assert bf16[-1] < bf16[0] - 0.5
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, abs=0.1)
