"""Step 67 (RESULTS 2026-11-27 (q)): micro-batches of 16 sequences and --relu2_from_float8 on by default. Given the old
values back it is step 66; the bench preset then takes one forward and backward a step on one process, and the
measured run's overrides of step 66 are step 67's bench defaults (validation's batch aside, which was 8 there)."""
import dataclasses

import pytest

from conftest import load_script
from lever_helpers import assert_recipe_defaults

step = load_script(67)
parent = load_script(66)

NEW = dict(batch_size=16, relu2_from_float8=True)
OLD = dict(batch_size=8, relu2_from_float8=False)


def test_the_defaults_are_the_new_values_and_the_old_ones_are_the_parent():
    assert_recipe_defaults(step, parent, NEW, OLD)


def test_the_measured_run_is_the_bench_default_with_one_micro_batch_a_step():
    measured = parent.parse_config(["--preset=bench100m", "--relu2_from_float8=true", "--batch_size=16",
                                    "--val_batch_size=8"])
    cfg = step.parse_config(["--preset=bench100m", "--val_batch_size=8"])
    assert dataclasses.asdict(cfg) == dataclasses.asdict(measured)
    plan = step.resolve_training(step.parse_config(["--preset=bench100m"]), 1)
    assert (plan.micro_batch_size, plan.grad_accum_steps) == (16, 1)
    assert step.resolve_training(parent.parse_config(["--preset=bench100m"]), 1).grad_accum_steps == 2


def test_the_demo_keeps_it_off_and_a_float8_free_run_names_both_fixes():
    assert step.parse_config(["--preset=demo"]).relu2_from_float8 is False
    with pytest.raises(SystemExit, match=r"set them, or --relu2_from_float8=false"):
        step.parse_config(["--fp8_mlp=off"])
    assert step.parse_config(["--fp8_mlp=off", "--relu2_from_float8=false"]).fp8_mlp == "off"
