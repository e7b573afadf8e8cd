"""--short_window_ratio (step 40, off until measured): every block but the first, the middle (n_layer // 2) and the
last attends over that share of the sliding window (whole 128-token blocks, at least one). Off, the step is its
parent (step 39). On the CPU the masks go to SDPA as dense masks, so each block's mask can be read directly."""
import pytest
import torch

from conftest import load_script, script_number, step_adding

LEVER_SCRIPT = step_adding("short_window_ratio")
lever = load_script(LEVER_SCRIPT)
parent_step = load_script(script_number(LEVER_SCRIPT) - 1)

# 512-token sequences and a 512-token window of whole blocks: the short layers' half window (256) binds.
TINY = dict(vocab_size=128, block_size=512, n_layer=4, n_head=2, n_embd=32, window=512, window_ramp=False,
            attention="flex", blockmask_from_kv_blocks=True, compile=False, learning_rate=1e-2, muon_lr=1e-2,
            muon_update_scale="aspect", value_embeddings=1)


def build(module, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = module.Config(**{**TINY, **overrides})
    return module.GPT(cfg), cfg


def tokens(seed=1, B=1, T=512):
    generator = torch.Generator().manual_seed(seed)
    data = torch.randint(0, TINY["vocab_size"], (B, T + 1), generator=generator)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def masks_seen(monkeypatch, model):
    """The mask each block gets in one forward, in block order."""
    seen = []
    for block in model.transformer.h:
        original = block.forward

        def recording(x, mask=None, *rest, original=original):
            seen.append(mask)
            return original(x, mask, *rest)
        monkeypatch.setattr(block, "forward", recording)
    return seen


def keys_per_query(mask):
    return mask[0, 0].sum(dim=-1)  # (T,): how many keys each query attends to


def test_off_by_default_and_off_is_the_parent():
    assert lever.Config().short_window_ratio == 0.0 and not hasattr(parent_step.Config, "short_window_ratio")
    model, cfg = build(lever)
    parent, _ = build(parent_step)
    x, y = tokens()
    with torch.no_grad():
        assert torch.equal(model(x, y), parent(x, y))
    assert lever.long_window_layers(cfg) == {0, 1, 2, 3}


def test_the_first_middle_and_last_blocks_keep_the_window(monkeypatch):
    model, cfg = build(lever, short_window_ratio=0.5)
    assert lever.long_window_layers(cfg) == {0, 2, 3}
    seen = masks_seen(monkeypatch, model)
    x, _ = tokens()
    with torch.no_grad():
        model(x)
    long, short = keys_per_query(seen[0]), keys_per_query(seen[1])
    assert torch.equal(seen[0], seen[2]) and torch.equal(seen[0], seen[3])
    assert long.max() == 512 and short.max() == 256  # the query's own block and 3 (long) or 1 (short) before it
    assert (short <= long).all() and (short < long).any()
    assert torch.equal(short[:256], long[:256])  # the first two blocks' queries have no more keys to lose


def test_short_width_is_whole_blocks_and_at_least_one():
    cases = [(1280, 0.5, "block", 640), (1280, 0.3, "block", 384), (128, 0.5, "block", 128),
             (100, 0.25, "token", 25), (3, 0.1, "token", 1)]
    for window, ratio, unit, expected in cases:
        model, _ = build(lever, window=window, window_unit=unit, short_window_ratio=ratio)
        assert model.short_window().item() == expected, (window, ratio, unit)
        model.window.fill_(window * 2)  # the ramp changes the buffer in place: the short width follows
        assert model.short_window().item() >= expected


def test_on_changes_the_loss_and_still_trains():
    model, cfg = build(lever, short_window_ratio=0.5)
    exact, _ = build(lever)
    x, y = tokens()
    with torch.no_grad():
        assert not torch.equal(model(x, y), exact(x, y))
    optimizer = lever.configure_optimizer(model, cfg, "cpu")
    losses = []
    for _ in range(6):
        optimizer.zero_grad(set_to_none=True)
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3


@pytest.mark.parametrize("args, message", [
    (["--short_window_ratio=1.0"], "--short_window_ratio=1.0 must be in"),
    (["--short_window_ratio=-0.5"], "--short_window_ratio=-0.5 must be in"),
    (["--short_window_ratio=0.5", "--window=0", "--window_ramp=false"], r"needs a sliding window \(--window=0\)"),
])
def test_bad_values_are_refused(args, message):
    with pytest.raises(SystemExit, match=message):
        lever.parse_config(args)
