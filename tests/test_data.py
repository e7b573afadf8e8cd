"""The shard loader (from step 03): fineweb-npy.py's layout, per-epoch shuffle, disjoint ranks, exact restore."""
import os

import numpy as np
import pytest
import torch

from conftest import load_script, scripts_from, tiny_args

SHARD_TOKENS = 1000


def write_shards(folder, n_train=5, dtype=np.uint16):
    """Shard k holds the tokens k*SHARD_TOKENS .. k*SHARD_TOKENS+999: every token names its shard and place."""
    os.makedirs(folder, exist_ok=True)
    for k in range(n_train + 1):
        split = "val" if k == 0 else "train"
        tokens = np.arange(k * SHARD_TOKENS, (k + 1) * SHARD_TOKENS).astype(dtype)
        np.save(os.path.join(folder, f"edufineweb_{split}_{k:06d}.npy"), tokens)
    return str(folder)


def batches(loader, n):
    return [loader.next_batch() for _ in range(n)]


@pytest.mark.parametrize("script", scripts_from(3))
def test_reads_fineweb_layout_and_shuffles_each_epoch_from_the_seed(script, tmp_path):
    module = load_script(script)
    folder = write_shards(tmp_path / "shards")
    train, val = module.find_shards(folder, "train"), module.find_shards(folder, "val")
    assert [os.path.basename(p) for p in val] == ["edufineweb_val_000000.npy"]
    assert len(train) == 5

    def shard_order(seed, epochs=2):
        loader = module.DataLoaderLite(train, 4, 32, seed=seed)
        per_shard = (SHARD_TOKENS - 1) // 128  # full batches of 4 x 32 in a shard of 1000 tokens
        order = [int(x[0, 0]) // SHARD_TOKENS for x, _ in batches(loader, per_shard * 5 * epochs)[::per_shard]]
        return order[:5], order[5:]

    epoch0, epoch1 = shard_order(seed=1)
    assert sorted(epoch0) == sorted(epoch1) == [1, 2, 3, 4, 5]  # each epoch visits every train shard once
    assert epoch0 != epoch1  # in a new order
    assert shard_order(seed=1) == (epoch0, epoch1)  # reproducible from the run seed
    assert shard_order(seed=2) != (epoch0, epoch1)


@pytest.mark.parametrize("script", scripts_from(3))
def test_ranks_read_disjoint_data_that_together_is_the_single_process_stream(script, tmp_path):
    module = load_script(script)
    train = module.find_shards(write_shards(tmp_path / "shards"), "train")
    # Within a shard (30 batches of 32 tokens), the two ranks' batches are the single process's, interleaved.
    single = batches(module.DataLoaderLite(train, 2, 16, seed=3), 30)
    rank0 = batches(module.DataLoaderLite(train, 2, 16, rank=0, world_size=2, seed=3), 15)
    rank1 = batches(module.DataLoaderLite(train, 2, 16, rank=1, world_size=2, seed=3), 15)
    seen0 = {int(t) for x, _ in rank0 for t in x.flatten()}
    seen1 = {int(t) for x, _ in rank1 for t in x.flatten()}
    assert not seen0 & seen1
    assert seen0 | seen1 == {int(t) for x, _ in single for t in x.flatten()}
    # Past the shard's end both ranks move on together, to the same next shard.
    after0, after1 = batches(module.DataLoaderLite(train, 2, 16, rank=0, world_size=2, seed=3), 40), \
        batches(module.DataLoaderLite(train, 2, 16, rank=1, world_size=2, seed=3), 40)
    assert [int(x[0, 0]) // SHARD_TOKENS for x, _ in after0] == [int(x[0, 0]) // SHARD_TOKENS for x, _ in after1]
    x, y = rank1[0]
    assert (y[:, :-1] == x[:, 1:]).all()  # targets are the inputs shifted by one


@pytest.mark.parametrize("script", scripts_from(3))
def test_position_is_saved_and_restored_exactly(script, tmp_path):
    module = load_script(script)
    train = module.find_shards(write_shards(tmp_path / "shards"), "train")
    loader = module.DataLoaderLite(train, 4, 32, rank=1, world_size=2, seed=5)
    batches(loader, 9)  # past a shard boundary
    state = loader.state_dict()
    expected = batches(loader, 12)
    restored = module.DataLoaderLite(train, 4, 32, rank=1, world_size=2, seed=5)
    restored.load_state_dict(state)
    for (x, y), (x2, y2) in zip(expected, batches(restored, 12)):
        assert (x == x2).all() and (y == y2).all()


@pytest.mark.parametrize("script", scripts_from(3))
def test_trains_on_a_shard_folder(script, tmp_path):
    module = load_script(script)
    folder = write_shards(tmp_path / "shards")
    result = module.main(tiny_args(script, folder, tmp_path / "runs", max_steps=2))
    assert len(result["losses"]) == 2


@pytest.mark.parametrize("script", scripts_from(3))
def test_text_file_holds_out_its_tail_as_val(script, shakespeare, tmp_path):
    module = load_script(script)
    cfg = module.parse_config(tiny_args(script, shakespeare, tmp_path, val_fraction=0.25))
    (train,), (val,) = module.data_splits(cfg)
    tokens = module.load_text_tokens(shakespeare)
    assert len(val) == int(len(tokens) * 0.25)
    assert np.array_equal(np.concatenate([train, val]), tokens)


@pytest.mark.parametrize("script", scripts_from(3))
def test_bad_data_fails_early_with_the_fix(script, tmp_path):
    module = load_script(script)
    with pytest.raises(SystemExit, match="no such folder or file.*fineweb-npy.py"):
        module.data_splits(module.parse_config([f"--data={tmp_path / 'nowhere'}"]))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no \\*_train_NNNNNN.npy shards"):
        module.data_splits(module.parse_config([f"--data={empty}"]))
    wrong = write_shards(tmp_path / "int32", dtype=np.int32)
    with pytest.raises(SystemExit, match="int32 array; a shard must be 1-D uint16"):
        module.DataLoaderLite(module.find_shards(wrong, "train"), 4, 32)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "x_train_000001.npy").write_bytes(b"not numpy at all")
    with pytest.raises(SystemExit, match="is not a .npy array"):
        module.DataLoaderLite(module.find_shards(str(garbage), "train"), 4, 32)


@pytest.mark.parametrize("script", scripts_from(3))
def test_shuffled_sequences_cover_each_shard_once_in_a_seeded_order(script, tmp_path):
    """shuffle: every batch row is a whole T-token sequence of the shard (with its next token as the last target),
    a pass over a shard reads no sequence twice, in an order fixed by the seed; off, the rows are the shard front
    to back, as in the parent."""
    module = load_script(script)
    train = module.find_shards(write_shards(tmp_path / "shards", n_train=1), "train")
    per_shard = (SHARD_TOKENS - 1) // 32 // 2  # batches of 2 x 32 in one pass

    def starts(seed, shuffle):
        loader = module.DataLoaderLite(train, 2, 32, seed=seed, shuffle=shuffle)
        rows = []
        for x, y in batches(loader, per_shard):
            assert (x[:, 1:] == y[:, :-1]).all() and (y[:, -1] == x[:, -1] + 1).all()  # the next token, always
            assert ((x - x[:, :1]) == torch.arange(32)).all()  # a contiguous run of the shard
            rows += [int(t) - SHARD_TOKENS for t in x[:, 0]]
        return rows

    in_order = starts(1, shuffle=False)
    assert in_order == list(range(0, per_shard * 64, 32))
    shuffled = starts(1, shuffle=True)
    whole = set(range(0, (SHARD_TOKENS - 1) // 32 * 32, 32))  # the shard's 31 whole sequences (with a next token)
    assert shuffled != in_order and len(set(shuffled)) == len(shuffled) == len(in_order)  # none twice
    assert set(shuffled) <= whole and set(shuffled[:8]) - set(in_order[:8])  # from all over the shard
    assert starts(1, shuffle=True) == shuffled and starts(2, shuffle=True) != shuffled


@pytest.mark.parametrize("script", scripts_from(3))
def test_shuffled_ranks_together_read_the_single_process_stream_and_resume(script, tmp_path):
    module = load_script(script)
    train = module.find_shards(write_shards(tmp_path / "shards"), "train")
    # Within a shard (30 batches of 2 x 16 before the two ranks move on), the ranks' batches are the single
    # process's, interleaved: the same shuffled order on every rank.
    single = batches(module.DataLoaderLite(train, 2, 16, seed=3, shuffle=True), 30)
    ranks = [batches(module.DataLoaderLite(train, 2, 16, rank=r, world_size=2, seed=3, shuffle=True), 15)
             for r in (0, 1)]
    assert [x.tolist() for x, _ in single] == [x.tolist() for pair in zip(*ranks) for x, _ in pair]
    loader = module.DataLoaderLite(train, 2, 16, rank=1, world_size=2, seed=3, shuffle=True)
    batches(loader, 37)  # past a shard boundary
    state, expected = loader.state_dict(), batches(loader, 10)
    restored = module.DataLoaderLite(train, 2, 16, rank=1, world_size=2, seed=3, shuffle=True)
    restored.load_state_dict(state)
    assert [x.tolist() for x, _ in batches(restored, 10)] == [x.tolist() for x, _ in expected]
