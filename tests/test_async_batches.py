"""--async_batches (step 33, on by default): the train batches are read one ahead and copied to the device while
the current micro-step computes. The stream of batches, the checkpoints' loader position, the warm-up's restore and
every loss stay exactly what they are with the switch off (the parent, step 32)."""
import os

import numpy as np
import pytest
import torch

from conftest import load_script, script_number, step_adding

LEVER_SCRIPT = step_adding("async_batches")
lever = load_script(LEVER_SCRIPT)
parent = load_script(script_number(LEVER_SCRIPT) - 1)

# A tiny CPU run: 2 micro-steps per step (accumulation), so read-ahead crosses micro-steps and steps alike. The
# switch off, as the parent: a test that wants it on says so.
TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=32, batch_size=2, total_batch_size=128, max_steps=6,
            warmup_steps=0, learning_rate=3e-3, lr_decay_tokens=0, device="cpu", compile=False, attention="sdpa",
            blockmask_from_kv_blocks=False, window=0, window_ramp=False, kernel_warmup_steps=0, val_target=0.0,
            val_tokens=256, val_every=0, ckpt_every=0, sample_every=0, async_batches=False)


def write_shards(folder, count=3, tokens=700):
    """count train shards and one val shard of a repeating pattern (learnable) in token ids below 128. With
    TINY's micro-batches of 2 x 32 tokens, a 700-token shard gives 10 of them (5 steps), then the next shard."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, 128, 50)
    for name in [f"tiny_train_{i:06d}.npy" for i in range(count)] + ["tiny_val_000000.npy"]:
        offset = int(rng.integers(0, 50))
        np.save(os.path.join(folder, name), np.resize(np.roll(pattern, offset), tokens).astype(np.uint16))
    return str(folder)


def args(data, out_dir, **overrides):
    return [f"--{key}={value}" for key, value in {**TINY, "data": data, "out_dir": out_dir, **overrides}.items()]


def recording_forward(module, monkeypatch):
    """Every training (x, y) the model is fed, in order: the batches the loop consumes."""
    consumed = []
    real_forward = module.GPT.forward

    def forward(self, idx, targets=None):
        if self.training and targets is not None:
            consumed.append((idx.clone(), targets.clone()))
        return real_forward(self, idx, targets)

    monkeypatch.setattr(module.GPT, "forward", forward)
    return consumed


def same_batches(a, b):
    return len(a) == len(b) and all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(a, b))


def test_the_switch_is_on_by_default_and_listed_in_help(capsys):
    assert lever.Config().async_batches is True and not hasattr(parent.Config, "async_batches")
    with pytest.raises(SystemExit):
        lever.parse_config(["--help"])
    assert "--async_batches=True" in capsys.readouterr().out
    assert lever.parse_config(["--async_batches=false"]).async_batches is False


def test_a_value_that_is_not_a_bool_is_refused():
    with pytest.raises(lever.ConfigError, match="async_batches"):
        lever.check_config(lever.Config(async_batches="false"))
    with pytest.raises(lever.ConfigError, match="async_batches"):
        lever.parse_config(["--async_batches=maybe"])


def test_off_builds_and_trains_exactly_as_the_parent(tmp_path):
    torch.manual_seed(3)
    ours = lever.GPT(lever.Config(**TINY))
    parents_tiny = {key: value for key, value in TINY.items() if key != "async_batches"}
    torch.manual_seed(3)
    theirs = parent.GPT(parent.Config(**parents_tiny))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(ours.state_dict()[k], theirs.state_dict()[k]) for k in theirs.state_dict())
    data = write_shards(tmp_path / "shards")
    off = lever.main(args(data, tmp_path / "runs", run_name="off"))
    theirs_run = parent.main([f"--{key}={value}" for key, value in parents_tiny.items()] +
                             [f"--data={data}", f"--out_dir={tmp_path / 'runs'}", "--run_name=parent"])
    assert off["losses"] == theirs_run["losses"] and off["val_losses"] == theirs_run["val_losses"]


def test_on_consumes_the_same_batches_and_gives_the_same_losses(tmp_path, monkeypatch):
    data = write_shards(tmp_path / "shards")
    consumed = recording_forward(lever, monkeypatch)
    off = lever.main(args(data, tmp_path / "runs", run_name="off", max_steps=8))
    plain = list(consumed)
    consumed.clear()
    on = lever.main(args(data, tmp_path / "runs", run_name="on", max_steps=8, async_batches=True))
    assert len(plain) == 8 * 2  # 8 steps of 2 micro-steps: 16 batches, from two shards
    assert same_batches(consumed, plain)
    assert on["losses"] == off["losses"] and on["val_losses"] == off["val_losses"]
    assert on["losses"][-1] < on["losses"][0] - 1.0  # it trains


def test_the_loop_reads_one_batch_ahead(tmp_path, monkeypatch):
    """Switch on, the loop asks for the next batch right after each micro-step's backward: the wrapper is used,
    not silently skipped."""
    reads = []
    real_read = lever.AsyncBatches.read

    def read(self):
        reads.append(self.loader.state_dict())
        return real_read(self)

    monkeypatch.setattr(lever.AsyncBatches, "read", read)
    data = write_shards(tmp_path / "shards")
    lever.main(args(data, tmp_path / "runs", run_name="on", max_steps=3, async_batches=True))
    assert len(reads) == 3 * 2 + 1  # every batch trained on, and the one after the last (never used)
    lever.main(args(data, tmp_path / "runs", run_name="off", max_steps=3))
    assert len(reads) == 7  # off: no wrapper at all


def test_the_state_names_the_next_batch_to_train_on_not_the_one_read_ahead(tmp_path):
    train = lever.find_shards(write_shards(tmp_path / "shards", count=4, tokens=500), "train")
    for rank in (0, 1):
        plain = lever.DataLoaderLite(train, 2, 32, rank, 2, seed=5, shuffle=True)
        expected, states = [], []
        for _ in range(20):  # 3 batches of 2 ranks per 500-token shard: shard and epoch switches on the way
            states.append(plain.state_dict())
            expected.append(plain.next_batch())
        ahead = lever.AsyncBatches(lever.DataLoaderLite(train, 2, 32, rank, 2, seed=5, shuffle=True),
                                       torch.device("cpu"))
        got = []
        for i in range(20):
            assert ahead.state_dict() == states[i]
            got.append(ahead.next_batch())
            ahead.read_ahead()
            ahead.read_ahead()  # a second call reads nothing more
            if i + 1 < 20:
                assert ahead.state_dict() == states[i + 1]  # not the loader's own, one batch further
                assert ahead.loader.state_dict() != states[i + 1]
        assert same_batches(got, expected)
        # load_state_dict drops the batch read ahead: the next one comes from the position loaded
        ahead.load_state_dict(states[7])
        assert same_batches([ahead.next_batch() for _ in range(13)], expected[7:])


def test_no_pinned_memory_off_cuda(tmp_path, monkeypatch):
    def refuse(tensor, *args, **kwargs):
        raise AssertionError("pin_memory called for a CPU device")

    monkeypatch.setattr(torch.Tensor, "pin_memory", refuse)
    train = lever.find_shards(write_shards(tmp_path / "shards"), "train")
    ahead = lever.AsyncBatches(lever.DataLoaderLite(train, 2, 32, seed=5, shuffle=True), torch.device("cpu"))
    x, y = ahead.next_batch()
    ahead.read_ahead()
    assert x.device.type == "cpu" and x.dtype == torch.int64 and x.shape == y.shape == (2, 32)


def test_on_cuda_the_copy_is_pinned_and_non_blocking(tmp_path, monkeypatch):
    """No GPU here: pin_memory and to() are recorded, so the CUDA branch is checked to pin and not block."""
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda tensor: calls.append("pin") or tensor)
    monkeypatch.setattr(torch.Tensor, "to", lambda tensor, device, non_blocking=False: calls.append(
        (device.type, non_blocking)) or tensor)
    train = lever.find_shards(write_shards(tmp_path / "shards"), "train")
    ahead = lever.AsyncBatches(lever.DataLoaderLite(train, 2, 32, seed=5, shuffle=True), torch.device("cuda"))
    ahead.next_batch()
    assert calls == ["pin", ("cuda", True)] * 2


def test_a_resumed_run_continues_with_the_same_batches(tmp_path, monkeypatch):
    data = write_shards(tmp_path / "shards")
    consumed = recording_forward(lever, monkeypatch)
    off = lever.main(args(data, tmp_path / "runs", run_name="off", ckpt_every=3))
    whole = list(consumed)
    consumed.clear()
    on = lever.main(args(data, tmp_path / "runs", run_name="on", ckpt_every=3, async_batches=True))
    assert same_batches(consumed, whole) and on["losses"] == off["losses"]
    saved = {name: torch.load(os.path.join(tmp_path, "runs", name, "checkpoints", "step_000003", "state.pt"),
                              weights_only=True)["loader"] for name in ("off", "on")}
    assert saved["on"] == saved["off"]  # the next batch to train on, not the one read ahead
    consumed.clear()
    resumed = lever.main(args(data, tmp_path / "runs", async_batches=True,
                                  resume=os.path.join(tmp_path, "runs", "on", "checkpoints", "step_000003")))
    assert same_batches(consumed, whole[3 * 2:])
    assert resumed["losses"] == on["losses"][3:]


def test_the_kernel_warm_up_puts_the_read_ahead_position_back(tmp_path, monkeypatch):
    data = write_shards(tmp_path / "shards")
    consumed = recording_forward(lever, monkeypatch)
    plain = lever.main(args(data, tmp_path / "runs", run_name="plain", max_steps=4))
    expected = list(consumed)
    consumed.clear()
    warmed = lever.main(args(data, tmp_path / "runs", run_name="warmed", max_steps=4, async_batches=True,
                                 kernel_warmup_steps=2))
    assert same_batches(consumed[:2], expected[:2])  # the warm-up's two throwaway batches, one per step
    assert same_batches(consumed[2:], expected)  # then training from the same first batch
    assert warmed["losses"] == plain["losses"]


def test_state_dict_round_trips_the_trained_model(tmp_path):
    data = write_shards(tmp_path / "shards")
    run = lever.main(args(data, tmp_path / "runs", run_name="on", max_steps=2, async_batches=True))
    rebuilt = lever.GPT(lever.Config(**TINY))
    rebuilt.load_state_dict(run["model"].state_dict())
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in run["model"].state_dict().items())
