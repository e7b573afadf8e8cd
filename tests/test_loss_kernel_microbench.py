"""bench/loss_kernel_microbench.py: on the CPU the script's own loss runs (its torch reference) on a small chunk and
agrees with itself; the Triton variants are refused off CUDA, and a script without the fused loss before any work."""
import importlib.util
import os

import pytest

from conftest import REPO, SCRIPTS, step_adding

spec = importlib.util.spec_from_file_location("loss_kernel_microbench",
                                              os.path.join(REPO, "bench", "loss_kernel_microbench.py"))
loss_kernel_microbench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(loss_kernel_microbench)
NEWEST = os.path.join(REPO, SCRIPTS[-1])
SMALL = ["--script", NEWEST, "--device=cpu", "--rows=64", "--vocab_size=256"]


def test_the_steps_loss_runs_on_the_cpu_and_matches_its_reference():
    (line,) = loss_kernel_microbench.main(SMALL + ["step"])
    assert line == ("64x256 step: untimed (cpu), max |loss - reference| 0.00e+00, "
                    "max |gradient - reference| 0.00e+00")


def test_triton_variants_are_refused_off_cuda_and_old_scripts_before_any_work(capsys):
    with pytest.raises(SystemExit):
        loss_kernel_microbench.main(SMALL + ["step", "tanh"])
    assert "off CUDA only `step` runs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        loss_kernel_microbench.main(SMALL + ["exp"])
    older = os.path.join(REPO, SCRIPTS[SCRIPTS.index(step_adding("fused_head_loss")) - 1])
    with pytest.raises(SystemExit, match="has no fused head loss kernel"):
        loss_kernel_microbench.main(SMALL[2:] + ["--script", older, "step"])


def test_the_fast_variant_needs_step_63_and_is_refused_before_any_work():
    older = os.path.join(REPO, SCRIPTS[SCRIPTS.index(step_adding("fused_loss_fast_math")) - 1])
    with pytest.raises(SystemExit, match="variant 'fast': .* has no --fused_loss_fast_math"):
        loss_kernel_microbench.main(["--script", older, "--rows=64", "--vocab_size=256", "step", "fast"])
