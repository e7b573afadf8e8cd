"""--muon_compile (step 65, on by default: RESULTS 2026-11-27 (p)): with --compile, Muon's step runs as two compiled graphs (momentum and
Newton-Schulz; NorMuon and the update) with the gather of other ranks' updates between them. Off, the step is its
parent (step 64). On, it moves the matrices and the state as the eager step does, while the rate and momentum change
from step to step with no new graph; two ranks get one process's matrices; a run compiles it only with --compile;
with AdamW alone it is refused, naming the fix."""
import os

import pytest
import torch
import torch._dynamo
import torch.distributed as dist

from lever_helpers import REAL_COMPILE, build, lever_and_parent, train, traced_run

lever, parent_step = lever_and_parent("muon_compile")

OPTIONS = ["--n_layer=2", "--n_head=4", "--n_kv_head=2", "--n_embd=32", "--block_size=16", "--batch_size=1",
           "--total_batch_size=96", "--val_tokens=96", "--value_embeddings=0", "--backout_layer=-1",
           "--long_window_layers=", "--attention_free_layers=", "--compile=true"]  # GQA: q, k, v of 32, 16, 16 rows


@pytest.fixture
def backend(monkeypatch):
    """torch.compile with a chosen backend (aot_eager: traced and functionalized as for inductor, but run eagerly);
    the graphs counted from a clean dynamo."""
    def use(name):
        monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: REAL_COMPILE(fn, backend=name, **kwargs))
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
    yield use
    torch._dynamo.reset()


def muon_run(compiled, *options, steps=4):
    """(Muon's matrices after `steps` steps on fixed random gradients, while the rate falls and the momentum rises
    as the schedules move them, and the optimizer)."""
    cfg = lever.parse_config(OPTIONS + [f"--muon_compile={compiled}"] + list(options))
    torch.manual_seed(0)
    model = lever.GPT(cfg)
    muon = lever.configure_optimizer(model, cfg, "cpu").optimizers[1]
    assert muon.compiled is compiled
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        muon.param_groups[0].update(lr=0.02 * (1 - step / 8), momentum=0.85 + 0.03 * step, weight_decay=0.1)
        for p in muon.param_groups[0]["params"]:
            p.grad = torch.randn(p.shape, generator=generator)
        muon.step()
    return [p.detach().clone() for p in muon.param_groups[0]["params"]], muon


def test_on_by_default_and_off_is_the_parent():
    assert lever.Config().muon_compile is True and not hasattr(parent_step.Config, "muon_compile")
    model, cfg = build(lever, muon_compile=False)
    parent, parent_cfg = build(parent_step)
    assert train(model, cfg, lever, 3) == train(parent, parent_cfg, parent_step, 3)


@pytest.mark.parametrize("normuon,batched", [(True, True), (True, False), (False, True)])
def test_compiled_steps_equal_eager_ones_with_two_graphs_for_all_steps(backend, normuon, batched):
    options = [f"--normuon={normuon}", f"--muon_batched_ns={batched}"]
    eager, eager_muon = muon_run(False, *options)
    backend("aot_eager")
    compiled, compiled_muon = muon_run(True, *options)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # 4 steps, new rates: no recompile
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for p, q in zip(eager_muon.param_groups[0]["params"], compiled_muon.param_groups[0]["params"]):
        assert eager_muon.state[p].keys() == compiled_muon.state[q].keys()  # a checkpoint loads either way
        for key in eager_muon.state[p]:
            torch.testing.assert_close(eager_muon.state[p][key], compiled_muon.state[q][key], rtol=0, atol=1e-6)
    assert max((a - b).abs().max() for a, b in zip(eager, muon_run(False, *options, steps=3)[0])) > 1e-4


def test_inductor_builds_the_same_step(backend):
    """The real backend once (C++ kernels on the CPU): the same matrices as the eager step."""
    eager, _ = muon_run(False, steps=2)
    backend("inductor")
    compiled, _ = muon_run(True, steps=2)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_a_run_compiles_muon_only_with_compile_and_trains_as_eager(monkeypatch, shakespeare, tmp_path):
    runs = {}
    for compile, muon_compile in ((True, True), (True, False), (False, True)):
        result, compiled = traced_run(lever, monkeypatch, shakespeare, tmp_path, compile=compile,
                                      muon_compile=muon_compile)
        graphs = {lever.muon_orthogonalize, lever.muon_apply} & set(compiled)
        assert graphs == ({lever.muon_orthogonalize, lever.muon_apply} if compile and muon_compile else set())
        runs[compile, muon_compile] = result["losses"]
    torch.testing.assert_close(runs[True, True], runs[True, False], rtol=0, atol=1e-4)
    assert runs[True, True][1:] != runs[True, False][1:]  # the compiled step ran: not bit for bit the eager one


def test_with_adamw_alone_it_is_refused():
    with pytest.raises(SystemExit, match="--muon_compile=true .* --optimizer=adamw; add --optimizer=muon or set "
                                         "--muon_compile=false"):
        lever.parse_config(["--optimizer=adamw", "--muon_distributed=false", "--normuon=false", "--muon_compile=true"])


def worker(rank, world_size, store, out):
    torch.set_num_threads(1)
    torch.compile = lambda fn, **kwargs: REAL_COMPILE(fn, backend="aot_eager", **kwargs)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    params, _ = muon_run(True, "--muon_distributed=true")
    torch.save(params, os.path.join(out, f"{rank}.pt"))
    dist.barrier()
    os._exit(0)  # as in test_distributed_muon.py: gloo's teardown at exit can abort a rank after its results are saved


def test_two_ranks_compiled_equal_one_eager_process(tmp_path):
    single, _ = muon_run(False)
    torch.multiprocessing.start_processes(worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2,
                                          start_method="spawn")
    for rank in range(2):
        for a, b in zip(torch.load(tmp_path / f"{rank}.pt"), single):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the copy's pinned memory and the sync check")
def test_on_cuda_a_compiled_step_never_waits_for_the_gpu(backend):
    """The rate, momentum and decay reach the device from pinned memory: a copy from pageable memory would first
    wait for everything queued (torch.cuda's sync debug mode raises on such a wait)."""
    backend("inductor")
    cfg = lever.parse_config(OPTIONS + ["--muon_compile=true"])
    torch.manual_seed(0)
    model = lever.GPT(cfg).cuda()
    muon = lever.configure_optimizer(model, cfg, "cuda").optimizers[1]
    for p in muon.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    muon.step()  # compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        muon.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
