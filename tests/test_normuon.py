"""--normuon (step 57, on by default: RESULTS 2026-11-26 (m)): after Newton-Schulz, each row of a Muon update (one output neuron's weights) is divided by
the root of its running mean square, kept in the optimizer's state, and each block is scaled back to its norm. Off,
the step is its parent (step 56); on, every row of a first update has the same RMS, every block keeps its Frobenius
norm, the state holds one mean square per row, a resumed run goes on with it, and distributed Muon still gives every
rank one process's matrices."""
import os

import pytest
import torch
import torch.distributed as dist

from conftest import script_number, step_adding
from lever_helpers import build, lever_and_parent, train

lever, parent_step = lever_and_parent("normuon")
LEVER_SCRIPT = step_adding("normuon")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def muon_of(model, cfg):
    return lever.configure_optimizer(model, cfg, "cpu").optimizers[1]


def test_on_by_default_and_off_is_the_parent():
    cfg = lever.Config()
    assert (cfg.normuon, cfg.normuon_beta2) == (True, 0.95) and not hasattr(parent_step.Config, "normuon")
    assert f"    {script_number(LEVER_SCRIPT)}  --normuon=true by default" in lever.__doc__
    model, cfg = build(lever, normuon=False)
    parent, parent_cfg = build(parent_step)
    parent_losses = train(parent, parent_cfg, parent_step, 4)
    assert train(model, cfg, lever, 4) == parent_losses
    on, on_cfg = build(lever, normuon=True)
    on_losses = train(on, on_cfg, lever, 4)
    assert on_losses[0] == parent_losses[0] and on_losses[1:] != parent_losses[1:]  # the first step's update differs
    assert on_losses[-1] < on_losses[0]  # and it still trains


def test_first_update_has_equal_row_rms_and_each_block_keeps_its_norm():
    """At the first step a row's mean square is (1 - beta2) times its own: every row ends at the same RMS, and the
    blocks of a fused projection (q, k, v) each keep the norm Newton-Schulz gave them."""
    generator = torch.Generator().manual_seed(0)
    fused = torch.nn.Parameter(torch.zeros(96, 32))
    fused.fused_rows = (32, 32, 32)
    plain = torch.nn.Parameter(torch.zeros(128, 32))
    scales = torch.linspace(0.1, 3, 96).unsqueeze(1)  # rows of very different sizes
    before = {fused: torch.randn(96, 32, generator=generator) * scales, plain: torch.randn(128, 32, generator=generator)}
    updates, state = dict(before), {fused: {}, plain: {}}
    lever.normalize_rows(updates, state, beta2=0.95)
    for p, rows in ((fused, (32, 32, 32)), (plain, (128,))):
        assert state[p]["row_second_moment"].shape == (p.size(0), 1)
        torch.testing.assert_close(state[p]["row_second_moment"], 0.05 * before[p].square().mean(-1, keepdim=True))
        for new, old in zip(updates[p].split(rows), before[p].split(rows)):
            torch.testing.assert_close(new.norm(), old.norm())
            rms = new.square().mean(-1).sqrt()
            torch.testing.assert_close(rms, rms.mean().expand_as(rms))
    # a second step with the same update: the running mean square moves toward it, the rows stay even
    second = dict(before)
    lever.normalize_rows(second, state, beta2=0.95)
    torch.testing.assert_close(state[plain]["row_second_moment"],
                               (0.05 + 0.95 * 0.05) * before[plain].square().mean(-1, keepdim=True))


def test_the_optimizer_keeps_a_mean_square_per_row_and_batching_changes_nothing():
    results = []
    for batched in (True, False):
        model, cfg = build(lever, normuon=True, muon_batched_ns=batched)
        muon = muon_of(model, cfg)
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in muon.param_groups[0]["params"]:
                p.grad = torch.randn(p.shape, generator=generator)
            muon.step()
        assert all(muon.state[p]["row_second_moment"].shape == (p.size(0), 1)
                   for p in muon.param_groups[0]["params"])
        results.append([p.detach().clone() for p in muon.param_groups[0]["params"]])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_refusals():
    with pytest.raises(SystemExit, match="--normuon=true .* --optimizer=adamw; add --optimizer=muon or set --normuon=false"):
        lever.parse_config(["--optimizer=adamw", "--muon_distributed=false", "--normuon=true"])
    with pytest.raises(SystemExit, match="--normuon_beta2=1.0 must be in"):
        lever.parse_config(["--normuon=true", "--normuon_beta2=1"])


def run(out_dir, run_name, **overrides):
    values = dict(data=os.path.join(REPO, "input.txt"), device="cpu", compile=False, kernel_warmup_steps=0,
                  val_target=0.0, lr_decay_tokens=0, n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=2,
                  total_batch_size=128, window=0, window_ramp=False, attention="sdpa", blockmask_from_kv_blocks=False,
                  val_tokens=128, val_every=0, sample_every=0, max_steps=6, warmup_steps=1, value_embeddings=1,
                  fp8_head=False, fused_head_loss=False, fp8_mlp="off", long_window_layers="",
                  attention_free_layers="", normuon=True, out_dir=out_dir, run_name=run_name)
    values.update(overrides)
    return lever.main([f"--{key}={value}" for key, value in values.items()])


def test_a_resumed_run_continues_the_same_curve(tmp_path):
    whole = run(tmp_path, "whole", ckpt_every=3, keep_last=0)
    resumed = run(tmp_path, "whole", ckpt_every=0, resume=os.path.join(whole["run_dir"], "checkpoints", "step_000003"))
    assert resumed["losses"] == whole["losses"][3:]  # bit for bit: the rows' mean squares came back (zeros would not)


OPTIONS = ["--n_layer=2", "--n_head=4", "--n_kv_head=2", "--n_embd=32", "--block_size=16", "--optimizer=muon",
           "--batch_size=1", "--total_batch_size=96", "--val_tokens=96", "--normuon=true", "--value_embeddings=0",
           "--long_window_layers=", "--attention_free_layers="]


def muon_steps(*options):
    cfg = lever.parse_config(OPTIONS + list(options))
    torch.manual_seed(0)
    model = lever.GPT(cfg)
    muon = lever.configure_optimizer(model, cfg, "cpu").optimizers[1]
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p in muon.param_groups[0]["params"]:
            p.grad = torch.randn(p.shape, generator=generator)
        muon.step()
    return [p.detach().clone() for p in muon.param_groups[0]["params"]]


def worker(rank, world_size, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    params = muon_steps("--muon_distributed=true")
    torch.save(params, os.path.join(out, f"{rank}.pt"))
    dist.barrier()
    os._exit(0)  # as in test_distributed_muon.py: gloo's teardown at exit can abort a rank after its results are saved


def test_distributed_normuon_equals_one_process(tmp_path):
    single = muon_steps()
    torch.multiprocessing.start_processes(worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2,
                                          start_method="spawn")
    for rank in range(2):
        assert all(torch.equal(a, b) for a, b in zip(torch.load(tmp_path / f"{rank}.pt"), single)), rank
