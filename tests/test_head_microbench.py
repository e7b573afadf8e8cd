"""bench/head_microbench.py: on a tiny head on the CPU, every variant computes the same loss (float8 within its
rounding), and an unknown variant fails before any work."""
import importlib.util
import os

import pytest

from conftest import REPO, SCRIPTS, load_script

spec = importlib.util.spec_from_file_location("head_microbench", os.path.join(REPO, "bench", "head_microbench.py"))
head_microbench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(head_microbench)
NEWEST = os.path.join(REPO, SCRIPTS[-1])
TINY = ["--script", NEWEST, "--tokens=64", "--n_embd=32", "--vocab_size=256", "--iters=2", "--compile=0",
        "--device=cpu"]


def losses(lines):
    return {line.split(": ")[0]: float(line.rsplit("loss ", 1)[1]) for line in lines}


def test_the_variants_compute_the_same_loss():
    result = losses(head_microbench.main(TINY + ["bf16", "fp8", "script:FP8Linear"]))
    assert set(result) == {"bf16", "fp8", "script:FP8Linear"}
    assert result["fp8"] == result["script:FP8Linear"]
    assert result["fp8"] == pytest.approx(result["bf16"], rel=0.01)


def test_the_sigmoid_form_of_the_cap_is_the_same_loss():
    tanh = losses(head_microbench.main(TINY + ["--softcap=0.1", "bf16"]))["bf16"]
    sigmoid = losses(head_microbench.main(TINY + ["--softcap=0.1", "--softcap_form=sigmoid", "bf16"]))["bf16"]
    uncapped = losses(head_microbench.main(TINY + ["--softcap=0", "bf16"]))["bf16"]
    assert sigmoid == pytest.approx(tanh, abs=1e-3) and abs(uncapped - tanh) > 1e-3


def test_an_unknown_variant_fails_before_any_work():
    with pytest.raises(SystemExit, match="script:NoSuchFunction"):
        head_microbench.main(TINY + ["bf16", "script:NoSuchFunction"])


def test_the_fused_head_is_the_same_loss_where_the_script_has_it():
    if hasattr(load_script(SCRIPTS[-1]), "FP8HeadLoss"):
        result = losses(head_microbench.main(TINY + ["fp8", "fused", "fused:32x64x4"]))
        assert result["fused"] == pytest.approx(result["fp8"], abs=2e-4) and result["fused:32x64x4"] == result["fused"]
        with pytest.raises(SystemExit, match="fused:MxVxW"):
            head_microbench.main(TINY + ["fused:64x128"])
    else:
        with pytest.raises(SystemExit, match="variant 'fused': the script has no FP8HeadLoss"):
            head_microbench.main(TINY + ["fused"])


def test_gradients_are_compared_with_the_first_variants_and_flagged_when_not_finite(monkeypatch):
    lines = head_microbench.main(TINY + ["bf16", "fp8"])
    assert ", gradients, loss" in lines[0]
    x_error, w_error = (float(part.split()[-1]) for part in lines[1].split("gradients vs bf16: ")[1]
                        .split(", loss")[0].split(", "))
    assert 0 < x_error < 0.1 and 0 < w_error < 0.1 and "NOT FINITE" not in lines[1]
    original = head_microbench.head_and_loss

    def nan_gradients(module, variant, *args):
        loss = original(module, variant, *args)
        return (lambda x, w, t: loss(x, w, t) * float("nan")) if variant == "fp8" else loss
    monkeypatch.setattr(head_microbench, "head_and_loss", nan_gradients)
    lines = head_microbench.main(TINY + ["bf16", "fp8"])
    assert "NOT FINITE" in lines[1] and "NOT FINITE" not in lines[0]
