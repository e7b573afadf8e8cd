"""--compile_single_config (step 64, off): inductor compiles each pointwise kernel in one launch config instead of
2-6 compiled and timed at the kernel's first run (less to compile before a cold start's first step). Off, the step
is its parent (step 63) and inductor keeps its default; the setting is in place before the first torch.compile of a
run, and without --compile it is refused, naming the fix."""
import pytest
import torch
import torch._inductor.config as inductor_config

import lever_helpers
from lever_helpers import build, lever_and_parent, train, traced_run

lever, parent_step = lever_and_parent("compile_single_config")


@pytest.fixture
def inductor_default(monkeypatch):
    """Inductor's own default, put back after the test (a run sets it process-wide)."""
    monkeypatch.setattr(inductor_config.triton, "autotune_pointwise", True)


def test_off_by_default_and_off_is_the_parent():
    assert lever.Config().compile_single_config is False
    model, cfg = build(lever)
    parent, parent_cfg = build(parent_step)
    assert train(model, cfg, lever, 3) == train(parent, parent_cfg, parent_step, 3)


def test_the_option_sets_inductor_and_off_keeps_its_default(inductor_default):
    lever.set_inductor_options(lever.Config(compile_single_config=True))
    assert inductor_config.triton.autotune_pointwise is False
    lever.set_inductor_options(lever.Config())
    assert inductor_config.triton.autotune_pointwise is True


@pytest.mark.parametrize("single", [True, False])
def test_a_run_sets_it_before_its_first_compile(single, inductor_default, monkeypatch, shakespeare, tmp_path):
    seen = []
    real = lever_helpers.REAL_COMPILE

    def recording(fn, **kwargs):  # what inductor would be told when each graph is handed to torch.compile
        seen.append(inductor_config.triton.autotune_pointwise)
        return real(fn, **kwargs)
    monkeypatch.setattr(lever_helpers, "REAL_COMPILE", recording)
    inductor_config.triton.autotune_pointwise = single  # the opposite of what the run must set
    traced_run(lever, monkeypatch, shakespeare, tmp_path, compile=True, compile_single_config=single)
    assert seen and set(seen) == {not single}, seen


def test_without_compile_it_is_refused():
    with pytest.raises(SystemExit, match="--compile is off: set --compile=true, or --compile_single_config=false"):
        lever.parse_config(["--compile_single_config=true", "--compile=false"])
    assert lever.parse_config(["--compile_single_config=true"]).compile_single_config is True
