"""--compile_ahead (step 69, on by default): at the start of the kernel warm-up, helper processes compile Muon's two
graphs and validation's graphs into inductor's cache while the main process compiles the training graph; the main
process waits for them before the clock starts and finds their graphs in the cache. Off, the step is its parent (step
68). One test goes through real inductor on the CPU: after the helpers, the main process builds only the training
forward and backward. The others check the wiring: when helpers start, what a failed or hung one costs, which share of
Muon's matrices a rank's helper compiles, and that a run without compile or warm-up starts none."""
import dataclasses
import json
import os
import re
import socket
import time

import pytest
import torch

from conftest import read_log, tiny_args
from lever_helpers import REAL_COMPILE, build, lever_and_parent, train, traced_run

lever, parent_step = lever_and_parent("compile_ahead")

# a tiny run that inductor compiles on the CPU in seconds: SDPA (no flex backward on the CPU), no float8
REAL_RUN = dict(max_steps=2, attention="sdpa", blockmask_from_kv_blocks=False, window=0, window_ramp=False,
                kernel_warmup_steps=1, val_every=0, compile=True, fp8_head=False, fused_head_loss=False, fp8_mlp="off",
                fp8_attention="off", relu2_from_float8=False, val_tokens=64, batch_size=2, total_batch_size=64,
                sample_every=0, ckpt_every=0, attention_free_layers="", long_window_layers="")


def helper_rows(run_dir):
    """The log's compile_ahead_* pairs, and its other lines that start with compile_ahead."""
    pairs, lines = {}, []
    for row in read_log(run_dir):
        pairs.update({key: value for key, value in row.items() if key.startswith("compile_ahead_")})
    with open(f"{run_dir}/log.txt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if line.startswith("compile_ahead:")]
    return pairs, lines


def test_on_by_default_and_off_is_the_parent():
    assert lever.Config().compile_ahead is True and not hasattr(parent_step.Config, "compile_ahead")
    model, cfg = build(lever, compile_ahead=False)
    parent, parent_cfg = build(parent_step)
    assert train(model, cfg, lever, 3) == train(parent, parent_cfg, parent_step, 3)


def test_after_the_helpers_the_main_process_builds_only_the_training_graphs(monkeypatch, shakespeare, tmp_path):
    """Real inductor: the helpers compile into an empty cache; then a run (without helpers of its own) finds every
    graph there but the training forward and backward. Without the helpers, the same run builds all seven."""
    def run(cache, prefill):
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / f"cache-{cache}"))
        torch._dynamo.reset()
        torch._inductor.utils.clear_inductor_caches()
        args = tiny_args(lever.__file__, shakespeare, tmp_path, run_name=cache, **REAL_RUN)
        if prefill:
            lines = lever.finish_compile_helpers(lever.start_compile_helpers(lever.parse_config(args), 0, 1,
                                                                             torch.device("cpu")))
            assert len(lines) == 1 and re.match(r"compile_ahead_muon_exit:0 compile_ahead_muon_s:[\d.]+ "
                                                r"compile_ahead_validation_exit:0 compile_ahead_validation_s:[\d.]+ ",
                                                lines[0]), lines
        torch._dynamo.utils.counters.clear()
        result = lever.main(args)
        counters = torch._dynamo.utils.counters["inductor"]
        return result["losses"], counters["fxgraph_cache_hit"], counters["fxgraph_cache_miss"]

    with torch._inductor.config.patch(fx_graph_cache=True):
        losses, hits, misses = run("ahead", prefill=True)
        assert (hits, misses) == (5, 2)  # Muon's 2 graphs and validation's 3 were the helpers'
        alone, hits, misses = run("alone", prefill=False)
        assert (hits, misses) == (0, 7)
    assert losses == alone


@pytest.fixture
def runner(monkeypatch):
    """The helpers' program replaced by a stand-in (the real one: the test above); returns a setter."""
    def use(code):
        monkeypatch.setattr(lever, "COMPILE_AHEAD_RUNNER", code)
    return use


