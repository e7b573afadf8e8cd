"""bench/compile_breakdown.py: a tiny CPU run of the newest script marks the end of each throwaway warm-up step, of
the warm-up's validation and of the warm-up, in order and in time, then dynamo's table and a line per compile; bad
input (an override, a run with the warm-up off) fails before anything is written."""
import importlib.util
import os

import pytest

from conftest import REPO, SCRIPTS, tiny_args

spec = importlib.util.spec_from_file_location("compile_breakdown", os.path.join(REPO, "bench", "compile_breakdown.py"))
compile_breakdown = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compile_breakdown)
NEWEST = os.path.join(REPO, SCRIPTS[-1])
DATA = os.path.join(REPO, "input.txt")


def tiny(tmp_path, **overrides):
    return tiny_args(SCRIPTS[-1], DATA, str(tmp_path / "runs"), **{**dict(
        compile=False, kernel_warmup_steps=2, val_target=0.0, window=0, window_ramp=False, attention="sdpa",
        blockmask_from_kv_blocks=False, max_steps=1, val_every=0, lr_decay_tokens=0, val_tokens=128,
        async_batches=False), **overrides})


def test_marks_each_warm_up_step_and_its_validation(tmp_path):
    out = tmp_path / "cb"
    text = compile_breakdown.main(["--out", str(out), NEWEST] + tiny(tmp_path))
    assert (out / "compile.txt").read_text() == text
    rows = [line.split() for line in text.splitlines() if line.startswith("  ")]
    names = [" ".join(row[:-2]) for row in rows]
    assert names[:4] == ["step 1", "step 2", "its validation", "the warm-up (restored)"]
    seconds = [float(row[-2]) for row in rows[:4]]
    assert 0 < seconds[0] <= seconds[1] <= seconds[2] <= seconds[3]
    assert "TorchDynamo compilation metrics" in text
    assert "Triton compile workers: " in text and "slowest kernels" in text  # nothing compiled: the header alone


def test_bad_input_fails_before_anything_is_written(tmp_path):
    with pytest.raises(SystemExit, match="--n_layer"):
        compile_breakdown.main(["--out", str(tmp_path / "cb"), NEWEST, "--n_layer=x"])
    with pytest.raises(SystemExit, match="--kernel_warmup_steps=0: the warm-up is off"):
        compile_breakdown.main(["--out", str(tmp_path / "cb"), NEWEST] + tiny(tmp_path, kernel_warmup_steps=0))
    with pytest.raises(SystemExit, match="has no kernel warm-up"):
        compile_breakdown.main(["--out", str(tmp_path / "cb"), os.path.join(REPO, SCRIPTS[0])])
    assert not (tmp_path / "cb").exists()


def test_compile_table_has_a_line_per_compile_with_its_slowest_kernels():
    from types import SimpleNamespace
    forward = SimpleNamespace(compile_id="0/0", co_name="forward", is_forward=True, duration_us=78.6e6,
                              dynamo_cumulative_compile_time_us=9.6e6, inductor_cumulative_compile_time_us=70.2e6,
                              inductor_code_gen_cumulative_compile_time_us=55.5e6,
                              triton_compile_time_us=36.0e6, graph_node_count=5123,
                              triton_kernel_compile_times_us='[["triton_poi_a", 1000000], ["triton_tem_flex", 20500000],'
                                                             ' ["triton_red_b", 3000000], ["triton_poi_c", 100]]')
    backward = SimpleNamespace(compile_id="0/0", co_name="forward", is_forward=False, duration_us=None,
                               entire_frame_compile_time_s=22.9, triton_kernel_compile_times_us="<unknown>")
    first_run = SimpleNamespace(compile_id="0/0", co_name=None, is_forward=False, is_runtime=True, duration_us=3.1e6,
                                runtime_triton_autotune_time_us=2.9e6, triton_compile_time_us=None)
    header, first, second, third = compile_breakdown.compile_table([forward, backward, first_run]).splitlines()
    assert header.split()[:8] == ["compile", "s", "dynamo", "aot", "inductor", "codegen", "triton", "nodes"]
    assert first.split()[:9] == ["0/0", "forward", "78.6", "9.6", "70.2", "55.5", "36.0", "5123", "triton_tem_flex:"]
    assert first.endswith("triton_tem_flex: 20.5, triton_red_b: 3.0, triton_poi_a: 1.0")  # the 3 slowest, slowest first
    assert second.split() == ["0/0", "forward", "(backward)", "22.9"]  # missing fields blank, a bad kernel list too
    assert third.split() == ["0/0", "(backward,", "at", "first", "run)", "3.1", "2.9"]  # timing the configs
    assert compile_breakdown.compile_threads() >= 1
