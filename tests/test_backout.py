"""--backout_layer=N (step 61, block 8 by default): the head reads the last block's output less lambda times the
stream after block N, lambda learned from 0.5. Off (-1), the step is its parent bit for bit; on, step 0's loss is the
parent's (every block adds 0 at the start, and ln_f does not see the scale) and then it learns differently; the head
gets exactly x - lambda * x_N; AdamW trains lambda, undecayed; a block out of range is refused."""
import pytest
import torch

from conftest import script_number, step_adding
from lever_helpers import batch, build, lever_and_parent, train

lever, parent_step = lever_and_parent("backout_layer")
LEVER_SCRIPT = step_adding("backout_layer")


def test_on_by_default_off_is_the_parent_and_on_starts_as_it_then_learns():
    assert lever.Config().backout_layer == 8 and lever.Config().n_layer == 12
    assert lever.parse_config(["--preset=demo"]).backout_layer == 2  # the demo's 4 blocks
    assert not hasattr(parent_step.Config, "backout_layer")
    assert f"    {script_number(LEVER_SCRIPT)}  --backout_layer=8 by default" in lever.__doc__
    model, cfg = build(lever, backout_layer=-1)
    parent, parent_cfg = build(parent_step)
    parent_losses = train(parent, parent_cfg, parent_step, 4)
    assert train(model, cfg, lever, 4) == parent_losses
    backout, backout_cfg = build(lever, backout_layer=0)
    losses = train(backout, backout_cfg, lever, 8)
    assert losses[0] == pytest.approx(parent_losses[0], abs=1e-4)  # ln_f's epsilon sees the half-size input
    assert losses[1:4] != parent_losses[1:] and losses[-1] < losses[0] - 0.5
    assert backout.backout_lambda.item() != 0.5


def test_the_head_reads_the_last_output_less_lambda_times_block_n_output():
    model, cfg = build(lever, n_layer=3, backout_layer=1)
    train(model, cfg, lever, 2)  # the blocks add something
    with torch.no_grad():
        model.backout_lambda.fill_(0.3)
    outputs, heads = [], []
    hooks = [block.register_forward_hook(lambda module, args, out: outputs.append(out.detach()))
             for block in model.transformer.h]
    hooks.append(model.transformer.ln_f.register_forward_pre_hook(lambda module, args: heads.append(args[0].detach())))
    with torch.no_grad():
        model(batch()[0])
    for hook in hooks:
        hook.remove()
    assert torch.allclose(heads[0], outputs[2] - 0.3 * outputs[1], atol=1e-6)
    assert not torch.allclose(heads[0], outputs[2], atol=1e-3)


def test_adamw_trains_lambda_undecayed():
    model, cfg = build(lever, backout_layer=0, optimizer="muon")
    assert id(model.backout_lambda) not in {id(p) for p in lever.muon_params(model)}
    optimizer = lever.configure_optimizer(model, cfg, "cpu")
    adamw = optimizer.optimizers[0] if hasattr(optimizer, "optimizers") else optimizer
    undecayed = [p for group in adamw.param_groups if group["weight_decay"] == 0 for p in group["params"]]
    assert any(p is model.backout_lambda for p in undecayed)


@pytest.mark.parametrize("layer", [-2, 1, 5])
def test_a_block_out_of_range_is_refused(layer):
    with pytest.raises(SystemExit, match=rf"--backout_layer={layer} must be -1 \(off\) or a block before the last, "
                                         r"0 to 0 with --n_layer=2"):
        lever.check_config(lever.Config(n_layer=2, n_embd=64, n_head=2, backout_layer=layer))
