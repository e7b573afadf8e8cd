"""--value_embeddings (step 34, 2 tables by default): off, the model is the parent's (step 33); on with N tables,
blocks i and n_layer - N + i (i < N) compute v <- lambda_v * v + lambda_e * table_i[token] before attention, with
(lambda_v, lambda_e) learned per block from (0.5, 0.5), the tables N(0, 0.02) and trained by AdamW."""
import os

import pytest
import torch
from safetensors.torch import load_model, save_model

from conftest import load_script, script_number, step_adding

LEVER_SCRIPT = step_adding("value_embeddings")
lever = load_script(LEVER_SCRIPT)
parent_step = load_script(script_number(LEVER_SCRIPT) - 1)

TINY = dict(n_layer=4, n_head=2, n_embd=64, block_size=64, vocab_size=128, window=0, window_ramp=False,
            attention="sdpa", blockmask_from_kv_blocks=False, compile=False)


def build(module, seed=0, **overrides):
    torch.manual_seed(seed)
    return module.GPT(module.Config(**{**TINY, **overrides}))


def batch(seed=1, B=2, T=32):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, TINY["vocab_size"], (B, T), generator=generator)
    y = torch.randint(0, TINY["vocab_size"], (B, T), generator=generator)
    return x, y


def test_off_is_the_parent():
    """The default is 2 tables; off builds the parent's model: the same parameters, the same values, the same
    loss, and the same losses over a few optimizer steps (Muon + AdamW)."""
    assert lever.Config().value_embeddings == 2 and not hasattr(parent_step.Config, "value_embeddings")
    ours, parent = build(lever, value_embeddings=0), build(parent_step)
    ours_state, parent_state = ours.state_dict(), parent.state_dict()
    assert list(ours_state) == list(parent_state)
    for name in parent_state:
        assert torch.equal(ours_state[name], parent_state[name]), name
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in parent.named_parameters()]
    x, y = batch()
    losses = {}
    for module, model in ((lever, ours), (parent_step, parent)):
        optimizer = module.configure_optimizer(model, model.cfg, "cpu")
        losses[module] = []
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            loss = model(x, y)
            loss.backward()
            optimizer.step()
            losses[module].append(loss.item())
    assert losses[lever] == losses[parent_step]


def test_blocks_and_tables():
    """Table i serves block i and block n_layer - N + i (record #28: 3 tables, blocks 0-2 and 9-11 of 12)."""
    table = lever.value_embedding_table
    assert [table(lever.Config(n_layer=12, value_embeddings=3), layer) for layer in range(12)] == \
        [0, 1, 2, None, None, None, None, None, None, 0, 1, 2]
    assert [table(lever.Config(n_layer=4, value_embeddings=2), layer) for layer in range(4)] == [0, 1, 0, 1]
    assert [table(lever.Config(n_layer=4, value_embeddings=0), layer) for layer in range(4)] == [None] * 4


def test_on_adds_tables_and_lambdas_and_keeps_the_parents_start():
    """On: N tables of (vocab_size, n_kv_head * head_dim), N(0, 0.02); (0.5, 0.5) lambdas in the 2N blocks that
    use one and none elsewhere; every other weight starts exactly as the parent's for the same seed."""
    model, parent = build(lever, n_layer=6, value_embeddings=2, n_kv_head=1), build(parent_step, n_layer=6, n_kv_head=1)
    state, parent_state = model.state_dict(), parent.state_dict()
    added = sorted(set(state) - set(parent_state))
    assert added == sorted(["value_embeds.0.weight", "value_embeds.1.weight"]
                           + [f"transformer.h.{i}.attn.value_lambdas" for i in (0, 1, 4, 5)])
    for name in parent_state:
        assert torch.equal(state[name], parent_state[name]), name
    for i in range(2):
        weight = state[f"value_embeds.{i}.weight"]
        assert weight.shape == (128, 32)  # one key/value head of 64 / 2
        assert abs(weight.std().item() - 0.02) < 0.003 and abs(weight.mean().item()) < 0.003
    assert not torch.equal(state["value_embeds.0.weight"], state["value_embeds.1.weight"])
    for i in (0, 1, 4, 5):
        assert torch.equal(state[f"transformer.h.{i}.attn.value_lambdas"], torch.tensor([0.5, 0.5]))


def test_blocks_get_their_table_lookups():
    """The tables are looked up once per forward and block i gets table value_embedding_table(i)'s rows."""
    model = build(lever, value_embeddings=2)
    x, _ = batch()
    received = {}
    hooks = [block.register_forward_hook(lambda m, args, out, i=i: received.__setitem__(i, args[2]))
             for i, block in enumerate(model.transformer.h)]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    for layer, table in enumerate([0, 1, 0, 1]):
        assert torch.equal(received[layer], model.value_embeds[table](x))


