"""runlog.py, the one log parser: lines read by key, unknown keys kept, anything that is not run output skipped;
and the tools and the tests' helpers read logs through it, not through a copy of their own."""
import math
import os
import sys

import pytest

from conftest import REPO, SCRIPTS, load_script, logged_steps, read_log, tiny_args

sys.path.insert(0, REPO)
import runlog  # noqa: E402  (a repo-root module, not a package)

# Every kind of line, plus what a parser must live with: the script's source at the top, a key it does not know
# (eta:, mfu:), a traceback, sample text printed as readable lines (one looks like a key:value line), a checkpoint
# line and a step line of a kind not known yet.
LOG = '''\
"""Step 17 of the lineage: add a tanh soft-cap on the LM head's logits.
Parent: 16-add-qk-norm.py
try:
    log(f"step:{step + 1}/{cfg.max_steps} loss:{losses[-1]:.6f}")
script:17-add-lm-head-logit-softcap.py
run_dir:runs/x
device:cuda:0 gpu:NVIDIA H100 80GB HBM3 torch:2.11.0+cu130 world_size:1
model_params:1234 grad_accum_steps:1 tokens_per_step:128
step:0/4 val_loss:10.900000 val_ppl:54176.36 tokens:0 train_time:0ms
step:0/4 sample:0 prompt:ROMEO: text:"ROMEO: the loss:3.0 of it"
ROMEO: what light through
device:yonder window breaks
step:1/4 loss:10.000000 lr:1.0000e-03 grad_norm:1.5000 dt:100.0ms tok/s:1280 tokens:128 train_time:100ms eta:3.5s
step:2/4 loss:8.000000 lr:8.0000e-04 grad_norm:1.2000 dt:50.0ms tok/s:2560 tokens:256 train_time:150ms mfu:41.5%
step:2/4 val_loss:8.500000 val_ppl:4914.77 tokens:256 train_time:150ms
Traceback (most recent call last): not run output
step:3/4 loss:nan lr:5.0000e-04 dt:50.0ms tokens:384 train_time:200ms
checkpoint:runs/x/checkpoints/step_000003
step:3/4 router_entropy:0.5
step:4/4 loss:6.000000 lr:2.0000e-04 grad_norm:1.0000 dt:50.0ms tok/s:2560 tokens:512 train_time:0.25s
step:4/4 val_loss:6.500000 val_ppl:665.14 tokens:512 train_time:250ms
step:4/4 hellaswag_acc:0.2500 hellaswag_correct:25 hellaswag_total:100 mode:standard
done steps:4 tokens:512 train_time:250ms peak_mem:64098MiB
'''


def test_parse_log_reads_every_kind_of_line():
    log = runlog.parse_log(LOG.splitlines())
    assert log["header"] == {"script": "17-add-lm-head-logit-softcap.py", "run_dir": "runs/x", "device": "cuda:0",
                             "gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "world_size": "1",
                             "model_params": "1234", "grad_accum_steps": "1", "tokens_per_step": "128"}
    train = log["train"]
    assert [row["step"] for row in train] == [1, 2, 3, 4] and {row["of"] for row in train} == {4}
    assert runlog.column(train, "loss")[:2] == [10.0, 8.0] and math.isnan(train[2]["loss"])  # a diverged loss
    assert [row["lr"] for row in train] == [1e-3, 8e-4, 5e-4, 2e-4]
    assert [row["tokens"] for row in train] == [128, 256, 384, 512]
    assert [row["train_time"] for row in train] == [100, 150, 200, 250]  # ms, whatever unit the line used
    assert train[0]["eta"] == 3500 and train[1]["mfu"] == 41.5  # keys added later are kept
    assert [(row["step"], row["val_loss"], row["tokens"]) for row in log["val"]] == [(0, 10.9, 0), (2, 8.5, 256),
                                                                                    (4, 6.5, 512)]
    assert [(row["step"], row["hellaswag_acc"], row["hellaswag_correct"], row["mode"])
            for row in log["hellaswag"]] == [(4, 0.25, 25, "standard")]
    assert [(row["step"], row["sample"]) for row in log["samples"]] == [(0, 0)]
    assert log["done"] == {"steps": 4, "tokens": 512, "train_time": 250, "peak_mem": 64098}


