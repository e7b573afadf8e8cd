"""Checkpoints and resume (from step 06): a resumed run continues the same loss curve; saves are atomic."""
import os

import pytest
import torch
from safetensors.torch import load_model

from conftest import load_script, logged_steps, scripts_from, tiny_args, tiny_extras
from test_ddp import torchrun

ARGS = dict(max_steps=6, ckpt_every=3, learning_rate=1e-2, warmup_steps=2)


@pytest.mark.parametrize("script", scripts_from(6))
def test_resumed_run_continues_the_same_loss_curve(script, shakespeare, tmp_path):
    module = load_script(script)
    args = {**ARGS, **tiny_extras(script)}  # the newest step: backout's and the smear gate's weights resumed too
    full = module.main(tiny_args(script, shakespeare, tmp_path, run_name="full", **args))
    checkpoints = os.path.join(full["run_dir"], "checkpoints")
    assert sorted(os.listdir(checkpoints)) == ["step_000003", "step_000006"]
    resumed = module.main(tiny_args(script, shakespeare, tmp_path, **args,
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


def capture_optimizer(module, monkeypatch):
    """The optimizer that main() builds, kept for inspection after the run."""
    built = []
    real = module.configure_optimizer
    monkeypatch.setattr(module, "configure_optimizer", lambda *args: built.append(real(*args)) or built[-1])
    return built


@pytest.mark.parametrize("script", scripts_from(6))
def test_resume_trains_with_the_resumed_configs_hyperparameters(script, shakespeare, tmp_path, monkeypatch):
    """load_state_dict() would bring back the checkpoint's weight decay and betas (and Muon's rate) while the log
    said the new ones were used: the run must train with the config it logs."""
    module = load_script(script)
    muon = "muon_lr" in module.Config.__dataclass_fields__
    extra = dict(optimizer="muon") if muon else {}
    first = module.main(tiny_args(script, shakespeare, tmp_path, run_name="r", **ARGS, **extra))
    built = capture_optimizer(module, monkeypatch)
    changed = dict(weight_decay=0.05, beta2=0.9, **(dict(muon_lr=0.05) if muon else {}))
    module.main(tiny_args(script, shakespeare, tmp_path, **ARGS, **extra, **changed,
                          resume=os.path.join(first["run_dir"], "checkpoints", "step_000003")))
    groups = built[-1].param_groups
    assert groups[0]["weight_decay"] == 0.05 and groups[0]["betas"] == (0.9, 0.9)
    assert built[-1].state_dict() and len(logged_steps(first["run_dir"])) == 6
    if muon:
        muon_group = groups[-1]
        assert muon_group["lr_scale"] == pytest.approx(0.05 / 1e-2)  # the new muon_lr over learning_rate
        assert muon_group["lr"] == pytest.approx(module.get_lr(5, module.parse_config(
            tiny_args(script, shakespeare, tmp_path, **ARGS, **extra, **changed))) * 5)


def flip_a_byte(path, offset=-100):
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END)
        byte = f.read(1)
        f.seek(offset, os.SEEK_END)
        f.write(bytes([byte[0] ^ 1]))


@pytest.mark.parametrize("script", scripts_from(6))
def test_damaged_or_mismatched_checkpoints_are_refused_and_the_run_folder_left_as_it_was(script, shakespeare,
                                                                                        tmp_path):
    module = load_script(script)
    run_dir = module.main(tiny_args(script, shakespeare, tmp_path, run_name="r", **ARGS))["run_dir"]
    step3 = os.path.join(run_dir, "checkpoints", "step_000003")
    untouched = {name: open(os.path.join(run_dir, name), "rb").read() for name in ("config.json", "log.txt")}
    # a different model shape: named, field by field
    with pytest.raises(SystemExit, match="n_layer: checkpoint 2, config 1"):
        module.main(tiny_args(script, shakespeare, tmp_path, **dict(ARGS, n_layer=1), resume=step3))
    # a flipped byte in the weights, a truncated optimizer state
    flip_a_byte(os.path.join(step3, "model.safetensors"))
    with pytest.raises(SystemExit, match="model.safetensors is missing or does not match its checksum"):
        module.main(tiny_args(script, shakespeare, tmp_path, **ARGS, resume=step3))
    step6 = os.path.join(run_dir, "checkpoints", "step_000006")
    with open(os.path.join(step6, "state.pt"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(SystemExit, match="state.pt is missing or does not match its checksum"):
        module.main(tiny_args(script, shakespeare, tmp_path, **ARGS, resume=run_dir))
    assert {name: open(os.path.join(run_dir, name), "rb").read() for name in untouched} == untouched


@pytest.mark.parametrize("script", scripts_from(6))
def test_sigterm_saves_a_checkpoint_at_the_end_of_the_step_and_exits_cleanly(script, shakespeare, tmp_path,
                                                                             monkeypatch):
    import signal
    module = load_script(script)
    handler_before = signal.getsignal(signal.SIGTERM)
    full = module.main(tiny_args(script, shakespeare, tmp_path, run_name="full", **dict(ARGS, ckpt_every=100)))
    real_get_lr = module.get_lr

    def get_lr_then_signal(step, cfg):
        if step == 1:  # during the second step: as a cloud machine being taken back would
            os.kill(os.getpid(), signal.SIGTERM)
        return real_get_lr(step, cfg)

    monkeypatch.setattr(module, "get_lr", get_lr_then_signal)
    cut = module.main(tiny_args(script, shakespeare, tmp_path, run_name="cut", **dict(ARGS, ckpt_every=100)))
    assert cut["losses"] == full["losses"][:2]  # the step in flight finished, no more
    assert os.listdir(os.path.join(cut["run_dir"], "checkpoints")) == ["step_000002"]
    assert "stopped by SIGTERM after step 2" in open(os.path.join(cut["run_dir"], "log.txt")).read()
    assert signal.getsignal(signal.SIGTERM) == handler_before  # the handlers are given back
    monkeypatch.setattr(module, "get_lr", real_get_lr)
    resumed = module.main(tiny_args(script, shakespeare, tmp_path, **dict(ARGS, ckpt_every=100), resume=cut["run_dir"]))
    assert resumed["losses"] == full["losses"][2:]


@pytest.mark.parametrize("script", scripts_from(6))
def test_sample_only_talks_to_a_checkpoint_without_data_or_writing(script, shakespeare, tmp_path, capsys):
    module = load_script(script)
    run_dir = module.main(tiny_args(script, shakespeare, tmp_path, run_name="r", **ARGS))["run_dir"]
    before = sorted(os.walk(tmp_path))
    capsys.readouterr()
    module.main([f"--resume={run_dir}", "--sample_only=true", "--sample_prompts=ROMEO:|JULIET:", "--sample_count=1",
                 "--sample_min_tokens=5", "--sample_max_tokens=5", "--device=cpu", "--data=/nonexistent"])
    printed = capsys.readouterr().out
    assert printed.count(" sample:0") == 2 and "  | ROMEO:" in printed and "  | JULIET:" in printed
    assert sorted(os.walk(tmp_path)) == before  # nothing written, the run's log untouched
    with pytest.raises(SystemExit, match="--sample_only needs --resume"):
        module.parse_config(["--sample_only=true"])


@pytest.mark.parametrize("script", scripts_from(6))
def test_a_process_forked_during_a_run_still_dies_of_sigterm(script):
    """Worker pools forked while the handlers are installed must not inherit 'finish the step first'."""
    import signal
    import time
    module = load_script(script)
    stop = module.StopSignal()
    try:
        child = os.fork()
        if child == 0:
            time.sleep(20)
            os._exit(0)
        time.sleep(0.2)
        os.kill(child, signal.SIGTERM)
        _, status = os.waitpid(child, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    finally:
        stop.restore()
