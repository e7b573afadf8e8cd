"""Step 45 changes one preset, by design: bench100m's window grows by 128 tokens every 48 steps from step 48
(2,048 by step 720 of 768) instead of every 80 (1,280 at the end). Its Config's defaults are step 44's; with the
old pace given back on the command line the run is step 44's, width for width."""
import dataclasses

from conftest import load_script

step = load_script(45)
parent = load_script(44)


def widths(module, *argv):
    cfg = module.parse_config(["--preset=bench100m", *argv])
    return cfg, module.window_widths(cfg, cfg.max_steps)


def test_bench100m_reaches_2048_by_step_720():
    cfg, grown = widths(step)
    assert (cfg.window_schedule_start, cfg.window_schedule_every, cfg.max_steps) == (48, 48, 768)
    assert grown[47] == 128 and grown[48] == 256 and grown[96] == 384
    assert grown[719] == 1920 and grown[720] == 2048 and max(grown) == grown[-1] == 2048
    _, old = widths(parent)
    assert old[-1] == 1280 and all(new >= was for new, was in zip(grown, old)) and grown != old


def test_the_old_pace_is_the_parent_and_the_defaults_did_not_change():
    cfg, grown = widths(step, "--window_schedule_start=80", "--window_schedule_every=80")
    parent_cfg, parent_widths = widths(parent)
    assert dataclasses.asdict(cfg) == dataclasses.asdict(parent_cfg) and grown == parent_widths
    assert dataclasses.asdict(step.Config()) == dataclasses.asdict(parent.Config())
