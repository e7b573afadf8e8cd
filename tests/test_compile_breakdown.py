"""bench/compile_breakdown.py: a tiny CPU run of the newest script marks the end of each throwaway warm-up step, of
the warm-up's validation and of the warm-up, in order and in time, then dynamo's table; bad input (an override, a
run with the warm-up off) fails before anything is written."""
import importlib.util
import os

import pytest

from conftest import REPO, SCRIPTS, tiny_args

spec = importlib.util.spec_from_file_location("compile_breakdown", os.path.join(REPO, "bench", "compile_breakdown.py"))
compile_breakdown = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compile_breakdown)
NEWEST = os.path.join(REPO, SCRIPTS[-1])
DATA = os.path.join(REPO, "input.txt")


def tiny(tmp_path, **overrides):
    return tiny_args(SCRIPTS[-1], DATA, str(tmp_path / "runs"), **{**dict(
        compile=False, kernel_warmup_steps=2, val_target=0.0, window=0, window_ramp=False, attention="sdpa",
        blockmask_from_kv_blocks=False, max_steps=1, val_every=0, lr_decay_tokens=0, val_tokens=128,
        async_batches=False), **overrides})


def test_marks_each_warm_up_step_and_its_validation(tmp_path):
    out = tmp_path / "cb"
    text = compile_breakdown.main(["--out", str(out), NEWEST] + tiny(tmp_path))
    assert (out / "compile.txt").read_text() == text
    rows = [line.split() for line in text.splitlines() if line.startswith("  ")]
    names = [" ".join(row[:-2]) for row in rows]
    assert names[:4] == ["step 1", "step 2", "its validation", "the warm-up (restored)"]
    seconds = [float(row[-2]) for row in rows[:4]]
    assert 0 < seconds[0] <= seconds[1] <= seconds[2] <= seconds[3]
    assert "TorchDynamo compilation metrics" in text


def test_bad_input_fails_before_anything_is_written(tmp_path):
    with pytest.raises(SystemExit, match="--n_layer"):
        compile_breakdown.main(["--out", str(tmp_path / "cb"), NEWEST, "--n_layer=x"])
    with pytest.raises(SystemExit, match="--kernel_warmup_steps=0: the warm-up is off"):
        compile_breakdown.main(["--out", str(tmp_path / "cb"), NEWEST] + tiny(tmp_path, kernel_warmup_steps=0))
    with pytest.raises(SystemExit, match="has no kernel warm-up"):
        compile_breakdown.main(["--out", str(tmp_path / "cb"), os.path.join(REPO, SCRIPTS[0])])
    assert not (tmp_path / "cb").exists()