def test_value_mix_formula_on_a_hand_built_attention():
    """v <- lambda_v * v + lambda_e * ve, exactly, before attention: with q = k = 0 every query averages the mixed
    values of its causal prefix; with v = x and c_proj = identity that mean is the block's output."""
    cfg = lever.Config(**{**TINY, "qk_norm": "none", "value_embeddings": 1})
    attn = lever.CausalSelfAttention(cfg, value_embedding=True)
    C = cfg.n_embd
    with torch.no_grad():
        attn.c_attn.weight.zero_()
        attn.c_attn.weight[2 * C:].copy_(torch.eye(C))  # v = x; q = k = 0
        attn.c_proj.weight.copy_(torch.eye(C))
        attn.value_lambdas.copy_(torch.tensor([0.3, -1.7]))
    generator = torch.Generator().manual_seed(2)
    x, ve = torch.randn(2, 5, C, generator=generator), torch.randn(2, 5, C, generator=generator)
    mixed = 0.3 * x + -1.7 * ve
    expected = mixed.cumsum(dim=1) / torch.arange(1, 6).view(1, -1, 1)
    torch.testing.assert_close(attn(x, None, ve), expected)
    torch.testing.assert_close(attn(x, None, None), x.cumsum(dim=1) / torch.arange(1, 6).view(1, -1, 1))


def test_lambdas_one_zero_give_the_parent_and_default_changes_the_loss():
    """With (lambda_v, lambda_e) = (1, 0) in every block the model is the parent's (same loss, exactly); at the start
    (0.5, 0.5) it is not: the switch changes the forward."""
    model, parent = build(lever, value_embeddings=2), build(parent_step)
    x, y = batch()
    with torch.no_grad():
        parent_loss = parent(x, y)
        assert not torch.equal(model(x, y), parent_loss)
        for block in model.transformer.h:
            block.attn.value_lambdas.copy_(torch.tensor([1.0, 0.0]))
        assert torch.equal(model(x, y), parent_loss)


def test_every_parameter_gets_a_gradient():
    """DDP needs a gradient for every parameter in every step: the tables (in the looked-up rows only, from both
    blocks that share each) and both lambdas of every block that has them."""
    model = build(lever, value_embeddings=2)
    x, y = batch()
    model(x, y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    for block in model.transformer.h:
        assert (block.attn.value_lambdas.grad != 0).all()
    seen = torch.zeros(TINY["vocab_size"], dtype=torch.bool)
    seen[x.flatten()] = True
    for table in model.value_embeds:
        rows_with_gradient = table.weight.grad.abs().sum(dim=1) > 0
        assert torch.equal(rows_with_gradient, seen)
    # table 0's gradient is the sum of blocks 0 and 2's: without block 2's lambda_e it changes
    full = model.value_embeds[0].weight.grad.clone()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        model.transformer.h[2].attn.value_lambdas[1] = 0.0
    model(x, y).backward()
    assert not torch.allclose(model.value_embeds[0].weight.grad, full)


def test_optimizer_groups():
    """The tables go to AdamW's decay group (2-D, outside the blocks), the lambdas to its no-decay group, and Muon
    keeps exactly the parent's matrices."""
    model = build(lever, value_embeddings=2)
    optimizer = lever.configure_optimizer(model, model.cfg, "cpu")
    adamw, muon = optimizer.optimizers
    decay, no_decay = (set(map(id, group["params"])) for group in adamw.param_groups)
    muon_ids = set(map(id, muon.param_groups[0]["params"]))
    for table in model.value_embeds:
        assert id(table.weight) in decay and id(table.weight) not in muon_ids
    for block in model.transformer.h:
        assert id(block.attn.value_lambdas) in no_decay and id(block.attn.value_lambdas) not in muon_ids
    parent = build(parent_step)
    assert [p.shape for p in muon.param_groups[0]["params"]] == [p.shape for p in parent_step.muon_params(parent)]


def test_training_lowers_the_loss_and_moves_the_new_parameters():
    model = build(lever, value_embeddings=2)
    optimizer = lever.configure_optimizer(model, model.cfg, "cpu")
    for group in optimizer.param_groups:
        group["lr"] = 1e-2 * group.get("lr_scale", 1.0)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    x, y = batch()
    losses = []
    for _ in range(8):
        optimizer.zero_grad(set_to_none=True)
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    for name, p in model.named_parameters():
        if "value" in name:
            assert not torch.equal(p, start[name]), name


def test_check_config_refuses_bad_counts():
    lever.check_config(lever.Config(n_layer=8, value_embeddings=4))  # every block has one: allowed
    for bad in (5, -1):
        with pytest.raises(lever.ConfigError, match="--value_embeddings"):
            lever.check_config(lever.Config(n_layer=8, value_embeddings=bad))
    assert lever.parse_config(["--value_embeddings=3"]).value_embeddings == 3


def test_state_dict_round_trip(tmp_path):
    """A checkpoint's model file holds the tables and lambdas; a model of the same config loads them back and gives
    the same loss; the parent's model (no tables) refuses it."""
    model = build(lever, seed=0, value_embeddings=2)
    with torch.no_grad():
        model.transformer.h[3].attn.value_lambdas.copy_(torch.tensor([0.25, 2.0]))
    path = str(tmp_path / "model.safetensors")
    save_model(model, path)
    other = build(lever, seed=1, value_embeddings=2)
    load_model(other, path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(other.state_dict()[name], tensor), name
    x, y = batch()
    with torch.no_grad():
        assert torch.equal(other(x, y), model(x, y))
    with pytest.raises(RuntimeError):
        load_model(build(parent_step), path)
