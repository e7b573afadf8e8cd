"""--x0_mixing (step 35, on by default): before every block x <- a*x + b*x0, with x0 the embedding the first block
gets and (a, b) learned per block, starting at (1, 0). Off, the model is the parent's (step 34). The tiny models
here have no value embeddings (step 34's switch), so that a block's forward can be written out by hand."""
import os

import pytest
import torch
from safetensors.torch import load_model, save_model

from conftest import load_script, script_number, step_adding

LEVER_SCRIPT = step_adding("x0_mixing")
lever = load_script(LEVER_SCRIPT)
parent_step = load_script(script_number(LEVER_SCRIPT) - 1)

TINY = dict(vocab_size=128, block_size=32, n_layer=2, n_head=2, n_embd=64, window=0, window_ramp=False,
            attention="sdpa", blockmask_from_kv_blocks=False, compile=False, learning_rate=1e-2, muon_lr=1e-2,
            muon_update_scale="aspect", value_embeddings=0)


def build(module, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = module.Config(**{**TINY, **overrides})
    return module.GPT(cfg), cfg


def batch(seed=1, B=2, T=32):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, TINY["vocab_size"], (B, T + 1), generator=generator)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def train(model, cfg, module, steps):
    """Losses of `steps` optimizer steps (AdamW + Muon, as configured) on one fixed batch."""
    optimizer = module.configure_optimizer(model, cfg, "cpu")
    x, y = batch()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses, optimizer


def mixes(model):
    return [block.x0_mix for block in model.transformer.h]


def test_off_is_the_parent_same_parameters_and_losses():
    assert lever.Config().x0_mixing is True and not hasattr(parent_step.Config, "x0_mixing")  # on by default
    model, cfg = build(lever, x0_mixing=False)
    parent, parent_cfg = build(parent_step)
    ours, theirs = model.state_dict(), parent.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert not any(hasattr(block, "x0_mix") for block in model.transformer.h)
    losses, _ = train(model, cfg, lever, 3)
    parent_losses, _ = train(parent, parent_cfg, parent_step, 3)
    assert torch.equal(torch.stack(losses), torch.stack(parent_losses))


@pytest.mark.parametrize("pos_emb", ["rotary", "absolute"])
def test_on_starts_as_the_parent(pos_emb):
    """On adds only the (a, b) scalars, at (1, 0), and consumes no random numbers: every other weight and the
    step-0 logits are the parent's exactly."""
    model, _ = build(lever, x0_mixing=True, pos_emb=pos_emb)
    parent, _ = build(parent_step, pos_emb=pos_emb)
    ours, theirs = model.state_dict(), parent.state_dict()
    added = sorted(set(ours) - set(theirs))
    assert added == [f"transformer.h.{i}.x0_mix" for i in range(TINY["n_layer"])]
    assert set(theirs) <= set(ours)
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
    for mix in mixes(model):
        assert mix.shape == (2,) and mix.tolist() == [1.0, 0.0]
    x, _ = batch()
    with torch.no_grad():
        assert torch.equal(model(x), parent(x))


def manual_logits(model, idx, pos_emb):
    """The mixed forward written out by hand from the model's pieces: x0 = embedding (+ position), then before
    each block x <- a*x + b*x0, the block's two pre-norm branches, the final norm and the head."""
    x0 = model.transformer.wte(idx)
    if pos_emb == "absolute":
        x0 = x0 + model.transformer.wpe(torch.arange(idx.size(1)))
    x = x0
    for block in model.transformer.h:
        a, b = block.x0_mix.tolist()
        x = a * x + b * x0
        x = x + block.branch_scale * block.attn(block.ln_1(x))
        x = x + block.branch_scale * block.mlp(block.ln_2(x))
    return model.lm_head(model.transformer.ln_f(x))


@pytest.mark.parametrize("pos_emb", ["rotary", "absolute"])
def test_on_mixes_the_embedding_into_every_block(pos_emb):
    model, _ = build(lever, x0_mixing=True, pos_emb=pos_emb)
    with torch.no_grad():
        for i, mix in enumerate(mixes(model)):
            mix.copy_(torch.tensor([0.7 - 0.2 * i, 0.5 + 0.3 * i]))
    x, _ = batch()
    with torch.no_grad():
        logits = model(x)
        torch.testing.assert_close(logits, manual_logits(model, x, pos_emb), rtol=1e-5, atol=1e-5)
        # and the mixing matters: the same weights without it give other logits
        parent, _ = build(parent_step, pos_emb=pos_emb)
        parent.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("x0_mix")})
        assert (logits - parent(x)).abs().max() > 1e-3
    # b = 0 and a = 1 in a later block is the unmixed block there: only that block's pair is read
    with torch.no_grad():
        mixes(model)[1].copy_(torch.tensor([1.0, 0.0]))
        torch.testing.assert_close(model(x), manual_logits(model, x, pos_emb), rtol=1e-5, atol=1e-5)


