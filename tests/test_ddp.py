"""DDP (from step 02): two gloo processes under torchrun train exactly like one process on the same global batch."""
import os
import subprocess
import sys

import pytest

from conftest import REPO, load_script, logged_steps, script_number, scripts_from, tiny_args, tiny_extras


def torchrun(script, args, nproc=2):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.join(REPO, script), *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.parametrize("script", scripts_from(2))
def test_two_ranks_match_one_process(script, shakespeare, tmp_path):
    # 2 ranks x 2 micro-steps x 2 sequences == 1 process x 4 micro-steps x 2 sequences: the same 512 tokens per
    # step. The learning rate is high so any error in accumulation, averaging or sync shows in later losses.
    args = dict(batch_size=2, total_batch_size=256, max_steps=4, learning_rate=1e-2, warmup_steps=0)
    args.update(tiny_extras(script))  # the newest step: backout and the smear gate on
    has_validation = script_number(script) >= 4
    if has_validation:
        args.update(val_every=2, val_tokens=512)
    single = load_script(script).main(tiny_args(script, shakespeare, tmp_path, run_name="single", **args))
    torchrun(script, tiny_args(script, shakespeare, tmp_path, run_name="ddp", **args))
    ddp_dir = os.path.join(tmp_path, "ddp")
    assert len(single["losses"]) == 4
    assert single["losses"][-1] < single["losses"][0] - 0.5  # it trained, so the later steps carry information
    assert list(logged_steps(ddp_dir).values()) == pytest.approx(single["losses"], abs=1e-3)
    # The gradient norm (before clipping) is the norm of the rank-averaged gradient: summing instead of
    # averaging, or skipping the loss division, would scale it.
    single_norms = logged_steps(single["run_dir"], "grad_norm")
    assert list(logged_steps(ddp_dir, "grad_norm").values()) == pytest.approx(list(single_norms.values()), rel=1e-3)
    if has_validation:  # validation gives the same numbers at any world size
        single_val = logged_steps(single["run_dir"], "val_loss")
        assert sorted(single_val) == [0, 2, 4]
        assert logged_steps(ddp_dir, "val_loss") == pytest.approx(single_val, abs=1e-4)
    assert not os.path.exists(os.path.join(tmp_path, "ddp-2"))  # one run directory, written by rank 0 only


@pytest.mark.parametrize("script", scripts_from(2))
def test_world_size_must_divide_the_batch(script, shakespeare, tmp_path, monkeypatch):
    module = load_script(script)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit, match="total_batch_size=256.*world_size"):
        module.parse_config(tiny_args(script, shakespeare, tmp_path, batch_size=2, total_batch_size=256))
