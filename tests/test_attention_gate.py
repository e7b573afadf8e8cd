"""--attention_gate=N (candidate step 49, off until measured): each head's output is multiplied, token by token, by
sigmoid(W x[..., :N]) of the attention's input (record #28: N = 12), W learned from 0 (every gate 1/2 at the start)
and trained by AdamW, not Muon; a width outside 0..n_embd is refused early; 0, the step is its parent (step 48)."""
import pytest
import torch

from lever_helpers import batch, build, lever_and_parent, train

lever, parent_step = lever_and_parent("attention_gate")


def test_off_by_default_and_off_is_the_parent():
    assert lever.Config().attention_gate == 0 and not hasattr(parent_step.Config, "attention_gate")
    model, cfg = build(lever)
    parent, parent_cfg = build(parent_step)
    assert list(model.state_dict()) == list(parent.state_dict())
    assert train(model, cfg, lever, 3) == train(parent, parent_cfg, parent_step, 3)


def test_each_head_is_scaled_by_its_own_gate():
    """The same attention with and without the gate: from 0 the output is halved; with a gate map set by hand,
    head h's slice of the product before c_proj is scaled by sigmoid(W[h] . x[:4]) at each token."""
    torch.manual_seed(0)
    gated = lever.CausalSelfAttention(lever.Config(**{**build(lever)[1].__dict__, "attention_gate": 4}))
    torch.manual_seed(0)
    plain = lever.CausalSelfAttention(build(lever)[1])
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if not k.startswith("gate.")})
    x = torch.randn(2, 16, 64)
    with torch.no_grad():
        gated.gate.weight.zero_()  # as GPT starts it (the module alone has nn.Linear's draw)
        torch.testing.assert_close(gated(x), 0.5 * plain(x))
        gated.gate.weight.copy_(torch.randn(2, 4))
        captured = {}
        plain.c_proj.register_forward_hook(lambda m, args, out: captured.__setitem__("y", args[0]))
        plain(x)
        gates = torch.sigmoid(x[..., :4] @ gated.gate.weight.t())  # (B, T, n_head)
        expected = (captured["y"].view(2, 16, 2, 32) * gates.unsqueeze(-1)).view(2, 16, 64)
        torch.testing.assert_close(gated(x), gated.c_proj(expected))


def test_the_gate_trains_with_adamw_and_changes_the_run():
    model, cfg = build(lever, attention_gate=12)
    gates = [block.attn.gate.weight for block in model.transformer.h]
    assert all(g.abs().sum() == 0 for g in gates)
    assert not any(p is g for p in lever.muon_params(model) for g in gates)
    optimizer = lever.configure_optimizer(model, cfg, "cpu")
    adamw_params = [p for group in optimizer.optimizers[0].param_groups for p in group["params"]] \
        if hasattr(optimizer, "optimizers") else [p for group in optimizer.param_groups for p in group["params"]]
    assert all(any(p is g for p in adamw_params) for g in gates)
    losses = train(model, cfg, lever, 8)
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(g.abs().sum() > 0 for g in gates)
    plain, plain_cfg = build(lever)
    assert losses != train(plain, plain_cfg, lever, 8)


@pytest.mark.parametrize("value", ["-1", "65"])
def test_bad_widths_fail_early(value):
    with pytest.raises(SystemExit, match=rf"--attention_gate={value} must be between 0 \(off\) and --n_embd=64"):
        lever.parse_config([f"--attention_gate={value}", "--n_embd=64", "--n_head=2"])