def test_a_run_starts_its_helpers_in_the_warm_up_and_waits_for_them(runner, monkeypatch, shakespeare, tmp_path):
    runner("import sys, time; time.sleep(1); print(sys.argv[2]); print('seconds:1.0' if sys.argv[2] == 'muon' "
           "else 'seconds:1.5')")
    result, _ = traced_run(lever, monkeypatch, shakespeare, tmp_path, compile=True, kernel_warmup_steps=1,
                           compile_ahead=True)
    assert helper_rows(result["run_dir"]) == ({"compile_ahead_muon_exit": "0", "compile_ahead_muon_s": "1.0",
                                               "compile_ahead_validation_exit": "0",
                                               "compile_ahead_validation_s": "1.5"}, [])
    rows = read_log(result["run_dir"])
    assert float(next(r["warmup_time"] for r in rows if "warmup_time" in r).removesuffix("ms")) >= 1000  # waited
    baseline, _ = traced_run(lever, monkeypatch, shakespeare, tmp_path, compile=True, kernel_warmup_steps=1)
    assert helper_rows(baseline["run_dir"]) == ({}, [])
    assert result["losses"] == baseline["losses"]


def test_muon_has_no_helper_when_it_is_not_compiled(runner, monkeypatch, shakespeare, tmp_path):
    runner("print('seconds:0.1')")
    assert lever.compile_ahead_jobs(lever.Config(muon_compile=False)) == ["validation"]
    assert lever.compile_ahead_jobs(lever.Config(optimizer="adamw", muon_compile=False, normuon=False,
                                                 muon_distributed=False)) == ["validation"]
    result, _ = traced_run(lever, monkeypatch, shakespeare, tmp_path, compile=True, kernel_warmup_steps=1,
                           compile_ahead=True, muon_compile=False)
    assert helper_rows(result["run_dir"]) == ({"compile_ahead_validation_exit": "0",
                                               "compile_ahead_validation_s": "0.1"}, [])


def test_a_failed_helper_costs_only_its_gain(runner, monkeypatch, shakespeare, tmp_path):
    runner("raise SystemExit('no GPU memory left')")
    result, _ = traced_run(lever, monkeypatch, shakespeare, tmp_path, compile=True, kernel_warmup_steps=1,
                           compile_ahead=True)
    pairs, lines = helper_rows(result["run_dir"])
    assert pairs == {"compile_ahead_muon_exit": "1", "compile_ahead_muon_s": "?",
                     "compile_ahead_validation_exit": "1", "compile_ahead_validation_s": "?"}
    assert lines == [f"compile_ahead: the {job} helper stopped (1): no GPU memory left" for job in ("muon", "validation")]
    baseline, _ = traced_run(lever, monkeypatch, shakespeare, tmp_path, compile=True, kernel_warmup_steps=1)
    assert result["losses"] == baseline["losses"]


@pytest.mark.parametrize("setting", ["fx_graph_cache", "force_disable_caches"])
def test_with_inductors_cache_off_no_helper_starts(runner, monkeypatch, shakespeare, tmp_path, setting):
    """The main process finds the helpers' graphs only in inductor's cache: with it off, none is started, and the
    log says why."""
    import torch._inductor.config as inductor_config
    monkeypatch.setattr(inductor_config, setting, setting == "force_disable_caches")
    runner("raise SystemExit('started')")
    assert lever.compile_ahead_jobs(lever.Config()) == []
    result, _ = traced_run(lever, monkeypatch, shakespeare, tmp_path, compile=True, kernel_warmup_steps=1,
                           compile_ahead=True)
    assert helper_rows(result["run_dir"]) == ({}, ["compile_ahead: no helpers: inductor's graph cache is off, so this "
                                                   "process could not use their graphs"])


def test_a_hung_helper_is_stopped_at_the_timeout(runner):
    runner("import time; time.sleep(60)")
    helpers = lever.start_compile_helpers(lever.Config(compile_ahead=True), 0, 1, torch.device("cpu"))
    started = time.perf_counter()
    lines = lever.finish_compile_helpers(helpers, timeout=2.0)
    assert time.perf_counter() - started < 10
    assert lines[0].startswith("compile_ahead_muon_exit:-9 compile_ahead_muon_s:? compile_ahead_validation_exit:-9 ")
    assert lines[1:] == ["compile_ahead: the muon helper stopped (-9): ", "compile_ahead: the validation helper stopped (-9): "]


