"""bench/flex_microbench.py: on a tiny shape on the CPU, each kernel-options variant runs FlexAttention at the
window and at half of it with the same output as the first variant, its options reaching flex_attention; a bad
variant and a script whose mask takes no window fail before any work; a failing variant is reported."""
import importlib.util
import os
import re

import pytest

from conftest import REPO, SCRIPTS, step_adding

spec = importlib.util.spec_from_file_location("flex_microbench", os.path.join(REPO, "bench", "flex_microbench.py"))
flex_microbench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(flex_microbench)
NEWEST = os.path.join(REPO, SCRIPTS[-1])
TINY = ["--script", NEWEST, "--device=cpu", "--compile=0", "--batch_size=1", "--block_size=512", "--n_head=2",
        "--n_embd=64", "--window=256", "--iters=1"]


def test_each_variant_runs_both_widths_with_the_same_output():
    lines = flex_microbench.main(TINY + ["default", "fwd_BLOCK_M=64,bwd_num_warps=8"])
    assert [re.match(r"window\s+(\d+) (\S+):", line).groups() for line in lines] == [
        ("256", "default"), ("256", "fwd_BLOCK_M=64,bwd_num_warps=8"),
        ("128", "default"), ("128", "fwd_BLOCK_M=64,bwd_num_warps=8")]
    assert all("(forward)" in line and line.endswith("max |out - first| 0.00e+00") for line in lines)


def test_each_variant_reaches_flex_attention_as_its_options(monkeypatch):
    load_script, seen = flex_microbench.load_script, []

    def load(path):
        module = load_script(path)
        flex_attention = module.flex_attention
        monkeypatch.setattr(module, "flex_attention", lambda *a, kernel_options=None, **k: seen.append(
            kernel_options) or flex_attention(*a, kernel_options=kernel_options, **k))
        return module
    monkeypatch.setattr(flex_microbench, "load_script", load)
    flex_microbench.main(TINY + ["default", "fwd_BLOCK_M=64,bwd_num_warps=8"])
    assert None in seen and {"fwd_BLOCK_M": 64, "bwd_num_warps": 8} in seen
    assert all(options in (None, {"fwd_BLOCK_M": 64, "bwd_num_warps": 8}) for options in seen)


@pytest.mark.parametrize("variant, message", [
    ("BLOCK_M=96", "BLOCK_M=96 must be a power of 2 from 16 that divides"),
    ("BLOCK_Q=64", "'BLOCK_Q=64' is not KEY=N"), ("num_warps=four", "'num_warps=four' is not KEY=N"),
    ("fwd_BLOCK_M=64,fwd_BLOCK_M=32", "'fwd_BLOCK_M=32' is not KEY=N")])
def test_bad_variants_fail_before_any_work(variant, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        flex_microbench.main(TINY + ["default", variant])


def test_a_script_whose_mask_takes_no_window_fails_before_any_work():
    older = os.path.join(REPO, SCRIPTS[SCRIPTS.index(step_adding("long_window_layers")) - 1])
    with pytest.raises(SystemExit, match="takes no window"):
        flex_microbench.main(TINY[2:] + ["--script", older, "default"])


def test_a_failing_variant_is_reported_and_the_next_one_still_runs(monkeypatch):
    load_script = flex_microbench.load_script

    def load(path):  # the script, its flex_attention failing for one tile set as Triton does past shared memory
        module = load_script(path)
        flex_attention = module.flex_attention

        def flex(q, k, v, block_mask=None, kernel_options=None):
            if (kernel_options or {}).get("fwd_BLOCK_M") == 32:
                raise RuntimeError("out of resource: shared memory, Required: 262144, Hardware limit: 232448")
            return flex_attention(q, k, v, block_mask=block_mask, kernel_options=kernel_options)
        monkeypatch.setattr(module, "flex_attention", flex)
        return module
    monkeypatch.setattr(flex_microbench, "load_script", load)
    lines = flex_microbench.main(TINY + ["default", "fwd_BLOCK_M=32", "fwd_BLOCK_M=64"])
    assert [line.split(":")[0].split()[-1] for line in lines] == ["default", "fwd_BLOCK_M=32", "fwd_BLOCK_M=64"] * 2
    assert all("failed: RuntimeError: out of resource" in line for line in lines if "BLOCK_M=32" in line)
    assert all(line.endswith("max |out - first| 0.00e+00") for line in lines if "BLOCK_M=32" not in line)
