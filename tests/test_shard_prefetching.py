"""Shard prefetching (from step 18): a thread reads the next shard, and the token stream stays exactly the same."""
import threading

import numpy as np
import pytest

from conftest import load_script, scripts_from, tiny_args
from test_data import batches, write_shards


def same_batches(a, b):
    return len(a) == len(b) and all(np.array_equal(x, x2) and np.array_equal(y, y2) for (x, y), (x2, y2) in zip(a, b))


@pytest.mark.parametrize("script", scripts_from(18))
def test_the_stream_is_the_same_across_epochs_and_resumes(script, tmp_path):
    module = load_script(script)
    train = module.find_shards(write_shards(tmp_path / "shards"), "train")
    for rank in (0, 1):
        # 3 batches of 2 ranks x 4 x 32 tokens per 1000-token shard, 5 shards: 40 batches cross two epoch ends
        expected = batches(module.DataLoaderLite(train, 4, 32, rank, 2, seed=5), 40)
        prefetching = module.DataLoaderLite(train, 4, 32, rank, 2, seed=5, prefetch=True)
        states, got = [], []
        for _ in range(40):
            states.append(prefetching.state_dict())
            got.append(prefetching.next_batch())
        assert same_batches(got, expected)
        for start in (2, 3, 14, 15, 16, 29):  # just before, at and after shard and epoch switches
            resumed = module.DataLoaderLite(train, 4, 32, rank, 2, seed=5, prefetch=True)
            resumed.load_state_dict(states[start])
            assert same_batches(batches(resumed, 40 - start), expected[start:]), start


@pytest.mark.parametrize("script", scripts_from(18))
def test_the_next_shard_is_read_by_another_thread(script, tmp_path, monkeypatch):
    module = load_script(script)
    train = module.find_shards(write_shards(tmp_path / "shards"), "train")
    real_load_shard = module.load_shard
    reads = []  # (in the main thread?, in memory?) of each shard read

    def recording_load_shard(path, in_memory=False):
        reads.append((threading.current_thread() is threading.main_thread(), in_memory))
        return real_load_shard(path, in_memory)

    monkeypatch.setattr(module, "load_shard", recording_load_shard)
    batches(module.DataLoaderLite(train, 4, 32, seed=5), 35)  # 7 batches per shard: 5 switches
    assert reads == [(True, False)] * 6  # without prefetching, the training thread reads every shard
    reads.clear()
    loader = module.DataLoaderLite(train, 4, 32, seed=5, prefetch=True)
    batches(loader, 35)
    loader.prefetched[1].result()
    assert reads[0] == (True, False) and reads[1:] == [(False, True)] * 6  # only the first is the main thread's
    assert not isinstance(loader.tokens, np.memmap)  # the switch took the tokens the thread had read


@pytest.mark.parametrize("script", scripts_from(18))
def test_training_with_prefetching_gives_the_same_losses(script, tmp_path):
    module = load_script(script)
    folder = write_shards(tmp_path / "shards")
    # 7 batches of 4 x 32 tokens per shard: 8 steps read two shards
    args = dict(max_steps=8, n_layer=1, sample_every=0, ckpt_every=0)
    plain = module.main(tiny_args(script, folder, tmp_path / "runs", run_name="plain", **args))
    fetched = module.main(tiny_args(script, folder, tmp_path / "runs", run_name="fetched", prefetch_shards=True,
                                    **args))
    assert fetched["losses"] == plain["losses"]
