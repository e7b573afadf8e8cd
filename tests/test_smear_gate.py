"""--smear_gate=N (step 60, off by default): each token's embedding plus lambda * sigmoid(w . its first N channels)
times the previous token's embedding, w and lambda learned from 0. Off, the step is its parent bit for bit; on, the
model starts as its parent and then learns to smear; token t takes in token t-1 alone, never a later token; AdamW
trains both weights; a width out of range is refused."""
import pytest
import torch

from conftest import script_number, step_adding
from lever_helpers import batch, build, lever_and_parent, train

lever, parent_step = lever_and_parent("smear_gate")
LEVER_SCRIPT = step_adding("smear_gate")


def embeddings(model, idx):
    """What the first block receives for `idx` (the residual stream's start)."""
    seen = []
    handle = model.transformer.h[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(idx)
    handle.remove()
    return seen[0]


def test_off_by_default_is_the_parent_and_on_starts_as_it_then_learns():
    assert lever.Config().smear_gate == 0
    assert not hasattr(parent_step.Config, "smear_gate")
    assert f"    {script_number(LEVER_SCRIPT)}  --smear_gate=N" in lever.__doc__
    model, cfg = build(lever)
    parent, parent_cfg = build(parent_step)
    parent_losses = train(parent, parent_cfg, parent_step, 4)
    assert train(model, cfg, lever, 4) == parent_losses
    smear, smear_cfg = build(lever, smear_gate=12)
    # the same seed draws the same other weights: the gate is made last, and starts as no smear at all
    off, _ = build(lever)
    assert all(torch.equal(p, smear.state_dict()[k]) for k, p in off.state_dict().items())
    losses = train(smear, smear_cfg, lever, 8)
    assert losses[0] == parent_losses[0]
    assert losses[1:4] != parent_losses[1:] and losses[-1] < losses[0] - 0.5
    assert smear.smear_lambda.item() != 0 and smear.smear.weight.abs().sum().item() > 0


def test_token_t_takes_in_token_t_minus_1_by_its_own_gate_and_nothing_later():
    model, cfg = build(lever, smear_gate=12)
    with torch.no_grad():
        model.smear_lambda.fill_(0.7)
        model.smear.weight.normal_()
    idx = batch()[0]
    x = embeddings(model, idx)
    e = model.transformer.wte(idx).detach()
    gate = 0.7 * torch.sigmoid(e[:, 1:, :12] @ model.smear.weight.detach().T)
    assert torch.allclose(x[:, 0], e[:, 0])  # the first token has no previous one
    assert torch.allclose(x[:, 1:], e[:, 1:] + gate * e[:, :-1], atol=1e-6)
    later = idx.clone()
    later[:, 10] = (later[:, 10] + 1) % cfg.vocab_size  # token 10 changed: positions 10 and 11 see it, no other
    changed = (embeddings(model, later) != x).any(dim=-1)
    assert changed[:, 10:12].all() and not changed[:, :10].any() and not changed[:, 12:].any()


def test_adamw_trains_the_gate_and_lambda():
    model, cfg = build(lever, smear_gate=12, optimizer="muon")
    muon = {id(p) for p in lever.muon_params(model)}
    assert id(model.smear.weight) not in muon and id(model.smear_lambda) not in muon
    optimizer = lever.configure_optimizer(model, cfg, "cpu")
    adamw = optimizer.optimizers[0] if hasattr(optimizer, "optimizers") else optimizer
    in_adamw = {id(p) for group in adamw.param_groups for p in group["params"]}
    assert {id(model.smear.weight), id(model.smear_lambda)} <= in_adamw


@pytest.mark.parametrize("width", [-1, 65])
def test_a_width_out_of_range_is_refused(width):
    with pytest.raises(SystemExit, match=rf"--smear_gate={width} must be between 0 \(off\) and --n_embd=64"):
        lever.check_config(lever.Config(**{**dict(n_embd=64, n_head=2), "smear_gate": width}))
