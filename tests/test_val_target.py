"""Stopping at a val-loss target (from step 19): validation starts once the train loss is near the target, and
the run ends at the first validation at or below it."""
import pytest

from conftest import load_script, logged_steps, read_log, scripts_from, tiny_args


@pytest.mark.parametrize("script", scripts_from(19))
def test_stops_at_the_first_val_at_or_below_the_target(script, shakespeare, tmp_path):
    module = load_script(script)
    target, margin = 9.3, -0.4  # validation may start while the train loss is still 0.4 above the target
    result = module.main(tiny_args(script, shakespeare, tmp_path, run_name="r", max_steps=12, val_every=1,
                                   learning_rate=1e-2, n_layer=1, sample_every=0, ckpt_every=0,
                                   val_target=target, val_target_margin=margin))
    losses, val_steps = result["losses"], [step for step, _ in result["val_losses"]]
    first_near = next(step for step, loss in enumerate(losses, 1) if loss + margin <= target)
    assert 1 < first_near  # the test means something: the train loss started far from the target
    assert val_steps == list(range(first_near, val_steps[-1] + 1))  # none before, then every val_every steps
    *above, (stop, last) = result["val_losses"]
    assert last <= target and all(loss > target for _, loss in above)
    assert stop < 12 and len(losses) == stop  # no training step after the target was reached
    assert sorted(logged_steps(result["run_dir"], "reached_val_target")) == [stop]
    assert read_log(result["run_dir"])[-1]["steps"] == str(stop)


@pytest.mark.parametrize("script", scripts_from(19))
@pytest.mark.parametrize("option", ["--val_target=-1", "--val_target=nan", "--val_target_margin=inf"])
def test_bad_targets_are_refused(script, option):
    with pytest.raises(SystemExit, match=option.split("=")[0]):
        load_script(script).parse_config([option])