def test_every_parameter_gets_a_gradient():
    """DDP's unused-parameter check needs a gradient for every parameter at every step, from step 0 (b = 0)."""
    model, _ = build(lever, x0_mixing=True)
    x, y = batch()
    model(x, y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    for mix in mixes(model):
        assert mix.grad.abs().min() > 0  # both a and b are trained


def test_scalars_go_to_adamw_no_decay_not_muon():
    model, cfg = build(lever, x0_mixing=True)
    optimizer = lever.configure_optimizer(model, cfg, "cpu")
    adamw, muon = optimizer.optimizers
    muon_ids = {id(p) for group in muon.param_groups for p in group["params"]}
    no_decay = {id(p) for group in adamw.param_groups if group["weight_decay"] == 0.0 for p in group["params"]}
    decay = {id(p) for group in adamw.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    for mix in mixes(model):
        assert id(mix) in no_decay and id(mix) not in decay and id(mix) not in muon_ids
    # Muon's share is the parent's: the blocks' matrices, nothing more
    assert len(muon_ids) == sum(1 for p in model.transformer.h.parameters() if p.dim() == 2)


def test_training_lowers_the_loss_and_moves_the_scalars():
    model, cfg = build(lever, x0_mixing=True)
    losses, _ = train(model, cfg, lever, 8)
    assert losses[-1] < losses[0] - 0.1
    for mix in mixes(model):
        assert not torch.equal(mix.detach(), torch.tensor([1.0, 0.0]))


def test_state_dict_and_optimizer_state_round_trip(tmp_path):
    model, cfg = build(lever, x0_mixing=True)
    _, optimizer = train(model, cfg, lever, 2)
    save_model(model, str(tmp_path / "model.safetensors"))
    copy, _ = build(lever, seed=5, x0_mixing=True)
    load_model(copy, str(tmp_path / "model.safetensors"))
    for mix, copied in zip(mixes(model), mixes(copy)):
        assert torch.equal(mix, copied)
    x, _ = batch()
    with torch.no_grad():
        assert torch.equal(model(x), copy(x))
    # the optimizer's moments of the scalars travel with its state
    copy_optimizer = lever.configure_optimizer(copy, cfg, "cpu")
    lever.load_optimizer_state(copy_optimizer, optimizer.state_dict())
    adamw = copy_optimizer.optimizers[0]
    for mix, saved in zip(mixes(copy), mixes(model)):
        assert torch.equal(adamw.state[mix]["exp_avg"], optimizer.optimizers[0].state[saved]["exp_avg"])
    # a checkpoint with the scalars does not load into a model without them (resume then names the field)
    unmixed, _ = build(lever, x0_mixing=False)
    with pytest.raises(RuntimeError):
        load_model(unmixed, str(tmp_path / "model.safetensors"))


def test_compiles_as_one_graph_that_a_step_does_not_recompile():
    """No graph break from the mixing, and new values of (a, b) after an optimizer step compile nothing new."""
    model, cfg = build(lever, x0_mixing=True)
    graphs = []

    def count_graphs(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward
    compiled = torch.compile(model, backend=count_graphs, fullgraph=True)
    optimizer = lever.configure_optimizer(model, cfg, "cpu")
    x, y = batch()
    losses = []
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        loss = compiled(x, y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert len(graphs) == 1
    assert losses[1] < losses[0]


def test_check_config_refuses_a_non_bool():
    cfg = lever.Config(x0_mixing="false")  # set in code: a truthy string
    with pytest.raises(lever.ConfigError, match="x0_mixing"):
        lever.check_config(cfg)
    with pytest.raises(lever.ConfigError, match="x0_mixing"):
        lever.parse_config(["--x0_mixing=maybe"])
    assert lever.parse_config(["--x0_mixing=false"]).x0_mixing is False
    assert lever.parse_config([]).x0_mixing is True


def test_help_lists_the_switch():
    assert "--x0_mixing=True" in lever.config_help()


def test_mixes_with_the_value_embeddings_on_too():
    """The step's defaults: value embeddings (step 34) and x0 mixing together. At (1, 0) the model is the parent's
    with its tables; a b of 0.5 in one block changes the logits; both new kinds of parameters get gradients."""
    model, _ = build(lever, x0_mixing=True, value_embeddings=2)
    parent, _ = build(parent_step, value_embeddings=2)
    parent_state = parent.state_dict()
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in parent_state.items())
    x, y = batch()
    with torch.no_grad():
        assert torch.equal(model(x), parent(x))
        mixes(model)[1].copy_(torch.tensor([1.0, 0.5]))
        assert (model(x) - parent(x)).abs().max() > 1e-3
    model(x, y).backward()
    assert all(mix.grad.abs().min() > 0 for mix in mixes(model))
    assert all(table.weight.grad is not None for table in model.value_embeds)
