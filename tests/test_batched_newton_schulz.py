"""--muon_batched_ns (step 38, on by default): Muon orthogonalizes the matrices of one shape as one stack.
The updates are the block-by-block ones (same math, batched products), Newton-Schulz runs once per shape, and
off the step trains exactly as its parent (step 37)."""
import os

import pytest
import torch

from lever_helpers import build, lever_and_parent, train

lever, parent_step = lever_and_parent("muon_batched_ns")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def count_newton_schulz(monkeypatch, module):
    shapes = []
    original = module.newton_schulz

    def counting(G, steps):
        shapes.append(tuple(G.shape))
        return original(G, steps)
    monkeypatch.setattr(module, "newton_schulz", counting)
    return shapes


def test_on_by_default_and_off_is_the_parent():
    assert lever.Config().muon_batched_ns is True and not hasattr(parent_step.Config, "muon_batched_ns")
    model, cfg = build(lever, muon_batched_ns=False)
    parent, parent_cfg = build(parent_step)
    assert train(model, cfg, lever, 3) == train(parent, parent_cfg, parent_step, 3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), parent.state_dict().values()))


def test_newton_schulz_runs_once_per_shape(monkeypatch):
    """2 layers: q, k, v and the output projection are 64 x 64 (8 blocks), the MLP's matrices 128 x 64 and
    64 x 128 (2 each): 3 stacks on, 12 blocks one by one off."""
    shapes = count_newton_schulz(monkeypatch, lever)
    model, cfg = build(lever, muon_batched_ns=True)
    train(model, cfg, lever, 1)
    assert sorted(shapes) == sorted([(8, 64, 64), (2, 128, 64), (2, 64, 128)])
    shapes.clear()
    model, cfg = build(lever, muon_batched_ns=False)
    train(model, cfg, lever, 1)
    assert len(shapes) == 12 and all(len(shape) == 2 for shape in shapes)


def test_stacked_updates_are_the_block_by_block_ones():
    """The same orthogonalized update for every matrix, fused q/k/v blocks included, to float32 rounding."""
    generator = torch.Generator().manual_seed(0)
    matrices = [torch.randn(3 * 16, 16, generator=generator), torch.randn(16, 16, generator=generator),
                torch.randn(32, 16, generator=generator), torch.randn(16, 32, generator=generator),
                torch.randn(32, 16, generator=generator)]
    splits = [[16, 16, 16], [16], [32], [16], [32]]
    pending = [(m, m.split(rows), 5, "aspect") for m, rows in zip(matrices, splits)]
    stacked = lever.orthogonalize_by_shape(pending)
    for m, rows in zip(matrices, splits):
        one_by_one = torch.cat([lever.orthogonalize(block, 5, "aspect") for block in m.split(rows)])
        assert stacked[m].shape == m.shape
        torch.testing.assert_close(stacked[m], one_by_one, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(stacked[m], m)  # orthogonalized, not passed through


def test_on_trains_as_off():
    """Same model, same batches: the losses of 6 steps agree to float32 rounding, and they fall."""
    model, cfg = build(lever, muon_batched_ns=True)
    batched = train(model, cfg, lever, 6)
    model, cfg = build(lever, muon_batched_ns=False)
    torch.testing.assert_close(batched, train(model, cfg, lever, 6), rtol=1e-4, atol=1e-4)
    assert batched[-1] < batched[0] - 0.3


def test_a_run_with_it_on_trains_and_logs(tmp_path):
    run = dict(data=os.path.join(REPO, "input.txt"), device="cpu", compile=False, kernel_warmup_steps=0,
               val_target=0.0, lr_decay_tokens=0, n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=2,
               total_batch_size=128, window=0, window_ramp=False, attention="sdpa", blockmask_from_kv_blocks=False,
               val_tokens=128, val_every=0, sample_every=0, ckpt_every=0, max_steps=4, warmup_steps=1,
               value_embeddings=1, out_dir=tmp_path, run_name="on")
    on = lever.main([f"--{k}={v}" for k, v in {**run, "muon_batched_ns": True}.items()])
    off = lever.main([f"--{k}={v}" for k, v in {**run, "run_name": "off"}.items()])
    assert on["losses"] == pytest.approx(off["losses"], abs=1e-4)
