"""The learning-rate schedule: warmup then cosine (every step), and from step 08 warmup in tokens, linear or
cosine cool-down over the last fraction of the run, and a hard minimum."""
import math

import pytest

from conftest import SCRIPTS, load_script, logged_steps, scripts_from, tiny_args


@pytest.mark.parametrize("script", SCRIPTS)
def test_warmup_then_cosine_to_the_floor(script):
    module = load_script(script)
    recipe = ["--lr_decay_tokens=0"] if "lr_decay_tokens" in module.Config.__dataclass_fields__ else []  # 30, 31
    cfg = module.parse_config(["--learning_rate=1.0", "--min_lr_ratio=0.1", "--warmup_steps=10", "--max_steps=110",
                               *recipe])
    lr = [module.get_lr(step, cfg) for step in range(111)]
    assert lr[0] == pytest.approx(0.1) and lr[4] == pytest.approx(0.5) and lr[9] == pytest.approx(1.0)
    assert lr[10] == pytest.approx(1.0)
    assert lr[60] == pytest.approx(0.55)  # half way through the cosine: the mean of peak and floor
    assert lr[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))


@pytest.mark.parametrize("script", scripts_from(8))
def test_linear_cooldown_over_the_last_fraction_with_warmup_in_tokens(script):
    module = load_script(script)
    cfg = module.parse_config(["--learning_rate=1.0", "--min_lr_ratio=0.0", "--warmup_tokens=5000000",
                               "--total_batch_size=524288", "--max_steps=100", "--lr_decay=linear",
                               "--cooldown_fraction=0.4"])
    assert module.effective_warmup_steps(cfg) == 10  # 5M tokens / 524,288 = 9.5 steps, rounded up
    lr = {step: module.get_lr(step, cfg) for step in (0, 9, 10, 40, 59, 60, 70, 80, 100)}
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert lr[10] == lr[40] == lr[59] == lr[60] == 1.0  # the peak holds until the last 40% of the steps
    assert (lr[70], lr[80], lr[100]) == pytest.approx((0.75, 0.5, 0.0))  # a straight line down
    cosine = module.parse_config(["--learning_rate=1.0", "--min_lr_ratio=0.0", "--warmup_steps=10",
                                  "--max_steps=100", "--cooldown_fraction=0.4"])
    assert module.get_lr(70, cosine) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


@pytest.mark.parametrize("script", scripts_from(8))
def test_hard_minimum_holds_in_every_phase(script):
    module = load_script(script)
    cfg = module.parse_config(["--learning_rate=1.0", "--min_lr_ratio=0.0", "--warmup_steps=100",
                               "--max_steps=200", "--min_lr=0.3"])
    lr = [module.get_lr(step, cfg) for step in range(201)]
    assert min(lr) == pytest.approx(0.3)
    assert lr[0] == lr[200] == pytest.approx(0.3) and lr[150] == pytest.approx(0.5)
    with pytest.raises(SystemExit, match="--lr_decay='step'"):
        module.parse_config(["--lr_decay=step"])


@pytest.mark.parametrize("script", scripts_from(8))
def test_training_uses_the_schedule(script, shakespeare, tmp_path):
    module = load_script(script)
    args = dict(max_steps=6, warmup_tokens=256, total_batch_size=128, lr_decay="linear", cooldown_fraction=0.5,
                min_lr_ratio=0.0, learning_rate=1e-3)
    result = module.main(tiny_args(script, shakespeare, tmp_path, run_name="r", **args))
    logged = logged_steps(result["run_dir"], "lr")
    assert [logged[s] for s in range(1, 7)] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3, 2 / 3 * 1e-3, 1 / 3 * 1e-3], rel=1e-3)


@pytest.mark.parametrize("script", scripts_from(8))
def test_lr_decay_tokens_ends_the_schedule_early_then_holds(script):
    """The original lineage's schedule: cosine over a token budget, whatever the run's length, then flat."""
    module = load_script(script)
    cfg = module.parse_config(["--learning_rate=1.0", "--min_lr_ratio=0.1", "--warmup_steps=0", "--max_steps=300",
                               "--total_batch_size=524288", f"--lr_decay_tokens={100 * 524288}"])
    lr = [module.get_lr(step, cfg) for step in range(301)]
    assert lr[0] == pytest.approx(1.0) and lr[50] == pytest.approx(0.55) and lr[100] == pytest.approx(0.1)
    assert lr[100:] == [lr[100]] * 201  # flat after the decay
    longer = module.parse_config(["--learning_rate=1.0", "--min_lr_ratio=0.1", "--warmup_steps=0",
                                  "--max_steps=50", f"--lr_decay_tokens={100 * 524288}"])
    assert module.get_lr(50, longer) == pytest.approx(0.55)  # a run shorter than the decay ends above the floor
