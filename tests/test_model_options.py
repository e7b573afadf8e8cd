"""Model and optimizer options, steps 01 and 09-17: each option changes what it claims, its default is the parent's
model exactly, and every script that has the option is tested (so later steps cannot silently break it)."""
import dataclasses
import functools
import math
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import RECIPE_STEPS, SCRIPTS, SPEED_SWITCHES_OFF, load_script, script_number, scripts_from, tiny_args

SMALL = ["--n_layer=2", "--n_head=4", "--n_embd=32", "--block_size=16", "--vocab_size=50304"]


def build(module, *options, seed=0):
    cfg = module.parse_config(SMALL + list(options))
    torch.manual_seed(seed)
    return module.GPT(cfg), cfg


def train_briefly(module, *options, steps=25):
    """Losses of a few optimizer steps on one fixed batch (the scheduled rate is the peak)."""
    model, cfg = build(module, *options)
    optimizer = module.configure_optimizer(model, cfg, "cpu")
    for group in optimizer.param_groups:
        group["lr"] = 3e-3 * group.get("lr_scale", 1.0)
    x = torch.randint(0, 50257, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(x, torch.roll(x, -1, dims=1))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("script", SCRIPTS[1:])
def test_default_model_is_the_parents(script):
    """Every step's defaults keep its parent's model: same parameters, same init, same logits. The exceptions by
    design: steps 30 and 31 change the defaults to the original lineage's recipes (their headers say so), and a
    speed step's switch may default on: off, it builds the parent's model."""
    child = load_script(script)
    parent = load_script(script_number(script) - 1)
    if script_number(script) in RECIPE_STEPS:
        assert child.Config() != parent.Config()  # the recipe's defaults, by design
        return
    def switches_off(module):  # SMALL's 2 layers cannot hold step 34's default 2 value-embedding tables, either
        fields = {f.name for f in dataclasses.fields(module.Config)}
        return [f"--{field}={value}" for field, value in SPEED_SWITCHES_OFF.items() if field in fields]
    # Step 51's recipe takes #28's shape: SMALL replaces its widths, and its MLP ratio (4) is given to both as 2
    same = ["--mlp_ratio=2"] if script_number(script) >= 51 else []

    child_model, _ = build(child, *switches_off(child), *same)
    parent_model, _ = build(parent, *switches_off(parent), *same)
    assert list(child_model.state_dict()) == list(parent_model.state_dict())
    x = torch.randint(0, 50257, (2, 16))
    assert torch.equal(child_model(x), parent_model(x))


OPTIONS = [(1, "--residual_scaling=forward"), (9, "--norm=rmsnorm"), (10, "--pos_emb=rotary"), (10, "--pos_emb=none"), (11, "--bias=false"),
           (11, "--activation=relu"), (11, "--activation=relu2"), (11, "--activation=silu"),
           (11, "--activation=swiglu"), (11, "--activation=swiglu --mlp_width=unfair"), (11, "--mlp_ratio=2"), (12, "--n_kv_head=2"),
           (12, "--n_kv_head=1"), (13, "--optimizer=muon"), (13, "--optimizer=muon --muon_update_scale=max_dim"), (14, "--tie_embeddings=false"),
           (16, "--qk_norm=rms"), (16, "--qk_norm=l2"),
           (17, "--logit_softcap=15")]


@pytest.mark.parametrize("script, options", [(s, o) for first, o in OPTIONS for s in scripts_from(first)])
def test_every_option_trains(script, options):
    """Each option trains, and changes something: the same seed and batch without it give other losses."""
    losses = train_briefly(load_script(script), *options.split())
    assert losses[-1] < losses[0] - 3.0, losses
    assert losses != default_losses(script), f"{options} changed nothing"


@functools.lru_cache(maxsize=None)
def default_losses(script):
    return train_briefly(load_script(script))


@pytest.mark.parametrize("script", scripts_from(9))
def test_rmsnorm_scales_without_centering(script):
    module = load_script(script)
    model, _ = build(module, "--norm=rmsnorm")
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm))]
    assert len(norms) == 5 and all(isinstance(m, torch.nn.RMSNorm) for m in norms)
    x = torch.randn(3, 32) + 5.0
    y = norms[0](x)
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(3), atol=1e-3)
    assert y.mean(-1).abs().min() > 0.5  # unlike LayerNorm, the mean is kept
    layer, _ = build(module)
    assert torch.allclose(layer.transformer.ln_f(x).mean(-1), torch.zeros(3), atol=1e-5)


