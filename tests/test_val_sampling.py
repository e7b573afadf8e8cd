"""Step 26's feature: the val set is the first val_tokens tokens of the val split (the speedrun's fixed set, the
default) or a fixed, seeded set of whole sequences drawn from the whole split (--val_sampling=shuffled)."""
import numpy as np
import pytest
import torch

from conftest import load_script, logged_steps, scripts_from, tiny_args

ARGS = ["--batch_size=2", "--block_size=8", "--val_tokens=64", "--total_batch_size=32"]


class RecordBatches(torch.nn.Module):
    """A stand-in model whose 'loss' is the mean target token id; it keeps every batch it scores. With tokens
    that count up (the val split is np.arange), a token's value is its position: the batches show what was read."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, x, y):
        self.batches.append((x, y))
        return y.view(-1).float().mean()  # view, as the model does: the batch must be contiguous


def evaluate_at(module, val, cfg, world_size, monkeypatch):
    """(value, rows) of evaluate run by every rank of world_size in turn: the value is what the all-reduce would
    give (it is a no-op here, so each rank returns its mean / world_size and the sum is the average), rows are
    the (input, target) sequences all ranks scored, each as one row of T + 1 tokens, sorted."""
    monkeypatch.setattr(module.dist, "all_reduce", lambda tensor: None)
    value, rows = 0.0, []
    for rank in range(world_size):
        model = RecordBatches()
        value += module.evaluate(model, val, cfg, rank, world_size, torch.device("cpu"),
                                 torch.autocast("cpu", enabled=False))
        for x, y in model.batches:
            assert torch.equal(x[:, 1:], y[:, :-1])  # the targets are the inputs shifted by one token
            rows += torch.cat([x, y[:, -1:]], dim=1).tolist()
    return value, sorted(rows)


@pytest.mark.parametrize("script", scripts_from(26))
def test_first_is_the_first_val_tokens_at_any_world_size(script, tmp_path, monkeypatch):
    module = load_script(script)
    cfg = module.parse_config([f"--data={tmp_path}", *ARGS])
    assert cfg.val_sampling == "first"  # the default: the speedrun's set, as the parent scored it
    val = [np.arange(4000, dtype=np.uint16)]
    for world_size in (1, 2):
        value, rows = evaluate_at(module, val, cfg, world_size, monkeypatch)
        inputs = sorted(token for row in rows for token in row[:-1])
        targets = sorted(token for row in rows for token in row[1:])
        assert inputs == list(range(64)) and targets == list(range(1, 65))  # exactly the first 64, in order
        assert value == pytest.approx(np.arange(1, 65).mean())


@pytest.mark.parametrize("script", scripts_from(26))
def test_shuffled_is_a_fixed_set_of_whole_sequences_from_the_whole_split(script, tmp_path, monkeypatch):
    module = load_script(script)
    cfg = module.parse_config([f"--data={tmp_path}", *ARGS, "--val_sampling=shuffled"])
    first = module.parse_config([f"--data={tmp_path}", *ARGS])
    # two shards, the second counting on from 30000: a sequence across the boundary would show a jump
    val = [np.arange(2000, dtype=np.uint16), np.arange(30000, 32000, dtype=np.uint16)]
    value, rows = evaluate_at(module, val, cfg, 1, monkeypatch)
    assert len(rows) == 64 // 8 and len({tuple(row) for row in rows}) == len(rows)  # 8 different sequences
    for row in rows:
        assert row == list(range(row[0], row[0] + 9))  # whole: 8 consecutive inputs and the next token
        assert (row[0] if row[0] < 30000 else row[0] - 30000) % 8 == 0  # cut at multiples of block_size
    assert any(row[0] < 2000 for row in rows) and any(row[0] >= 30000 for row in rows)  # from both shards
    assert max(row[0] for row in rows) > 30000 + 1000  # not the start of the split
    assert rows != evaluate_at(module, val, first, 1, monkeypatch)[1]  # not first's set
    assert evaluate_at(module, val, cfg, 1, monkeypatch) == (value, rows)  # the same set at every call
    two_value, two_rows = evaluate_at(module, val, cfg, 2, monkeypatch)
    assert two_rows == rows and two_value == pytest.approx(value)  # and at any world size
    reseeded = module.parse_config([f"--data={tmp_path}", *ARGS, "--val_sampling=shuffled", "--seed=7"])
    assert evaluate_at(module, val, reseeded, 1, monkeypatch)[1] == rows  # runs of any --seed share the set
    assert value == pytest.approx(np.mean([row[1:] for row in rows]))  # the mean over exactly those targets


@pytest.mark.parametrize("script", scripts_from(26))
def test_bad_val_sampling_is_refused(script, tmp_path):
    module = load_script(script)
    with pytest.raises(SystemExit, match="--val_sampling='random' is not one of: first, shuffled"):
        module.parse_config([f"--data={tmp_path}", *ARGS, "--val_sampling=random"])
    # 4 shards of 16 tokens: 64 >= 48 + 1 tokens, but only 4 whole sequences of 8 (+1) tokens, not 48 / 8 = 6
    cfg = module.parse_config([f"--data={tmp_path}", *ARGS, "--val_sampling=shuffled", "--val_tokens=48"])
    short = [np.arange(16, dtype=np.uint16)] * 4
    with pytest.raises(SystemExit, match="--val_sampling=shuffled needs 6 whole sequences.*hold 4; lower --val_t"):
        module.check_val_split(short, cfg)
    module.check_val_split(short, module.parse_config([f"--data={tmp_path}", *ARGS, "--val_tokens=48"]))  # first: ok


@pytest.mark.parametrize("script", scripts_from(26))
def test_a_run_logs_the_shuffled_val_loss(script, shakespeare, tmp_path):
    """Through main(): the logged val loss is the shuffled set's, not the first tokens' (on the same model)."""
    module = load_script(script)
    args = tiny_args(script, shakespeare, tmp_path, max_steps=1, sample_every=0, ckpt_every=0, val_tokens=1024,
                     val_sampling="shuffled", run_name="r")
    result = module.main(args)
    cfg = module.parse_config([a for a in args if not a.startswith("--run_name")])  # that name is taken now
    _, val = module.data_splits(cfg)
    scored = [module.evaluate(result["model"], val, module.Config(**{**vars(cfg), "val_sampling": sampling}), 0, 1,
                              torch.device("cpu"), torch.autocast("cpu", enabled=False))
              for sampling in ("shuffled", "first")]
    assert logged_steps(result["run_dir"], "val_loss") == {1: pytest.approx(scored[0], abs=1e-6)}
    assert abs(scored[0] - scored[1]) > 1e-4  # an untrained model scores both alike, but not equally
