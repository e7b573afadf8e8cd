"""What the tests of a lever step (38 on) share: the step and its parent, a tiny model of either, one fixed batch,
and a few optimizer steps on it. Each lever's own test file then checks what its switch claims."""
import dataclasses

import pytest
import torch

from conftest import load_script, script_number, step_adding, tiny_args

REAL_COMPILE = torch.compile  # before any test replaces it

# 2 blocks of width 64 on SDPA (FlexAttention has no backward on the CPU), a value-embedding table, plain rates; no
# backout (its default block, 8, is past 2 blocks) in the steps that have it
TINY = dict(vocab_size=128, block_size=32, n_layer=2, n_head=2, n_embd=64, window=0, window_ramp=False,
            attention="sdpa", blockmask_from_kv_blocks=False, compile=False, learning_rate=1e-2, muon_lr=1e-2,
            muon_update_scale="aspect", value_embeddings=1, backout_layer=-1)


def lever_and_parent(field):
    """The step whose Config first has `field`, and its parent step, both loaded."""
    script = step_adding(field)
    return load_script(script), load_script(script_number(script) - 1)


def build(module, seed=0, **overrides):
    """(model, cfg): a tiny GPT of `module`, its weights drawn from `seed`."""
    torch.manual_seed(seed)
    fields = {field.name for field in dataclasses.fields(module.Config)}
    cfg = module.Config(**{**{k: v for k, v in TINY.items() if k in fields}, **overrides})
    return module.GPT(cfg), cfg


def batch(seed=1, B=2, T=32):
    """(inputs, targets): B random sequences of T tokens and the same shifted by one."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, TINY["vocab_size"], (B, T + 1), generator=generator)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def train(model, cfg, module, steps, autocast=False, after_step=None):
    """The losses of `steps` optimizer steps on batch(), optionally under CPU bf16 autocast; after_step(step) runs
    after each optimizer step."""
    optimizer = module.configure_optimizer(model, cfg, "cpu")
    x, y = batch()
    losses = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(x, y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if after_step:
            after_step(step)
    return losses


def float8_products_per_mode(module, monkeypatch, switch, **overrides):
    """({mode: torch._scaled_mm calls in one training forward and backward of a tiny model with --switch=mode},
    its cfg), for off, forward and full; asserts that evaluation (eval mode, no grad) makes none."""
    calls = []
    original = torch._scaled_mm
    monkeypatch.setattr(module.torch, "_scaled_mm", lambda *a, **k: calls.append(1) or original(*a, **k))
    x, y = batch()
    counts = {}
    for mode in ("off", "forward", "full"):
        model, cfg = build(module, **{switch: mode}, **overrides)
        calls.clear()
        model(x, y).backward()
        counts[mode] = len(calls)
        model.eval()
        calls.clear()
        with torch.no_grad():
            model(x, y)
        assert not calls, mode
    return counts, cfg


def assert_float8_trains_like_exact(module, switch, mode, **overrides):
    """--switch=mode (a float8 product switch) trains a tiny model close to its exact products (switch off), not
    identically, and the loss falls."""
    model, cfg = build(module, **{switch: mode}, **overrides)
    fp8 = train(model, cfg, module, 8)
    model, cfg = build(module, **{switch: "off"}, **overrides)
    exact = train(model, cfg, module, 8)
    assert fp8 != exact and fp8 == pytest.approx(exact, abs=0.05)
    assert fp8[-1] < fp8[0] - 0.5


def assert_float8_evaluates_exactly(module, switch, **overrides):
    """A model trained with --switch=full evaluates exactly as the same weights with the switch off: float8 is for
    training's products only."""
    model, cfg = build(module, **{switch: "full"}, **overrides)
    train(model, cfg, module, 2)
    exact, _ = build(module, **{switch: "off"}, **overrides)
    exact.load_state_dict(model.state_dict())
    model.eval()
    exact.eval()
    x, y = batch()
    with torch.no_grad():
        assert torch.equal(model(x, y), exact(x, y))


def assert_recipe_defaults(step, parent, recipe, old):
    """A recipe step (one that changes defaults): its defaults hold `recipe`, its parent's hold `old`, and given `old`
    on the command line, alone or after each preset, the step's config is its parent's (a field that the preset sets
    stays the preset's, in both)."""
    assert {field: getattr(step.Config(), field) for field in recipe} == recipe
    assert {field: getattr(parent.Config(), field) for field in old} == old
    for name in (None, "bench100m", "demo"):
        preset = [f"--preset={name}"] if name else []
        given = [f"--{field}={value}" for field, value in old.items() if field not in step.PRESETS.get(name, {})]
        assert dataclasses.asdict(step.parse_config(preset + given)) == dataclasses.asdict(parent.parse_config(preset))


def traced_run(module, monkeypatch, data, out_dir, **overrides):
    """(the result of module.main, every function or module given to torch.compile): a tiny run of a lineage step
    with every torch.compile call recorded and given dynamo's eager backend (traced, nothing goes to inductor)."""
    compiled = []

    def recording_compile(fn, **kwargs):
        compiled.append(fn)
        return REAL_COMPILE(fn, backend="eager")
    monkeypatch.setattr(torch, "compile", recording_compile)
    args = {**dict(max_steps=4, attention="sdpa", blockmask_from_kv_blocks=False, window=0, window_ramp=False,
                   kernel_warmup_steps=0, val_every=2, run_name=str(len(list(out_dir.iterdir())))), **overrides}
    return module.main(tiny_args(module.__file__, data, out_dir, **args)), compiled
