"""bench/fp8_cast_microbench.py: on the CPU, each way of scaling an activation to float8 gives back relu(h)^2 within
e4m3's rounding (3 mantissa bits), per-row scales the closest; an unknown variant fails before any work."""
import importlib.util
import os
import re

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("fp8_cast_microbench", os.path.join(REPO, "bench", "fp8_cast_microbench.py"))
fp8_cast_microbench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fp8_cast_microbench)
TINY = ["--device=cpu", "--compile=0", "--rows=256", "--cols", "64", "32", "--iters=1"]


def test_every_variant_quantizes_within_e4m3s_rounding():
    lines = fp8_cast_microbench.main(TINY)
    found = [re.match(r"256x(\d+) (\w+): .* max relative error (\S+)$", line).groups() for line in lines]
    assert [(cols, variant) for cols, variant, _ in found] == [
        (cols, variant) for cols in ("64", "32") for variant in ("tensor", "delayed", "row")]
    errors = {(cols, variant): float(error) for cols, variant, error in found}
    assert all(0 < error < 0.07 for error in errors.values())  # e4m3: 2^-4 relative at most, as largest-scaled
    assert all(errors[(cols, "row")] <= errors[(cols, "tensor")] for cols in ("64", "32"))


def test_an_unknown_variant_fails_before_any_work():
    with pytest.raises(SystemExit):
        fp8_cast_microbench.main(TINY + ["tensor", "blockwise"])
