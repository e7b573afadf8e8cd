"""bench/memory_phases.py: a tiny CPU run of the newest script, with a stand-in for torch.cuda's peak counter, is cut
into the phases it names (each optimizer step, each validation, what lies between), in the run's order, the kernel
warm-up's steps and validation first; the table marks the largest; a bad override stops it before anything is
written, and without CUDA (and no stand-in) it refuses to run."""
import importlib.util
import os

import pytest

from conftest import REPO, SCRIPTS, tiny_args

spec = importlib.util.spec_from_file_location("memory_phases", os.path.join(REPO, "bench", "memory_phases.py"))
memory_phases = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory_phases)
NEWEST = os.path.join(REPO, SCRIPTS[-1])
DATA = os.path.join(REPO, "input.txt")


class FakeAllocator:
    """A peak counter driven by the test: each phase's peak is the number of the phase (in MiB), but the third's."""

    def __init__(self):
        self.phase = 0

    def peak(self):
        self.phase += 1
        return (100 if self.phase == 3 else self.phase) * memory_phases.MIB

    def reset(self):
        pass


def tiny(tmp_path, **overrides):
    values = dict(compile=False, kernel_warmup_steps=2, val_target=0.0, window=0, window_ramp=False, attention="sdpa",
                  blockmask_from_kv_blocks=False, max_steps=4, val_every=2, lr_decay_tokens=0, val_tokens=128,
                  async_batches=False)
    return tiny_args(SCRIPTS[-1], DATA, str(tmp_path / "runs"), **{**values, **overrides})


def test_phases_in_the_order_of_the_run(tmp_path):
    fake = FakeAllocator()
    phases = memory_phases.main(["--out", str(tmp_path / "mem"), NEWEST] + tiny(tmp_path),
                                phases=memory_phases.Phases(fake.peak, fake.reset))
    names = [name for name, _ in phases.rows]
    # the warm-up (2 steps, one validation batch), then steps 0..4 of the run with validations at 0, 2 and 4
    assert names == ["step 1", "step 2", "between", "validation 1", "between", "validation 2", "step 3", "step 4",
                     "between", "validation 3", "step 5", "step 6", "between", "validation 4", "end"], names
    text = (tmp_path / "mem" / "memory.txt").read_text()
    peak_lines = [line for line in text.splitlines() if line.endswith("<- the run peak")]
    assert peak_lines == [line for line in text.splitlines() if line.startswith("between ") and " 100" in line]


def test_a_bad_override_or_no_cuda_stops_it_before_anything_is_written(tmp_path):
    with pytest.raises(SystemExit):
        memory_phases.main(["--out", str(tmp_path / "mem"), NEWEST, "--no_such_field=1"])
    if not memory_phases.torch.cuda.is_available():
        with pytest.raises(SystemExit, match="run it on a CUDA machine"):
            memory_phases.main(["--out", str(tmp_path / "mem"), NEWEST] + tiny(tmp_path))
    assert not (tmp_path / "mem").exists()
