"""--zero_init_projections (step 41, on by default): the attention's and the MLP's output projections start
at zero, so every block starts as the identity on the residual stream; everything else starts as in the parent.
Off, the step is its parent (step 40)."""
import torch

from lever_helpers import TINY, batch, build, lever_and_parent, train

lever, parent_step = lever_and_parent("zero_init_projections")


def projections(model):
    return {name for name, module in model.named_modules() if getattr(module, "residual_projection", False)}


def test_on_by_default_and_off_is_the_parent():
    assert lever.Config().zero_init_projections is True and not hasattr(parent_step.Config, "zero_init_projections")
    default, _ = build(lever)
    assert all(torch.count_nonzero(module.weight) == 0 for name, module in default.named_modules()
               if name in projections(default))
    model, cfg = build(lever, zero_init_projections=False)
    parent, parent_cfg = build(parent_step)
    assert train(model, cfg, lever, 3) == train(parent, parent_cfg, parent_step, 3)


def test_only_the_output_projections_start_at_zero():
    on, _ = build(lever, zero_init_projections=True)
    off, _ = build(lever, zero_init_projections=False)
    zeroed = {f"{name}.weight" for name in projections(on)}
    assert len(zeroed) == 2 * TINY["n_layer"]
    for (name, a), (_, b) in zip(on.named_parameters(), off.named_parameters()):
        if name in zeroed:
            assert torch.count_nonzero(a) == 0 and torch.count_nonzero(b) > 0, name
        else:
            assert torch.equal(a, b), name  # the same random draws: only the projections differ


def test_every_block_starts_as_the_identity():
    model, _ = build(lever, zero_init_projections=True, x0_mixing=True)
    changes = []
    hooks = [block.register_forward_hook(lambda module, args, out: changes.append((out - args[0]).abs().max()))
             for block in model.transformer.h]
    x, y = batch()
    with torch.no_grad():
        model(x, y)
    for hook in hooks:
        hook.remove()
    assert changes == [0.0] * TINY["n_layer"]


def test_it_trains_and_the_branches_move_from_the_second_step():
    model, cfg = build(lever, zero_init_projections=True)
    qkv = model.transformer.h[0].attn.c_attn.weight
    start = qkv.detach().clone()
    moved = []
    losses = train(model, cfg, lever, 8, after_step=lambda step: moved.append(not torch.equal(qkv, start)))
    # step 1: a zero projection passes no gradient to the attention below it; from step 2 on it does
    assert moved[:2] == [False, True]
    assert losses[-1] < losses[0] - 0.5
