"""--muon_momentum_warmup_steps (step 36): Muon's momentum goes linearly from --muon_momentum_start to
--muon_momentum over the first steps, set on Muon's group from the step number at every step (so a resumed run
goes on with the same values). Off (0), the step trains as its parent (step 35)."""
import os
import re

import pytest

from conftest import load_script, script_number, step_adding

LEVER_SCRIPT = step_adding("muon_momentum_warmup_steps")
lever = load_script(LEVER_SCRIPT)
parent_step = load_script(script_number(LEVER_SCRIPT) - 1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny CPU run of main() on tiny Shakespeare: 2 sequences of 64 tokens per step, no compile, no warm-up.
TINY_RUN = dict(data=os.path.join(REPO, "input.txt"), device="cpu", compile=False, kernel_warmup_steps=0,
                val_target=0.0, lr_decay_tokens=0, n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=2,
                total_batch_size=128, window=0, window_ramp=False, attention="sdpa", blockmask_from_kv_blocks=False,
                val_tokens=128, val_every=0, sample_every=0, ckpt_every=0, max_steps=4, warmup_steps=1,
                value_embeddings=1)


def run(module, out_dir, run_name, **overrides):
    values = {**TINY_RUN, "out_dir": out_dir, "run_name": run_name, **overrides}
    return module.main([f"--{key}={value}" for key, value in values.items()])


def record_muon_momentum(monkeypatch, module):
    """The momentum of Muon's group at every Muon step, as the optimizer reads it."""
    seen = []
    step = module.Muon.step

    def recording_step(self):
        seen.append([group["momentum"] for group in self.param_groups])
        return step(self)
    monkeypatch.setattr(module.Muon, "step", recording_step)
    return seen


def logged(run_dir, key):
    """{step: value} of `key` on the step lines of a run's log.txt."""
    values = {}
    with open(os.path.join(run_dir, "log.txt"), encoding="utf-8") as f:
        for line in f:
            match = re.match(rf"step:(\d+)/\d+ .*\b{key}:(\S+)", line)
            if match:
                values[int(match.group(1))] = float(match.group(2))
    return values


def test_on_by_default_and_listed():
    cfg = lever.Config()
    assert (cfg.muon_momentum_warmup_steps, cfg.muon_momentum_start, cfg.muon_momentum) == (150, 0.85, 0.95)
    assert not hasattr(parent_step.Config, "muon_momentum_warmup_steps")
    number = script_number(LEVER_SCRIPT)
    assert re.search(rf"^    {number}  --muon_momentum_warmup_steps", lever.__doc__, re.M)


def test_off_trains_as_the_parent(tmp_path, monkeypatch):
    seen = record_muon_momentum(monkeypatch, lever)
    result = run(lever, tmp_path, "lever", muon_momentum_warmup_steps=0)
    losses = result["losses"]
    assert losses == run(parent_step, tmp_path, "parent")["losses"]
    assert len(losses) == 4 and seen == [[0.95]] * 4  # --muon_momentum throughout
    assert not logged(result["run_dir"], "muon_momentum")  # the log line is the parent's


def test_help_lists_the_switches(capsys):
    with pytest.raises(SystemExit):
        lever.parse_config(["--help"])
    text = capsys.readouterr().out
    for field in ("--muon_momentum_warmup_steps=150", "--muon_momentum_start=0.85"):
        assert field in text


def test_momentum_schedule_is_linear_then_held():
    cfg = lever.parse_config(["--muon_momentum_warmup_steps=300"])  # the record's 0.85 -> 0.95 over 300 steps
    momentum = [lever.get_muon_momentum(step, cfg) for step in range(1001)]
    assert momentum[0] == 0.85
    assert momentum[30] == pytest.approx(0.86) and momentum[150] == pytest.approx(0.90)
    assert momentum[299] == pytest.approx(0.85 + 0.1 * 299 / 300)
    assert momentum[300] == momentum[1000] == 0.95
    assert all(a <= b for a, b in zip(momentum, momentum[1:]))
    off = lever.parse_config(["--muon_momentum_warmup_steps=0"])
    assert {lever.get_muon_momentum(step, off) for step in range(100)} == {0.95}
    start = lever.parse_config(["--muon_momentum_warmup_steps=10", "--muon_momentum_start=0.5",
                                "--muon_momentum=0.9"])
    assert [lever.get_muon_momentum(step, start) for step in (0, 5, 10)] == pytest.approx([0.5, 0.7, 0.9])


def test_bad_momentum_warmup_values_are_refused():
    with pytest.raises(SystemExit, match="--muon_momentum_warmup_steps=-1 must be >= 0"):
        lever.parse_config(["--muon_momentum_warmup_steps=-1"])
    for start in ("1.0", "-0.1"):
        with pytest.raises(SystemExit, match=rf"--muon_momentum_start={start} in \[0, 1\)"):
            lever.parse_config([f"--muon_momentum_start={start}"])


def test_adamw_alone_ignores_the_default_warmup(tmp_path):
    """On by default, the warm-up must not stop a run without Muon: AdamW trains, and no momentum is logged."""
    result = run(lever, tmp_path, "adamw", optimizer="adamw", muon_distributed=False)
    assert len(result["losses"]) == 4
    assert not logged(result["run_dir"], "muon_momentum")


def test_training_sets_muon_momentum_each_step_and_a_resume_goes_on(tmp_path, monkeypatch):
    """0.5 -> 0.95 over 4 steps: 0.5, 0.6125, 0.725, 0.8375 on Muon's group at steps 0-3, logged; the losses
    leave the parent's once the momentum matters (the first update is the same: its buffer is a scaled gradient,
    and orthogonalization drops the scale). A run resumed at step 2 goes on with 0.725, 0.8375 (not the
    --muon_momentum its optimizer was built with) and the same losses."""
    expected = [0.5, 0.6125, 0.725, 0.8375]
    seen = record_muon_momentum(monkeypatch, lever)
    warm = dict(muon_momentum_warmup_steps=4, muon_momentum_start=0.5)
    result = run(lever, tmp_path, "warm", ckpt_every=2, **warm)
    assert [m for (m,) in seen] == pytest.approx(expected)
    assert list(logged(result["run_dir"], "muon_momentum").values()) == pytest.approx(expected, abs=1e-4)
    off = run(parent_step, tmp_path, "parent")["losses"]
    assert result["losses"][0] == off[0]
    assert all(abs(a - b) > 1e-6 for a, b in zip(result["losses"][2:], off[2:]))
    seen.clear()
    checkpoint = os.path.join(result["run_dir"], "checkpoints", "step_000002")
    resumed = run(lever, tmp_path, "warm", resume=checkpoint, ckpt_every=2, **warm)
    assert [m for (m,) in seen] == pytest.approx(expected[2:])
    assert resumed["losses"] == result["losses"][2:]
