"""Kernel warm-up (from step 25): throwaway steps and a validation run before the clock, and afterwards the
model, the optimizer's state, the data position and the RNG are bit for bit what they were."""
import copy

import pytest
import torch

from conftest import load_script, read_log, scripts_from, tiny_args
from test_data import write_shards


def same(a, b):
    """Equal bit for bit, through nested dicts and lists of tensors."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("script", scripts_from(25))
@pytest.mark.parametrize("optimizer_name", ["adamw", "muon"])
def test_warm_up_puts_everything_back(script, optimizer_name, tmp_path, monkeypatch):
    module = load_script(script)
    folder = write_shards(tmp_path / "shards")
    cfg = module.parse_config(tiny_args(script, folder, tmp_path, n_layer=1, optimizer=optimizer_name,
                                        kernel_warmup_steps=3))
    train, val = module.data_splits(cfg)
    torch.manual_seed(0)
    model = module.GPT(cfg)
    optimizer = module.configure_optimizer(model, cfg, "cpu")
    loader = module.DataLoaderLite(train, cfg.batch_size, cfg.block_size, seed=cfg.seed)
    for _ in range(6):  # real steps first: the optimizer has state and the loader is near a shard's end
        optimizer.zero_grad()
        x, y = loader.next_batch()
        model(x, y).backward()
        optimizer.step()
    weights = copy.deepcopy(model.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    loader_state, rng = loader.state_dict(), torch.get_rng_state()
    untouched = module.DataLoaderLite(train, cfg.batch_size, cfg.block_size, seed=cfg.seed)
    untouched.load_state_dict(loader_state)

    real_evaluate, moved = module.evaluate, []

    def checking_evaluate(*args, **kwargs):  # by the validation, the throwaway steps have changed the weights
        moved.append(not same(model.state_dict(), weights))
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(module, "evaluate", checking_evaluate)
    modes = []
    hook = model.register_forward_pre_hook(lambda m, args: modes.append("train" if m.training else "eval"))
    module.warm_up_kernels(model, model, optimizer, loader, val, cfg, 0, 1, torch.device("cpu"),
                           torch.autocast("cpu", enabled=False))
    hook.remove()
    assert moved == [True]
    # one validation batch compiles the validation's kernels; the whole set (more batches here) would only cost time
    B, T = module.val_shape(cfg)
    assert cfg.val_tokens // (B * T) > 1 and modes == ["train"] * 3 + ["eval"]
    assert same(model.state_dict(), weights)
    assert same(optimizer.state_dict(), optimizer_state)
    assert loader.state_dict() == loader_state
    assert torch.equal(torch.get_rng_state(), rng)
    for _ in range(3):  # across the shard switch the warm-up's reads had made
        (x, y), (x2, y2) = loader.next_batch(), untouched.next_batch()
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("script", scripts_from(25))
def test_a_warmed_up_run_trains_exactly_as_a_cold_one(script, shakespeare, tmp_path):
    module = load_script(script)
    args = dict(max_steps=3, n_layer=1, learning_rate=1e-2, sample_every=0, ckpt_every=0)
    cold = module.main(tiny_args(script, shakespeare, tmp_path, run_name="cold", **args))
    warm = module.main(tiny_args(script, shakespeare, tmp_path, run_name="warm", kernel_warmup_steps=2, **args))
    assert warm["losses"] == cold["losses"] and warm["val_losses"] == cold["val_losses"]
    assert [row["kernel_warmup_steps"] for row in read_log(warm["run_dir"]) if "kernel_warmup_steps" in row] == ["2"]
    with pytest.raises(SystemExit, match="--kernel_warmup_steps=-1 must be >= 0"):
        module.parse_config(["--kernel_warmup_steps=-1"])