@pytest.mark.parametrize("distributed,world_size,rank", [(True, 2, 0), (True, 2, 1), (False, 2, 1), (True, 1, 0)])
def test_a_ranks_muon_helper_compiles_that_ranks_share(monkeypatch, distributed, world_size, rank):
    """The helper's first graph gets the same `mine` (which matrices this rank orthogonalizes) as the rank's Muon:
    its share under --muon_distributed with several ranks, all of them otherwise."""
    seen = []

    def recording(fn, **kwargs):
        compiled = REAL_COMPILE(fn, backend="eager", **kwargs)
        if fn is lever.muon_orthogonalize:
            return lambda *args: seen.append(list(args[4])) or compiled(*args)
        return compiled
    monkeypatch.setattr(torch, "compile", recording)
    monkeypatch.setattr(lever.dist, "all_gather", lever.dist.all_gather)  # the helper replaces it in its process
    cfg = lever.parse_config(tiny_args(lever.__file__, "input.txt", "runs", compile=True, compile_ahead=True,
                                       muon_distributed=distributed, value_embeddings=0))
    torch._dynamo.reset()
    lever.compile_ahead_job("muon", json.loads(json.dumps(dataclasses.asdict(cfg))), rank, world_size, "cpu")
    muon = lever.configure_optimizer(lever.GPT(cfg), cfg, "cpu").optimizers[1]
    params = [p for group in muon.param_groups for p in group["params"]]
    owner = lever.share_matrices(params, world_size)
    expected = [owner[p] == rank for p in params] if distributed else [True] * len(params)
    assert seen == [expected]
    assert (False in expected) == (distributed and world_size > 1)
    torch._dynamo.reset()


@pytest.mark.parametrize("overrides", [dict(compile=False), dict(compile=True, kernel_warmup_steps=0)])
def test_without_compile_or_warm_up_there_are_no_helpers(runner, monkeypatch, shakespeare, tmp_path, overrides):
    runner("raise SystemExit('started')")
    result, _ = traced_run(lever, monkeypatch, shakespeare, tmp_path, compile_ahead=True, **overrides)
    assert helper_rows(result["run_dir"]) == ({}, [])


def ranks_worker(rank, world_size, port, data, out):
    """One rank of a gloo run (dynamo's eager backend) whose helpers are stand-ins that report their rank."""
    torch.set_num_threads(1)
    torch.compile = lambda fn, **kwargs: REAL_COMPILE(fn, backend="eager")
    lever.COMPILE_AHEAD_RUNNER = "import sys; print(f'seconds:{sys.argv[4]}.{sys.argv[5]}')"
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # main() joins the group itself, as under torchrun
    lever.main(tiny_args(lever.__file__, data, out, run_name="ddp", compile=True, kernel_warmup_steps=1,
                         compile_ahead=True, max_steps=2, attention="sdpa", blockmask_from_kv_blocks=False, window=0,
                         window_ramp=False, batch_size=2, total_batch_size=128))
    os._exit(0)  # as in test_compiled_muon.py: gloo's teardown at exit can abort a rank after its work is done


def test_under_torchrun_every_rank_runs_helpers_and_rank_0_logs_them(shakespeare, tmp_path):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    torch.multiprocessing.start_processes(ranks_worker, args=(2, port, shakespeare, str(tmp_path)), nprocs=2,
                                          start_method="spawn")
    with open(tmp_path / "ddp" / "log.txt", encoding="utf-8") as f:
        lines = [line.split(" fx_graph_cache_hits:")[0] for line in f if "compile_ahead_" in line]
    assert lines == [f"rank:{rank} compile_ahead_muon_exit:0 compile_ahead_muon_s:{rank}.2 "
                     f"compile_ahead_validation_exit:0 compile_ahead_validation_s:{rank}.2" for rank in (0, 1)]
