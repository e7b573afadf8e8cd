"""Checkpoints and resume (from step 06): a resumed run continues the same loss curve; saves are atomic."""
import os

import pytest
import torch
from safetensors.torch import load_model

from conftest import load_script, logged_steps, scripts_from, tiny_args
from test_ddp import torchrun

ARGS = dict(max_steps=6, ckpt_every=3, learning_rate=1e-2, warmup_steps=2)


@pytest.mark.parametrize("script", scripts_from(6))
def test_resumed_run_continues_the_same_loss_curve(script, shakespeare, tmp_path):
    module = load_script(script)
    full = module.main(tiny_args(script, shakespeare, tmp_path, run_name="full", **ARGS))
    checkpoints = os.path.join(full["run_dir"], "checkpoints")
    assert sorted(os.listdir(checkpoints)) == ["step_000003", "step_000006"]
    resumed = module.main(tiny_args(script, shakespeare, tmp_path, **ARGS,
                                    resume=os.path.join(checkpoints, "step_000003")))
    assert resumed["losses"] == full["losses"][3:]  # bit for bit: model, optimizer, data position, RNG
    assert resumed["run_dir"] == full["run_dir"]  # the run goes on in its own folder
    state = torch.load(os.path.join(checkpoints, "step_000003", "state.pt"), weights_only=True)
    assert state["step"] == 3 and len(state["loader"]) == len(state["rng"]) == 1
    assert state["optimizer"]["state"]  # Adam's moments are in it


@pytest.mark.parametrize("script", scripts_from(6))
def test_weights_load_into_a_fresh_model(script, shakespeare, tmp_path):
    module = load_script(script)
    result = module.main(tiny_args(script, shakespeare, tmp_path, run_name="r", **ARGS))
    fresh = module.GPT(module.parse_config(tiny_args(script, shakespeare, tmp_path, **ARGS)))
    load_model(fresh, os.path.join(result["run_dir"], "checkpoints", "step_000006", "model.safetensors"))
    x = torch.randint(0, 50257, (2, 16))
    assert torch.equal(fresh(x), result["model"](x))


@pytest.mark.parametrize("script", scripts_from(6))
def test_keeps_the_newest_n_and_resumes_the_newest_of_a_run_folder(script, shakespeare, tmp_path):
    module = load_script(script)
    args = dict(ARGS, ckpt_every=1, keep_last=2, max_steps=5)
    result = module.main(tiny_args(script, shakespeare, tmp_path, run_name="r", **args))
    assert sorted(os.listdir(os.path.join(result["run_dir"], "checkpoints"))) == ["step_000004", "step_000005"]
    assert module.find_checkpoint(result["run_dir"]).endswith("step_000005")
    again = module.main(tiny_args(script, shakespeare, tmp_path, **dict(args, max_steps=7), resume=result["run_dir"]))
    assert len(again["losses"]) == 2  # steps 6 and 7
    assert [s for s in logged_steps(result["run_dir"])] == [1, 2, 3, 4, 5, 6, 7]  # one log, continued


@pytest.mark.parametrize("script", scripts_from(6))
def test_an_interrupted_save_never_damages_the_previous_checkpoint(script, shakespeare, tmp_path, monkeypatch):
    module = load_script(script)
    real_save = torch.save
    calls = []

    def save_then_crash(obj, path):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint: half written, then the machine goes down
            with open(path, "wb") as f:
                f.write(b"partial")
            raise KeyboardInterrupt
        real_save(obj, path)

    monkeypatch.setattr(module.torch, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        module.main(tiny_args(script, shakespeare, tmp_path, run_name="r", **ARGS))
    run_dir = os.path.join(tmp_path, "r")
    folder = os.path.join(run_dir, "checkpoints")
    assert [n for n in os.listdir(folder) if not n.startswith("step_000006.tmp")] == ["step_000003"]
    assert module.find_checkpoint(run_dir).endswith("step_000003")
    monkeypatch.setattr(module.torch, "save", real_save)
    resumed = module.main(tiny_args(script, shakespeare, tmp_path, **ARGS, resume=run_dir))
    assert len(resumed["losses"]) == 3
    assert sorted(os.listdir(folder)) == ["step_000003", "step_000006"]  # the crash's leftovers are gone


@pytest.mark.parametrize("script", scripts_from(6))
def test_bad_resume_paths_fail_clearly(script, shakespeare, tmp_path):
    module = load_script(script)
    with pytest.raises(SystemExit, match="is not a folder"):
        module.parse_config(tiny_args(script, shakespeare, tmp_path, resume=tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match="no checkpoint there"):
        module.main(tiny_args(script, shakespeare, tmp_path, resume=tmp_path))


@pytest.mark.parametrize("script", scripts_from(6))
def test_ddp_resume_continues_the_same_loss_curve(script, shakespeare, tmp_path):
    args = dict(ARGS, batch_size=2, total_batch_size=256, val_every=0)
    torchrun(script, tiny_args(script, shakespeare, tmp_path, run_name="full", **args))
    full = logged_steps(os.path.join(tmp_path, "full"))
    step3 = os.path.join(tmp_path, "full", "checkpoints", "step_000003")
    state = torch.load(os.path.join(step3, "state.pt"), weights_only=True)
    assert len(state["loader"]) == 2 and state["loader"][0] != state["loader"][1]  # every rank's position
    torchrun(script, tiny_args(script, shakespeare, tmp_path, resume=step3, **args))
    continued = logged_steps(os.path.join(tmp_path, "full"))  # the log now holds steps 4..6 twice; the last win
    assert [continued[s] for s in (4, 5, 6)] == pytest.approx([full[s] for s in (4, 5, 6)], abs=1e-6)
    with pytest.raises(AssertionError, match="written by 2 processes"):
        torchrun(script, tiny_args(script, shakespeare, tmp_path, resume=step3, **args), nproc=1)