@pytest.mark.parametrize("script", scripts_from(10))
def test_rope_scores_depend_only_on_the_offset(script):
    module = load_script(script)
    rotary = module.Rotary(head_dim=8, block_size=32, base=10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(m, n):
        qs = rotary(q.expand(1, 1, 32, 8).contiguous())[0, 0, m]
        ks = rotary(k.expand(1, 1, 32, 8).contiguous())[0, 0, n]
        return torch.dot(qs, ks)

    assert score(5, 2) == pytest.approx(score(20, 17).item(), abs=1e-5)
    assert score(3, 3) == pytest.approx(torch.dot(q, k).item(), abs=1e-5)  # offset 0: no rotation left
    assert abs(score(5, 2) - score(5, 4)) > 1e-3
    absolute, cfg = build(module)
    for choice in ("rotary", "none"):
        model, _ = build(module, f"--pos_emb={choice}")
        assert "wpe" not in model.transformer
        lost = sum(p.numel() for p in absolute.parameters()) - sum(p.numel() for p in model.parameters())
        assert lost == cfg.block_size * cfg.n_embd
    with pytest.raises(SystemExit, match="--pos_emb='alibi'"):
        module.parse_config(["--pos_emb=alibi"])


@pytest.mark.parametrize("script", scripts_from(11))
def test_bias_toggle_and_activations(script):
    module = load_script(script)
    no_bias, _ = build(module, "--bias=false")
    assert not [name for name, _ in no_bias.named_parameters() if name.endswith("bias")]
    with_bias, _ = build(module)
    assert [name for name, _ in with_bias.named_parameters() if name.endswith("bias")]
    x = torch.randn(2, 5, 32)
    expected = {"relu": F.relu, "relu2": lambda h: F.relu(h) ** 2, "silu": F.silu,
                "gelu": lambda h: F.gelu(h, approximate="tanh")}
    for name, function in expected.items():
        mlp = build(module, f"--activation={name}")[0].transformer.h[0].mlp
        assert torch.allclose(mlp(x), mlp.c_proj(function(mlp.c_fc(x))), atol=1e-6)
    mlp = build(module, "--activation=swiglu")[0].transformer.h[0].mlp
    gate, value = mlp.c_fc(x).chunk(2, dim=-1)
    assert torch.allclose(mlp(x), mlp.c_proj(F.silu(gate) * value), atol=1e-6)


@pytest.mark.parametrize("script", scripts_from(11))
def test_swiglu_fair_width_keeps_the_parameter_count(script):
    module = load_script(script)

    def mlp_params(*options):  # GPT-2 width: 768
        return sum(p.numel() for p in module.MLP(module.parse_config(["--n_embd=768", *options])).parameters())

    gelu = mlp_params()
    assert abs(mlp_params("--activation=swiglu") - gelu) / gelu < 0.005
    assert mlp_params("--activation=swiglu", "--mlp_width=unfair") / gelu > 1.4


@pytest.mark.parametrize("script", scripts_from(12))
def test_gqa_shapes_and_reference(script):
    module = load_script(script)
    mha, _ = build(module)
    same, _ = build(module, "--n_kv_head=4")
    x = torch.randint(0, 50257, (2, 16))
    assert torch.equal(mha(x), same(x))  # n_kv_head = n_head is MHA exactly
    for kv, rows in ((2, 32 + 2 * 2 * 8), (1, 32 + 2 * 8)):  # head_dim = 32 / 4 = 8
        attention = build(module, f"--n_kv_head={kv}")[0].transformer.h[0].attn
        assert attention.c_attn.weight.shape == (rows, 32)
        h = torch.randn(2, 16, 32)
        q, k, v = attention.c_attn(h).split([32, kv * 8, kv * 8], dim=2)
        q = q.view(2, 16, 4, 8).transpose(1, 2)
        k = k.view(2, 16, kv, 8).transpose(1, 2).repeat_interleave(4 // kv, dim=1)  # head h uses kv h // group
        v = v.view(2, 16, kv, 8).transpose(1, 2).repeat_interleave(4 // kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 16, 32)
        assert torch.allclose(attention(h), attention.c_proj(y), atol=1e-5)
    with pytest.raises(SystemExit, match="--n_head=4 is not divisible by --n_kv_head=3"):
        module.parse_config(SMALL + ["--n_kv_head=3"])


@pytest.mark.parametrize("script", scripts_from(13))
def test_newton_schulz_orthogonalizes(script):
    module = load_script(script)
    for shape in ((32, 128), (128, 32), (96, 384)):  # rectangular: random ones are well conditioned
        G = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        polar = U @ Vh
        X = module.newton_schulz(G, 5)
        singular = torch.linalg.svdvals(X)
        assert 0.6 < singular.min() and singular.max() < 1.25
        assert (X - polar).norm() / polar.norm() < 0.3
        assert (G / G.norm() - polar).norm() / polar.norm() > 0.8  # far from orthogonal before


@pytest.mark.parametrize("script", scripts_from(13))
def test_muon_grouping_and_options(script):
    module = load_script(script)
    model, cfg = build(module, "--optimizer=muon")
    optimizer = module.configure_optimizer(model, cfg, "cpu")
    adamw, muon = optimizer.optimizers
    muon_ids = {id(p) for p in muon.param_groups[0]["params"]}
    hidden = {id(p) for name, p in model.named_parameters() if name.startswith("transformer.h.") and p.dim() == 2}
    assert muon_ids == hidden
    adamw_ids = [id(p) for group in adamw.param_groups for p in group["params"]]
    assert sorted(adamw_ids + list(muon_ids)) == sorted(id(p) for p in model.parameters())  # each exactly once
    assert id(model.transformer.wte.weight) in adamw_ids and id(model.lm_head.weight) in adamw_ids
    assert muon.param_groups[0]["lr_scale"] == pytest.approx(cfg.muon_lr / cfg.learning_rate)
    assert isinstance(module.configure_optimizer(model, module.parse_config(SMALL), "cpu"), torch.optim.AdamW)

    def update(*options):
        model, cfg = build(module, "--optimizer=muon", *options)
        optimizer = module.configure_optimizer(model, cfg, "cpu")
        weight = model.transformer.h[0].mlp.c_fc.weight
        for _ in range(2):
            before = weight.detach().clone()
            optimizer.zero_grad()
            x = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(3))
            model(x, x).backward()
            optimizer.step()
        return weight.detach() - before

    base = update()
    assert not torch.allclose(base, update("--muon_nesterov=false"))
    assert not torch.allclose(base, update("--muon_momentum=0.5"))
    assert not torch.allclose(base, update("--muon_ns_steps=2"))
    singular = torch.linalg.svdvals(base / (cfg.muon_lr * 2.0))  # c_fc is 4n x n: scaled by sqrt(4) = 2
    assert singular.max() < 1.3  # the step is an orthogonalized matrix


@pytest.mark.parametrize("script", scripts_from(13))
def test_muon_resume_continues_the_same_loss_curve(script, shakespeare, tmp_path):
    module = load_script(script)
    args = dict(max_steps=4, ckpt_every=2, optimizer="muon", learning_rate=1e-2)
    full = module.main(tiny_args(script, shakespeare, tmp_path, run_name="full", **args))
    step2 = os.path.join(full["run_dir"], "checkpoints", "step_000002")
    resumed = module.main(tiny_args(script, shakespeare, tmp_path, resume=step2, **args))
    assert resumed["losses"] == full["losses"][2:]


@pytest.mark.parametrize("script", scripts_from(14))
def test_tied_or_untied_embeddings(script):
    module = load_script(script)
    tied, cfg = build(module)
    untied, _ = build(module, "--tie_embeddings=false")
    assert tied.lm_head.weight.data_ptr() == tied.transformer.wte.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.transformer.wte.weight.data_ptr()
    extra = sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters())
    assert extra == cfg.vocab_size * cfg.n_embd


@pytest.mark.parametrize("script", scripts_from(1))
def test_clipping_on_and_off(script, shakespeare, tmp_path):
    """grad_clip=inf measures and logs the norm without clipping; a small grad_clip changes the first update."""
    module = load_script(script)
    from conftest import logged_steps
    args = dict(max_steps=2, learning_rate=1e-2)
    clipped = module.main(tiny_args(script, shakespeare, tmp_path, run_name="on", grad_clip=0.01, **args))
    free = module.main(tiny_args(script, shakespeare, tmp_path, run_name="off", grad_clip="inf", **args))
    assert clipped["losses"][0] == free["losses"][0]
    assert logged_steps(clipped["run_dir"], "grad_norm")[1] == logged_steps(free["run_dir"], "grad_norm")[1]
    assert abs(clipped["losses"][1] - free["losses"][1]) > 1e-4  # clipping to 0.01 changed the first update


@pytest.mark.parametrize("script", scripts_from(1))
@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_non_positive_clip_norm_is_refused(script, value):
    """--grad_clip=0 would scale every gradient to zero and silently stop learning."""
    module = load_script(script)
    with pytest.raises(SystemExit, match=r"--grad_clip=.* must be positive; to turn clipping off use --grad_clip=inf"):
        module.parse_config([f"--grad_clip={value}"])


@pytest.mark.parametrize("script", scripts_from(15))
def test_grad_norm_type(script, shakespeare, tmp_path):
    """The logged (and clipped) norm is the chosen p-norm: for inf, the largest entry, far below the 2-norm."""
    module = load_script(script)
    from conftest import logged_steps
    args = dict(max_steps=1, grad_clip="inf")
    l2 = module.main(tiny_args(script, shakespeare, tmp_path, run_name="l2", **args))
    largest = module.main(tiny_args(script, shakespeare, tmp_path, run_name="inf", grad_norm_type="inf", **args))
    assert logged_steps(largest["run_dir"], "grad_norm")[1] < logged_steps(l2["run_dir"], "grad_norm")[1] / 2


@pytest.mark.parametrize("script", scripts_from(16))
def test_qk_norm_bounds_and_gqa_key_scales(script):
    module = load_script(script)
    attention = build(module, "--qk_norm=rms", "--n_kv_head=2")[0].transformer.h[0].attn
    assert attention.q_scale.shape == (4,) and attention.k_scale.shape == (2,)
    with torch.no_grad():
        attention.q_scale.copy_(torch.tensor([1.0, 2.0, 0.5, 1.5]))
        attention.k_scale.copy_(torch.tensor([3.0, 0.25]))
    h = torch.randn(2, 16, 32)
    q, k, v = attention.c_attn(h).split([32, 16, 16], dim=2)
    q = F.rms_norm(q.view(2, 16, 4, 8), (8,)) * torch.tensor([1.0, 2.0, 0.5, 1.5]).view(4, 1)
    k = F.rms_norm(k.view(2, 16, 2, 8), (8,)) * torch.tensor([3.0, 0.25]).view(2, 1)
    k = k.repeat_interleave(2, dim=2)  # query heads 0, 1 use key/value head 0 and its scale; 2, 3 use head 1
    v = v.view(2, 16, 2, 8).repeat_interleave(2, dim=2)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    assert torch.allclose(attention(h), attention.c_proj(y.transpose(1, 2).reshape(2, 16, 32)), atol=1e-5)
    with torch.no_grad():  # a scale above the maximum acts as the maximum
        attention.k_scale.fill_(100.0)
        high = attention(h)
        attention.k_scale.fill_(attention.qk_scale_max)
        assert torch.equal(high, attention(h))
    rms, _ = build(module, "--qk_norm=rms")
    l2, _ = build(module, "--qk_norm=l2")
    x = torch.randint(0, 50257, (2, 16))
    assert torch.allclose(rms(x)[0], l2(x)[0], atol=1e-4)  # the l2 scales start where rms's unit RMS is
    none, _ = build(module)
    assert not torch.allclose(rms(x), none(x), atol=1e-4)


@pytest.mark.parametrize("script", scripts_from(17))
def test_logit_softcap_bounds_the_logits(script):
    module = load_script(script)
    model, _ = build(module, "--logit_softcap=2")
    uncapped, _ = build(module)
    with torch.no_grad():
        model.lm_head.weight.mul_(100)
        uncapped.lm_head.weight.mul_(100)
    x = torch.randint(0, 50257, (2, 16))
    logits = model(x)
    raw = uncapped(x)
    assert raw.abs().max() > 2 and logits.abs().max() <= 2
    assert torch.allclose(logits, 2 * torch.tanh(raw / 2), atol=1e-5)


@pytest.mark.parametrize("script", scripts_from(13))
def test_muon_orthogonalizes_each_block_of_a_fused_projection(script):
    """q, k and v share one matrix, but to Muon they are three: a q gradient 10x smaller than v's still gets a q
    update as large as v's (orthogonalizing the fused matrix as one would leave q's 10x smaller)."""
    module = load_script(script)
    model, cfg = build(module, "--optimizer=muon", "--n_kv_head=2")
    weight = model.transformer.h[0].attn.c_attn.weight
    gradient = torch.randn_like(weight)
    gradient[:cfg.n_embd] *= 0.1
    weight.grad = gradient
    before = weight.detach().clone()
    module.Muon([weight], lr=1.0, momentum=0.0, nesterov=False, ns_steps=5, weight_decay=0.0).step()
    q, k, v = (before - weight.detach()).split(list(weight.fused_rows))
    assert q.pow(2).mean().sqrt() == pytest.approx(v.pow(2).mean().sqrt().item(), rel=0.15)
    assert k.shape == v.shape == (cfg.n_embd // 2, cfg.n_embd)  # GQA: k and v have n_kv_head heads
    gated, _ = build(module, "--optimizer=muon", "--activation=swiglu")
    fc = gated.transformer.h[0].mlp.c_fc.weight
    assert list(fc.fused_rows) == [fc.size(0) // 2] * 2  # swiglu's gate and value are two matrices too


def decay_step(module, *options):
    """One optimizer step with all gradients zero: only decoupled weight decay moves the weights."""
    model, cfg = build(module, *options)
    optimizer = module.configure_optimizer(model, cfg, "cpu")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for group in optimizer.param_groups:
        group["lr"] = 0.1
    optimizer.step()
    return {name: p.detach() for name, p in model.named_parameters()}, before


@pytest.mark.parametrize("script", scripts_from(1))
def test_weight_decay_shrinks_matrices_only(script):
    module = load_script(script)
    after, before = decay_step(module, "--weight_decay=0.5")
    wte = "transformer.wte.weight"
    assert torch.allclose(after[wte], before[wte] * (1 - 0.1 * 0.5))  # decoupled: p -= lr * wd * p
    biases = [name for name in after if name.endswith(".bias")]
    assert biases and all(torch.equal(after[name], before[name]) for name in biases)
    after, before = decay_step(module, "--weight_decay=0")
    assert torch.equal(after[wte], before[wte])


@pytest.mark.parametrize("script", scripts_from(1))
def test_adam_betas_are_used(script):
    module = load_script(script)
    model, cfg = build(module, "--beta1=0.5", "--beta2=0.75")
    groups = module.configure_optimizer(model, cfg, "cpu").param_groups
    assert all(group["betas"] == (0.5, 0.75) for group in groups if "betas" in group)
    default = train_briefly(module, steps=5)
    assert train_briefly(module, "--beta1=0.5", steps=5) != default
    assert train_briefly(module, "--beta2=0.75", steps=5) != default


@pytest.mark.parametrize("script", scripts_from(10))
def test_rope_base_sets_the_rotation_frequencies(script):
    module = load_script(script)
    model, cfg = build(module, "--pos_emb=rotary", "--rope_base=100")
    default, _ = build(module, "--pos_emb=rotary")
    rotary = model.transformer.h[0].attn.rotary
    head_dim = cfg.n_embd // cfg.n_head
    # position 1, channel pair 1: rotated by base^(-2/head_dim)
    assert rotary.sin[1, 1].item() == pytest.approx(math.sin(100 ** (-2 / head_dim)), rel=1e-5)
    x = torch.randint(0, 50257, (2, 16))
    assert not torch.allclose(model(x), default(x))


@pytest.mark.parametrize("script", scripts_from(13))
def test_muon_weight_decay_shrinks_muons_matrices(script):
    module = load_script(script)
    after, before = decay_step(module, "--optimizer=muon", "--muon_weight_decay=0.5", "--weight_decay=0")
    name = "transformer.h.0.attn.c_attn.weight"
    assert torch.allclose(after[name], before[name] * (1 - 0.1 * 0.5), atol=1e-6)
    after, before = decay_step(module, "--optimizer=muon", "--weight_decay=0")
    assert torch.equal(after[name], before[name])


@pytest.mark.parametrize("script", scripts_from(11))
def test_mlp_ratio_sets_the_hidden_width(script):
    module = load_script(script)
    narrow, cfg = build(module, "--mlp_ratio=2")
    assert narrow.transformer.h[0].mlp.c_fc.weight.shape == (2 * cfg.n_embd, cfg.n_embd)
    gated, _ = build(module, "--mlp_ratio=6", "--activation=swiglu")  # fair: 2/3 of 6 * 32, rounded to 64
    assert gated.transformer.h[0].mlp.c_proj.weight.shape == (cfg.n_embd, 128)
    with pytest.raises(SystemExit, match="--mlp_ratio=0.0 must be positive"):
        module.parse_config(["--mlp_ratio=0"])


@pytest.mark.parametrize("script", scripts_from(13))
def test_muon_max_dim_scale(script):
    """max_dim scales a square matrix's orthogonal update by sqrt(n): entries of RMS 1 instead of 1/sqrt(n)."""
    module = load_script(script)
    update = torch.randn(64, 64)
    aspect = module.orthogonalize(update, 5, "aspect")
    max_dim = module.orthogonalize(update, 5, "max_dim")
    assert torch.allclose(max_dim, aspect * 8)
    assert max_dim.pow(2).mean().sqrt() == pytest.approx(1.0, rel=0.2)
    with pytest.raises(SystemExit, match="--muon_update_scale='big' is not one of"):
        module.parse_config(["--muon_update_scale=big"])


@pytest.mark.parametrize("script", scripts_from(1))
def test_residual_scaling_forward_is_the_same_model_with_smaller_steps(script):
    """forward starts as the same function as init (the output projections are 1/sqrt(2 * n_layer) larger and
    their outputs that much smaller), but one Adam step, which moves every weight by about the learning rate
    whatever its gradient's size, moves the output projections' effect 1/sqrt(2 * n_layer) as far."""
    module = load_script(script)
    scale = (2 * 2) ** -0.5  # SMALL has 2 layers
    x = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))
    runs = {}
    for name in ("init", "forward"):
        model, cfg = build(module, f"--residual_scaling={name}", "--weight_decay=0")
        logits = model(x).detach()
        projection = model.transformer.h[0].mlp.c_proj
        effect = lambda: projection.weight.detach().clone() * (scale if name == "forward" else 1.0)
        before = effect()
        optimizer = module.configure_optimizer(model, cfg, "cpu")
        model(x, torch.roll(x, -1, dims=1)).backward()
        optimizer.step()
        runs[name] = logits, before, effect() - before
    torch.testing.assert_close(runs["forward"][0], runs["init"][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(runs["forward"][1], runs["init"][1])
    moved_init, moved_forward = runs["init"][2].abs().mean(), runs["forward"][2].abs().mean()
    assert moved_forward == pytest.approx(scale * moved_init, rel=0.02)


@pytest.mark.parametrize("script", scripts_from(1))
def test_unknown_residual_scaling_is_refused(script):
    with pytest.raises(SystemExit, match="--residual_scaling='both' is not one of: init, forward"):
        load_script(script).parse_config(["--residual_scaling=both"])
