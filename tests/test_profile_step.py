"""bench/profile_step.py: a tiny CPU run of the newest script under torch.profiler writes the window it was asked
for (its steps, the wall time per step, the ops' table), refuses a run too short for the window, and checks the
script's overrides before anything is written."""
import importlib.util
import os
import time
import types

import pytest
import torch

from conftest import REPO, SCRIPTS, tiny_args

spec = importlib.util.spec_from_file_location("profile_step", os.path.join(REPO, "bench", "profile_step.py"))
profile_step = importlib.util.module_from_spec(spec)
spec.loader.exec_module(profile_step)
NEWEST = os.path.join(REPO, SCRIPTS[-1])
DATA = os.path.join(REPO, "input.txt")


def tiny(tmp_path, max_steps):
    return tiny_args(SCRIPTS[-1], DATA, str(tmp_path / "runs"), compile=False, kernel_warmup_steps=0,
                     val_target=0.0, window=0, window_ramp=False, attention="sdpa", blockmask_from_kv_blocks=False,
                     max_steps=max_steps, lr_decay_tokens=0, val_tokens=128, async_batches=False)


def test_profiles_the_window_it_names(tmp_path):
    out = tmp_path / "prof"
    text = profile_step.main(["--out", str(out), "--skip", "3", "--steps", "2", NEWEST] + tiny(tmp_path, 8))
    assert (out / "profile.txt").read_text() == text
    assert "profiled steps: 2 after 3 optimizer steps" in text
    step_ms = float(text.split("wall time per step inside the window (profiler on): ")[1].split(" ms")[0])
    assert step_ms > 0
    assert "aten::mm" in text  # the table of ops (CPU here: no kernels, so no GPU groups)


def test_kernels_are_grouped_by_name():
    assert profile_step.kernel_group("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT").startswith("matrix multiply")
    assert profile_step.kernel_group("triton_tem_fused_flex_attention_backward_23").startswith("attention")
    assert profile_step.kernel_group("triton_red_fused__log_softmax__to_copy_22").startswith("loss")
    assert profile_step.kernel_group("softcapped_cross_entropy_kernel").startswith("loss")  # step 50's fused head
    assert profile_step.kernel_group("transpose_bytes_kernel").startswith("loss")
    assert profile_step.kernel_group("triton_poi_fused__fused_rms_norm_add_mul_4").startswith("compiled fused")
    assert profile_step.kernel_group("ncclDevKernel_AllReduce_Sum_bf16_RING_LL").startswith("nccl")
    assert profile_step.kernel_group("void at::native::vectorized_elementwise_kernel<4>").startswith("other")


def test_a_run_shorter_than_the_window_is_refused(tmp_path):
    with pytest.raises(SystemExit, match=r"made 6 optimizer steps, fewer than --skip \+ 2 \+ --steps \(9\): raise"):
        profile_step.main(["--out", str(tmp_path / "prof"), "--skip", "5", "--steps", "2", NEWEST] + tiny(tmp_path, 6))


def test_a_bad_override_fails_before_anything_is_written(tmp_path):
    with pytest.raises(SystemExit, match="--n_layer"):
        profile_step.main(["--out", str(tmp_path / "prof"), NEWEST, "--n_layer=x"])
    assert not (tmp_path / "prof").exists()


def test_gpu_side_annotations_are_not_counted_as_kernels():
    """The profiler puts each annotated range (the step, the optimizer's step) on the GPU timeline with the time of
    every kernel inside it: counted as a kernel, it doubles the GPU's busy time (step 43's first profile)."""
    def event(key, device, annotation, us):
        return types.SimpleNamespace(key=key, device_type=f"DeviceType.{device}", is_user_annotation=annotation,
                                     self_device_time_total=us)
    kernel = event("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "CUDA", False, 900)
    events = [kernel, event("ProfilerStep*", "CUDA", True, 1000), event("Optimizer.step#Muon.step", "CUDA", True, 50),
              event("aten::mm", "CPU", False, 900), event("triton_poi_fused_add_0", "CUDA", False, 0)]
    assert profile_step.kernel_events(events) == [kernel]


def test_ms_per_call_calls_the_function_iters_times_and_times_them():
    calls = []
    ms = profile_step.ms_per_call(lambda: calls.append(time.sleep(0.002)), 5, torch.device("cpu"))
    assert len(calls) == 5 and 2.0 <= ms < 200.0
