"""What a user meets when something is wrong: a one-line message naming the setting or file and the fix, before
anything is written; a diverging run stops; the demo runs at any usual number of processes."""
import os

import numpy as np
import pytest
import torch

from conftest import load_script, logged_steps, scripts_from, tiny_args


@pytest.mark.parametrize("script", scripts_from(1))
def test_a_missing_device_is_a_config_error(script):
    module = load_script(script)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device=cuda, but torch sees no CUDA GPU here; use --device=cpu"):
            module.parse_config(["--device=cuda"])
    if not torch.backends.mps.is_available():
        with pytest.raises(SystemExit, match="--device=mps, but this machine has no Apple MPS device"):
            module.parse_config(["--device=mps"])


@pytest.mark.parametrize("script", scripts_from(1))
def test_bad_text_files_are_named_and_leave_no_run_folder(script, tmp_path):
    module = load_script(script)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 100)
    shard = tmp_path / "shard.npy"
    np.save(shard, np.arange(100, dtype=np.uint16))
    out = tmp_path / "runs"
    with pytest.raises(SystemExit, match="latin1.txt is not UTF-8 text"):
        module.main(tiny_args(script, str(latin1), out))
    with pytest.raises(SystemExit, match="shard.npy is a .npy token shard, not a text file"):
        module.main(tiny_args(script, str(shard), out))
    with pytest.raises(SystemExit, match="no such"):
        module.main(tiny_args(script, str(tmp_path / "missing.txt"), out))
    assert not out.exists()  # a launch that fails its checks leaves nothing behind


@pytest.mark.parametrize("script", scripts_from(1))
def test_a_used_run_name_is_refused(script, shakespeare, tmp_path):
    module = load_script(script)
    module.main(tiny_args(script, shakespeare, tmp_path, run_name="r", max_steps=1))
    log = open(tmp_path / "r" / "log.txt").read()
    with pytest.raises(SystemExit, match="--run_name=r: .* exists already"):
        module.main(tiny_args(script, shakespeare, tmp_path, run_name="r", max_steps=1))
    assert open(tmp_path / "r" / "log.txt").read() == log


@pytest.mark.parametrize("script", scripts_from(1))
def test_a_diverging_run_stops_with_a_message_and_saves_no_nan(script, shakespeare, tmp_path):
    module = load_script(script)
    extra = dict(ckpt_every=1) if "ckpt_every" in module.Config.__dataclass_fields__ else {}
    with pytest.raises(SystemExit, match="the loss became nan at step .*: training diverged. Lower --learning_rate") \
            as stopped:
        module.main(tiny_args(script, shakespeare, tmp_path, run_name="r", max_steps=20, learning_rate=1e6,
                              warmup_steps=0, grad_clip="inf", **extra))
    assert stopped.value.code != 0
    losses = logged_steps(tmp_path / "r")
    diverged = max(losses)
    assert all(np.isfinite(losses[s]) for s in losses if s < diverged)
    if extra:  # every checkpoint kept is from before the loss went bad
        steps = sorted(int(n[5:]) for n in os.listdir(tmp_path / "r" / "checkpoints"))
        assert steps and max(steps) < diverged


@pytest.mark.parametrize("script", scripts_from(1))
def test_step_lines_show_an_eta_and_no_gpu_only_numbers_on_a_cpu(script, shakespeare, tmp_path):
    module = load_script(script)
    run_dir = module.main(tiny_args(script, shakespeare, tmp_path, run_name="r", max_steps=2))["run_dir"]
    log = open(os.path.join(run_dir, "log.txt")).read().splitlines()
    step_lines = [line for line in log if " loss:" in line]
    assert all(" eta:" in line for line in step_lines) and step_lines[-1].split("eta:")[1].startswith("0m00s")
    assert not any("mfu:" in line or "peak_mem:" in line for line in log)  # meaningful on CUDA only
    assert module.duration(3 * 3600 + 25 * 60 + 46.7) == "3h25m46s" and module.duration(61) == "1m01s"


@pytest.mark.parametrize("script", scripts_from(2))
def test_the_demo_divides_over_usual_process_counts_and_config_errors_print_once(script, monkeypatch):
    module = load_script(script)
    for world_size in (1, 2, 4, 8):
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        module.parse_config(["--preset=demo"])
    monkeypatch.setenv("RANK", "1")  # under torchrun, only rank 0 prints the message
    with pytest.raises(SystemExit) as quiet:
        module.parse_config(["--n_layer=x"])
    assert quiet.value.code == 2
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit, match="config error: --n_layer='x'"):
        module.parse_config(["--n_layer=x"])


@pytest.mark.parametrize("script", scripts_from(3))
def test_a_shard_with_tokens_beyond_gpt2s_vocabulary_is_refused(script, tmp_path):
    module = load_script(script)
    np.save(tmp_path / "x_train_000001.npy", np.array([1, 2, 60000], dtype=np.uint16))
    with pytest.raises(SystemExit, match="holds token id 60000, beyond GPT-2's 50257 tokens"):
        module.load_shard(str(tmp_path / "x_train_000001.npy"))