def test_missing_keys_and_a_resumed_run():
    lines = ["step:1/3 loss:5.0 lr:1e-3 tok/s:10 tokens:10 train_time:1000ms",
             "step:2/3 loss:4.0 lr:1e-3 tok/s:10 tokens:20 train_time:2000ms",
             "step:2/3 val_loss:4.2 tokens:20 train_time:2000ms",
             "step:3/3 loss:3.9 lr:1e-3 tok/s:10 tokens:30 train_time:3000ms",
             "resumed from:runs/x/checkpoints/step_000001 at_step:1 changed_fields:none",
             "step:2/3 loss:4.5 lr:1e-3 tokens:20 train_time:2500ms",  # resumed at step 1: steps 2-3 again
             "step:2/3 val_loss:4.4 tokens:20 train_time:2500ms",
             "step:3/3 loss:3.5 lr:1e-3 tok/s:10 tokens:30 train_time:3500ms"]
    log = runlog.parse_log(lines)
    assert [(row["step"], row["loss"]) for row in log["train"]] == [(1, 5.0), (2, 4.5), (3, 3.5)]
    assert [row["val_loss"] for row in log["val"]] == [4.4]
    tok_s = runlog.column(log["train"], "tok/s")
    assert tok_s[0] == 10 and math.isnan(tok_s[1]) and "tok/s" not in log["train"][1]
    assert log["done"] is None and log["header"] == {}  # the run did not finish
    assert runlog.step_values(lines, "loss") == {1: 5.0, 2: 4.5, 3: 3.5}  # the last line of a step wins
    assert runlog.step_values(lines, "val_loss") == {2: 4.4}


def test_values():
    assert [runlog.value(text) for text in ("6.12", "1.0e-03", "123.4ms", "2s", "1.5min", "1234MiB", "-3")] == \
        [6.12, 1e-3, 123.4, 2000.0, 90000.0, 1234.0, -3.0]
    assert [runlog.value(text) for text in ("cuda:0", "NVIDIA H100", "12/50", "")] == \
        ["cuda:0", "NVIDIA H100", "12/50", ""]
    assert runlog.number("abc") is None and runlog.number(None) is None and runlog.number("7ms") == 7.0
    assert runlog.parse_pairs("x y:1 gpu:NVIDIA H100 z:") == {"y": "1", "gpu": "NVIDIA H100", "z": ""}


def test_the_tests_helpers_read_through_runlog(tmp_path):
    (tmp_path / "log.txt").write_text(LOG)
    rows = read_log(str(tmp_path))
    assert len(rows) == len(LOG.splitlines())  # one row per line, so rows zip with the file's lines
    assert rows[6]["gpu"] == "NVIDIA H100 80GB HBM3"  # a value with spaces stays whole
    losses = logged_steps(str(tmp_path))
    assert sorted(losses) == [1, 2, 3, 4] and (losses[1], losses[4]) == (10.0, 6.0) and math.isnan(losses[3])
    assert logged_steps(str(tmp_path), "val_loss") == {0: 10.9, 2: 8.5, 4: 6.5}
    assert logged_steps(str(tmp_path), "hellaswag_total") == {4: 100}


def test_a_real_run_of_the_newest_script(tmp_path, shakespeare):
    script = SCRIPTS[-1]
    module = load_script(script)
    fields = {"sample_every": 2, "sample_count": 1, "sample_min_tokens": 4, "sample_max_tokens": 8, "max_steps": 4,
              "ckpt_every": 0}  # no checkpoint: megabytes that pytest's tmp folders would keep
    names = {field for field in module.Config.__dataclass_fields__}
    extra = {key: value for key, value in fields.items() if key in names}
    run_dir = module.main(tiny_args(script, shakespeare, str(tmp_path), run_name="r", **extra))["run_dir"]
    log = runlog.parse_log(os.path.join(run_dir, "log.txt"))
    assert [row["step"] for row in log["train"]] == [1, 2, 3, 4]
    assert log["header"]["script"] == script and log["header"]["device"] == "cpu"
    assert log["done"]["steps"] == 4 and log["done"]["tokens"] == 4 * 128
    if "val_every" in names:
        assert log["val"][-1]["step"] == 4
    if "sample_every" in names:
        assert {row["step"] for row in log["samples"]} == {0, 2, 4}


LOG_READERS = ["plot_runs.py", "push_to_hub.py", "bench/run.py", "tests/conftest.py"]


@pytest.mark.parametrize("path", LOG_READERS)
def test_no_other_log_parser(path):
    """The tools read logs through runlog, and none keeps a parser of its own."""
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        source = f.read()
    for definition in ("def parse_log(", "def parse_pairs(", "def number(", "KEY = re.compile"):
        assert definition not in source, f"{path} defines its own {definition}"
    assert "runlog" in source
