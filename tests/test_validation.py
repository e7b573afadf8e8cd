"""Validation (from step 04): exactly val_tokens tokens, the same set every time, on schedule, timed apart."""
import math
import time

import numpy as np
import pytest
import torch

from conftest import load_script, logged_steps, scripts_from, tiny_args


class TargetMean(torch.nn.Module):
    """A stand-in model whose 'loss' is the mean target token id: it shows which tokens were scored."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def forward(self, x, y):
        self.seen += y.numel()
        return y.float().mean()


@pytest.mark.parametrize("script", scripts_from(4))
def test_scores_exactly_the_first_val_tokens(script, tmp_path, monkeypatch):
    module = load_script(script)
    cfg = module.parse_config([f"--data={tmp_path}", "--batch_size=2", "--block_size=8", "--val_tokens=64",
                               "--total_batch_size=16"])
    val = [np.arange(1000, dtype=np.uint16)]
    model = TargetMean()
    first = module.evaluate(model, val, cfg, 0, 1, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    assert model.seen == 64
    assert first == pytest.approx(np.arange(1, 65).mean())  # targets are tokens 1..64: the start of the split
    again = module.evaluate(model, val, cfg, 0, 1, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    assert again == first  # the same tokens every time
    # two ranks: each scores half the batches, and the average of their means is the same number (the
    # all-reduce is a no-op here, so each rank returns its own mean / 2 and the two add up to the average)
    monkeypatch.setattr(module.dist, "all_reduce", lambda tensor: None)
    cfg2 = module.parse_config([f"--data={tmp_path}", "--batch_size=2", "--block_size=8", "--val_tokens=64",
                                "--total_batch_size=32"])
    halves = [module.evaluate(TargetMean(), val, cfg2, r, 2, torch.device("cpu"),
                              torch.autocast("cpu", enabled=False)) for r in (0, 1)]
    assert sum(halves) == pytest.approx(first)


@pytest.mark.parametrize("script", scripts_from(4))
def test_validates_on_schedule_with_ppl(script, shakespeare, tmp_path):
    module = load_script(script)
    result = module.main(tiny_args(script, shakespeare, tmp_path, max_steps=5, val_every=2, run_name="r"))
    val = logged_steps(result["run_dir"], "val_loss")
    assert sorted(val) == [0, 2, 4, 5]
    assert [s for s, _ in result["val_losses"]] == [0, 2, 4, 5]
    ppl = logged_steps(result["run_dir"], "val_ppl")
    assert ppl[5] == pytest.approx(math.exp(val[5]), rel=1e-3)
    assert val[5] < val[0]
    only_end = module.main(tiny_args(script, shakespeare, tmp_path, max_steps=3, val_every=0, run_name="e"))
    assert sorted(logged_steps(only_end["run_dir"], "val_loss")) == [3]


@pytest.mark.parametrize("script", scripts_from(4))
def test_validation_time_is_not_training_time(script, shakespeare, tmp_path, monkeypatch):
    module = load_script(script)
    real_evaluate = module.evaluate

    def slow_evaluate(*args):
        time.sleep(0.5)
        return real_evaluate(*args)

    monkeypatch.setattr(module, "evaluate", slow_evaluate)
    start = time.perf_counter()
    result = module.main(tiny_args(script, shakespeare, tmp_path, max_steps=3, val_every=1, run_name="r"))
    wall = time.perf_counter() - start
    train_time = logged_steps(result["run_dir"], "val_loss") and float(
        open(f"{result['run_dir']}/log.txt").read().split("train_time:")[-1].split("ms")[0]) / 1000
    assert train_time < wall - 4 * 0.5  # four validations slept 2 s that training time does not count


@pytest.mark.parametrize("script", scripts_from(4))
def test_val_split_must_hold_val_tokens(script, shakespeare, tmp_path):
    module = load_script(script)
    with pytest.raises(SystemExit, match="--val_tokens=1048576 is more than the val split"):
        module.main(tiny_args(script, shakespeare, tmp_path, val_tokens=1048576))
    with pytest.raises(SystemExit, match="--val_tokens=100 is not a positive multiple"):
        module.parse_config(tiny_args(script, shakespeare, tmp_path, val_tokens=100))
    with pytest.raises(SystemExit, match="no \\*_val_NNNNNN.npy shard"):
        module.check_val_split([], module.parse_config([]))


@pytest.mark.parametrize("script", scripts_from(4))
def test_val_reads_its_shards_in_file_order(script, tmp_path):
    """With several val shards the val set is the start of the first one, whatever the seed (the train loader
    shuffles shards per seed; validation must not)."""
    module = load_script(script)
    val = [np.full(100, 7, dtype=np.uint16), np.full(100, 9, dtype=np.uint16)]
    for seed in range(4):  # with two shards, half the seeds would put the second one first
        cfg = module.parse_config([f"--data={tmp_path}", "--batch_size=2", "--block_size=8", "--val_tokens=16",
                                   "--total_batch_size=16", f"--seed={seed}"])
        assert module.evaluate(TargetMean(), val, cfg, 0, 1, torch.device("cpu"),
                               torch.autocast("cpu", enabled=False)) == 7
