"""Tests of the GPU benchmark harness in bench/: the runner, the bench100m protocol, the plot and a whole session.
CPU only, offline, on a corpus that the project's own ../shared/bench/make_corpus.py builds from a tiny tree of .py
files written here, and a 2-layer model; the runner and the session run the real lineage scripts (03, which reads
the corpus's .npy shards; 01, which reads a text file decoded from them)."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, SCRIPTS, SHARED, load_script, script_number

BENCH = os.path.join(REPO, "bench")
CORPUS_SCRIPT = os.path.join(SHARED, "bench", "make_corpus.py")
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--total_batch_size=128",
        "--device=cpu", "--warmup_steps=1"]
# The runner's target: step 03 exercises the shard-folder path; 01 (train.txt) until 03 exists.
LINEAGE = next((s for s in SCRIPTS if script_number(s) == 3), None) or next(s for s in SCRIPTS if script_number(s) == 1)
SUMMARY_FIELDS = ["name", "script", "overrides", "protocol", "baseline", "nproc", "torchrun", "budget_tokens",
                  "max_steps", "status", "returncode", "wall_s", "date", "command", "card", "torch", "device",
                  "world_size", "model_params", "tokens_per_step", "steps", "tokens_trained", "train_time_s",
                  "train_time_ex_compile_s", "compile_warmup_s", "steady_from_step", "steady_step_ms",
                  "steady_tokens_per_s", "flops_per_token", "matmul_tflops", "mfu", "peak_mem_mib", "final_train_loss",
                  "val", "final_val_loss", "hellaswag_acc", "train_curve", "config", "run_dir", "stdout_log", "row",
                  "result"]
RESULT_FIELDS = ["name", "card", "date", "script", "overrides", "protocol", "budget_tokens", "tokens_trained",
                 "tokens_per_s", "val_at_quarters", "final_val_loss", "train_s", "compile_warmup_s", "peak_mem_mib",
                 "target_val", "train_s_to_target", "baseline", "status", "nproc", "torch", "corpus_sha256"]


def load_bench(name):
    spec = importlib.util.spec_from_file_location(f"test_bench_{name}", os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_run = load_bench("run")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------------------
# A tiny site-packages (six small packages, one with a long file) and the corpus the project's script builds of it


def module_source(package, index, functions):
    return "".join(f'def {package}_f{index}_{i}(x):\n    """{package.upper()}_MARKER {index}-{i}"""\n'
                   f'    return x * {i} + {index}\n\n' for i in range(functions))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("site-packages")
    for package in ("alpha", "gamma", "delta", "epsilon", "zeta"):
        for index in range(2):
            (root / package).mkdir(exist_ok=True)
            (root / package / f"mod{index}.py").write_text(module_source(package, index, 4))
    (root / "solo.py").write_text(module_source("solo", 0, 3))
    (root / "beta").mkdir()
    (root / "beta" / "long.py").write_text(module_source("beta", 0, 600))  # ~20k tokens: longer than any window
    return root


@pytest.fixture(scope="module")
def corpus(tree, tmp_path_factory):
    if not os.path.isfile(CORPUS_SCRIPT):
        pytest.skip("no ../shared/bench/make_corpus.py")
    out = tmp_path_factory.mktemp("corpus")
    subprocess.run([sys.executable, CORPUS_SCRIPT, "--out", str(out), "--root", str(tree), "--val-tokens", "600",
                    "--shard-tokens", "5000"], check=True, capture_output=True, text=True, timeout=120)
    return out


def test_bench_has_no_copy_of_the_corpus_script():
    """The corpus comes from ../shared/bench/make_corpus.py itself (the session runs it), never a copy."""
    assert not os.path.exists(os.path.join(BENCH, "make_corpus.py"))
    assert load_bench("session").CORPUS_SCRIPT == os.path.join(os.path.dirname(REPO), "shared", "bench",
                                                                 "make_corpus.py")


# ---------------------------------------------------------------------------------------------------------
# The runner: log parsing and the numbers derived from it


LOG = """script:04-add-validation.py
run_dir:/tmp/runs/x
device:cuda:0 gpu:NVIDIA H100 80GB HBM3 torch:2.11.0+cu130 world_size:1
model_params:124475904 grad_accum_steps:4 tokens_per_step:524288
    log(f"step:{step + 1}/{cfg.max_steps} loss:{losses[-1]:.6f}")
step:1/10 loss:10.9 lr:6.0e-05 grad_norm:1.0 dt:30000.0ms tok/s:17476 tokens:524288 train_time:30000ms
step:2/10 loss:9.9 lr:1.2e-04 grad_norm:1.0 dt:2000.0ms tok/s:262144 tokens:1048576 train_time:32000ms
step:3/10 loss:8.9 lr:1.8e-04 grad_norm:1.0 dt:1000.0ms tok/s:524288 tokens:1572864 train_time:33000ms
step:4/10 loss:7.9 lr:2.4e-04 grad_norm:1.0 dt:1000.0ms tok/s:524288 tokens:2097152 train_time:34000ms
step:5/10 loss:7.5 lr:3.0e-04 grad_norm:1.0 dt:1000.0ms tok/s:524288 tokens:2621440 train_time:35000ms
step:5/10 val_loss:7.400000 val_ppl:1636.0 tokens:2621440 train_time:35000ms
step:6/10 loss:7.0 lr:3.6e-04 grad_norm:1.0 dt:1000.0ms tok/s:524288 tokens:3145728 train_time:36000ms extra:1
step:7/10 loss:6.9 lr:4.2e-04 grad_norm:1.0 dt:1100.0ms tok/s:476625 tokens:3670016 train_time:37100ms
step:8/10 loss:6.8 lr:4.8e-04 grad_norm:1.0 dt:900.0ms tok/s:582542 tokens:4194304 train_time:38000ms
step:9/10 loss:6.7 lr:5.4e-04 grad_norm:1.0 dt:1000.0ms tok/s:524288 tokens:4718592 train_time:39000ms
step:10/10 loss:6.6 lr:6.0e-04 grad_norm:1.0 dt:1000.0ms tok/s:524288 tokens:5242880 train_time:40000ms
step:10/10 val_loss:6.500000 val_ppl:665.1 tokens:5242880 train_time:40000ms
step:10/10 hellaswag_acc:0.2512 hellaswag_correct:251 hellaswag_total:1000
done steps:10 tokens:5242880 train_time:40000ms peak_mem:1234MiB
"""


def summarize(log_text, config=None, device_info=None):
    run = bench_run.runlog.parse_log(log_text.splitlines())
    config = config or {"n_layer": 12, "n_embd": 768, "block_size": 1024, "total_batch_size": 524288}
    return bench_run.summarize(run, config, device_info or {"card": "ignored", "torch": "x", "matmul_tflops": 800.0},
                               nproc=1)


def test_summarize_timing_and_mfu():
    s = summarize(LOG)
    assert s["card"] == "NVIDIA H100 80GB HBM3" and s["torch"] == "2.11.0+cu130"
    # steady: steps after the first max(5, 10%) = steps 6..10, median dt 1000 ms
    assert (s["steady_from_step"], s["steady_step_ms"], s["steady_tokens_per_s"]) == (6, 1000.0, 524288.0)
    assert s["compile_warmup_s"] == 30.0  # (30000 + 2000 + 1000) - 3 * 1000 ms
    flops = 6 * (124475904 - 1024 * 768) + 12 * 12 * 768 * 1024  # the position table is looked up, not multiplied
    assert s["flops_per_token"] == flops
    assert s["mfu"] == round(flops * 524288 / 800e12, 4)
    assert (s["tokens_trained"], s["peak_mem_mib"], s["train_time_s"], s["train_time_ex_compile_s"]) == \
        (5242880, 1234.0, 40.0, 10.0)
    assert s["final_val_loss"] == 6.5 and s["final_train_loss"] == 6.6 and s["hellaswag_acc"] == 0.2512
    assert [v["train_time_ex_compile_ms"] for v in s["val"]] == [5000.0, 10000.0]
    warmed = summarize(LOG.replace("model_params:", "kernel_warmup_steps:3 warmup_time:90000ms\nmodel_params:"))
    assert warmed["compile_warmup_s"] == 120.0 and warmed["train_time_ex_compile_s"] == 10.0  # warm-up: untimed
    on_cpu = summarize(LOG.replace("device:cuda:0", "device:cpu"))
    assert on_cpu["card"] == "cpu" and on_cpu["mfu"] is None and on_cpu["matmul_tflops"] is None


def test_val_at_quarters_takes_the_val_at_or_nearest_after_each_quarter():
    budget = bench_run.BENCH100M_TOKENS
    quarter = budget // 4  # 25,165,824
    val = [{"step": step, "tokens": step * quarter // 2, "val_loss": 10.0 - step} for step in (0, 1, 2, 3, 5, 7)]
    points = bench_run.val_at_quarters(val, budget)
    assert [p["target"] for p in points] == [25_165_824, 50_331_648, 75_497_472, 100_663_296]
    assert [(p["tokens"], p["val_loss"]) for p in points] == [
        (quarter, 8.0),  # exactly at 25%
        (5 * quarter // 2, 5.0),  # 50%: none at it, the next one after
        (7 * quarter // 2, 3.0),  # 75%: the next after
        (None, None),  # the run logged no val at 100%
    ]


def test_parse_count():
    assert [bench_run.parse_count(t) for t in ("50M", "5e7", "26_214_400", "1.5B", "500k")] == \
        [50_000_000, 50_000_000, 26_214_400, 1_500_000_000, 500_000]


def test_runner_rejects_overrides_it_sets(tmp_path):
    args, overrides = bench_run.parse_args(["--script", LINEAGE, "--budget-tokens", "1M", "--out", str(tmp_path),
                                            "--", "--max_steps=3"])
    with pytest.raises(SystemExit, match="--max_steps is set by the runner"):
        bench_run.benchmark(args, overrides)


# ---------------------------------------------------------------------------------------------------------
# The runner on the real lineage scripts, then the plot


def run_bench(*argv, timeout=120):
    done = subprocess.run([sys.executable, os.path.join(BENCH, "run.py"), *argv], capture_output=True, text=True,
                          timeout=timeout)
    return done


@pytest.fixture(scope="module")
def tiny_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    done = run_bench("--script", LINEAGE, "--budget-tokens", "700", "--corpus", str(corpus), "--out", str(out),
                     "--name", "tiny", "--baseline", "base", "--results", str(out / "results.jsonl"),
                     "--no-torchrun", "--", *TINY)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out / "tiny.summary.json") as f:
        return out, json.load(f), done.stdout


def test_runner_summary_of_a_real_run(corpus, tiny_run):
    out, s, stdout = tiny_run
    assert [k for k in SUMMARY_FIELDS if k not in s] == []
    assert s["status"] == "ok" and s["script"] == LINEAGE and s["overrides"] == TINY
    assert (s["max_steps"], s["steps"], s["tokens_trained"]) == (6, 6, 768)  # ceil(700 / 128) whole steps
    if script_number(LINEAGE) >= 3:
        assert s["config"]["data"] == str(corpus / "npy")  # make_corpus.py's shard folder
    assert s["card"] == "cpu" and s["matmul_tflops"] is None and s["mfu"] is None and s["peak_mem_mib"] is None  # logged on CUDA only
    assert s["steady_tokens_per_s"] > 0 and s["compile_warmup_s"] is not None and s["flops_per_token"] > 0
    assert s["model_params"] > 0 and s["final_train_loss"] > 0 and s["wall_s"] > 0
    assert s["final_val_loss"] is None and s["val"] == []  # steps before 04 have no validation
    assert len(s["train_curve"]) == 6
    row = (out / "tiny.row.md").read_text().strip()
    assert row == s["row"] and row.startswith("| tiny | cpu |") and "| ok |" in row
    assert row.count("|") == bench_run.ROW_HEADER.splitlines()[0].count("|")
    assert os.path.exists(out / "runs" / "tiny" / "log.txt") and os.path.exists(out / "tiny.stdout.log")
    assert row in stdout


def test_runner_appends_one_result_line(corpus, tiny_run):
    out, s, _ = tiny_run
    (line,) = read_jsonl(out / "results.jsonl")
    assert line == s["result"] and list(line) == RESULT_FIELDS
    with open(corpus / "info.json") as f:
        sha256 = json.load(f)["sha256"]
    assert (line["name"], line["baseline"], line["protocol"], line["budget_tokens"], line["tokens_trained"]) == \
        ("tiny", "base", "custom", 700, 768)
    assert (line["card"], line["script"], line["overrides"], line["corpus_sha256"]) == ("cpu", LINEAGE, TINY, sha256)
    assert line["tokens_per_s"] == s["steady_tokens_per_s"] and line["train_s"] == s["train_time_ex_compile_s"]
    assert line["compile_warmup_s"] == s["compile_warmup_s"] and line["peak_mem_mib"] is None
    assert [p["target"] for p in line["val_at_quarters"]] == [175, 350, 525, 700]
    assert line["target_val"] is None and line["train_s_to_target"] is None  # the bar is bench100m's


def test_seconds_to_target_is_the_first_val_at_or_below_the_bar():
    val = [{"step": 0, "val_loss": 9.0, "train_time_ex_compile_ms": 0.0},
           {"step": 64, "val_loss": 1.2, "train_time_ex_compile_ms": 50_000.0},
           {"step": 96, "val_loss": 1.098, "train_time_ex_compile_ms": 75_250.4},
           {"step": 128, "val_loss": 1.05, "train_time_ex_compile_ms": 100_000.0}]
    assert bench_run.seconds_to_target(val, 1.098) == 75.25
    assert bench_run.seconds_to_target(val, 1.1) == 75.25 and bench_run.seconds_to_target(val, 1.06) == 100.0
    assert bench_run.seconds_to_target(val, 1.0) is None and bench_run.seconds_to_target([], 1.098) is None
    assert bench_run.target_fields({"protocol": "bench100m", "val": val}) == {"target_val": 1.098,
                                                                             "train_s_to_target": 75.25}
    assert bench_run.target_fields({"protocol": "custom", "val": val}) == {"target_val": None,
                                                                          "train_s_to_target": None}


def test_runner_gives_text_steps_a_text_file_decoded_from_the_shards(corpus, tmp_path):
    """Steps 01-02 read a text file: whole train documents, decoded from the corpus's shards, made once."""
    script = next(s for s in SCRIPTS if script_number(s) == 1)
    done = run_bench("--script", script, "--steps", "2", "--corpus", str(corpus), "--out", str(tmp_path),
                     "--name", "text", "--results", "", "--no-torchrun", "--", *TINY)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(tmp_path / "text.summary.json") as f:
        s = json.load(f)
    tokens = 2 * 128 + 1
    text_path = corpus / "text" / f"train_{tokens + tokens // 100}.txt"
    assert s["config"]["data"] == str(text_path) and s["status"] == "ok"
    encoding = bench_run.gpt2_tokenizer.encoding()
    train = np.concatenate([np.load(path) for path in sorted((corpus / "npy").glob("*_train_*.npy"))])
    first_documents = np.split(train, np.flatnonzero(train == 50256))[1:]
    text = text_path.read_text()
    assert text.startswith(encoding.decode(first_documents[0][1:].tolist()) + "\n\n")
    assert len(encoding.encode_ordinary(text)) >= tokens - 10  # about the tokens asked for, whole documents
    assert not list((tmp_path).glob("*.jsonl"))  # --results "": no results file


def test_plot_two_summaries(tiny_run, tmp_path):
    out, s, _ = tiny_run
    other = dict(s, name="other", val=[{"step": 3, "tokens": 384, "train_time_ms": 50.0, "val_loss": 10.5},
                                       {"step": 6, "tokens": 768, "train_time_ms": 90.0, "val_loss": 10.2}])
    with open(tmp_path / "other.json", "w") as f:
        json.dump([other], f)
    png = tmp_path / "plot.png"
    load_bench("plot").main(["--out", str(png), str(out / "tiny.summary.json"), str(tmp_path / "other.json")])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_takes_only_the_timed_compile_out_of_train_time():
    # Step 25 on: 120 s of untimed kernel warm-up are in compile_warmup_s, but not in the logged train_time,
    # which holds only 2 s of compile in its first steps: the plot's clock subtracts those 2 s, not 122 s.
    summary = {"name": "warmed", "compile_warmup_s": 122.0, "train_time_s": 12.0, "train_time_ex_compile_s": 10.0,
               "val": [{"step": 6, "tokens": 768, "train_time_ms": 7000.0, "val_loss": 10.2}]}
    _, _, points = load_bench("plot").curves(summary)
    assert points == [(5.0, 768, 10.2)]
    older = {k: v for k, v in summary.items() if not k.startswith("train_time")}  # no train_time_ex_compile_s
    assert load_bench("plot").curves(older)[2] == [(0.0, 768, 10.2)]


@pytest.mark.skipif(not [s for s in SCRIPTS if script_number(s) >= 4], reason="needs a lineage step with validation")
def test_runner_records_val_curve(corpus, tmp_path):
    script = next(s for s in SCRIPTS if script_number(s) >= 4)
    done = run_bench("--script", script, "--steps", "6", "--corpus", str(corpus), "--out", str(tmp_path), "--name",
                     "val", "--results", "", "--no-torchrun", "--", *TINY, "--val_every=3", "--val_tokens=256")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(tmp_path / "val.summary.json") as f:
        s = json.load(f)
    assert {3, 6} <= {v["step"] for v in s["val"]}  # every 3 steps (some steps also score the untrained model)
    assert s["val"][-1]["tokens"] == 768 and s["final_val_loss"] == s["val"][-1]["val_loss"] > 0
    assert [p["tokens"] for p in s["result"]["val_at_quarters"]] == [384, 384, 768, 768]


# A stand-in for a lineage script: the interface the runner relies on (a Config dataclass, --key=value
# arguments, the log lines), no model. It logs what it was asked, so the tests see the runner's arguments.
STUB = '''import dataclasses, os, sys, time
@dataclasses.dataclass
class Config:
    total_batch_size: int = TOTAL_BATCH_SIZE
    val_every: int = 250
    val_tokens: int = 1024
def main(argv):
    values = dict(a[2:].split("=", 1) for a in argv)
    run_dir = os.path.join(values["out_dir"], values["run_name"])
    os.makedirs(run_dir)
    print("inductor_cache:" + os.environ.get("TORCHINDUCTOR_CACHE_DIR", "unset"), flush=True)
    print("args:" + " ".join(argv), flush=True)
    print("visible:" + os.environ.get("CUDA_VISIBLE_DEVICES", "unset"), flush=True)
    steps, tokens, every = int(values["max_steps"]), TOTAL_BATCH_SIZE, int(values.get("val_every", 0))
    with open(os.path.join(run_dir, "log.txt"), "w") as log:
        def emit(line):
            print(line, flush=True)
            log.write(line + "\\n")
            log.flush()
        emit("device:cpu gpu:none torch:0 world_size:1")
        for step in range(0, steps + 1):
            if every and (step % every == 0 or step == steps):
                emit(f"step:{step}/{steps} val_loss:{10 - step} tokens:{tokens * step} train_time:{step}00ms")
            if step == steps:
                break
            emit(f"step:{step + 1}/{steps} loss:5.0 dt:100.0ms tokens:{tokens * (step + 1)} train_time:{step + 1}00ms")
            time.sleep(SLEEP)
        emit(f"done steps:{steps} tokens:{tokens * steps} train_time:{steps}00ms peak_mem:0MiB")
if __name__ == "__main__":
    main(sys.argv[1:])
'''


FAILING_STUB = '''import dataclasses, sys
@dataclasses.dataclass
class Config:
    total_batch_size: int = 128
if __name__ == "__main__":
    raise SystemExit("stub: fails while running")
'''


def write_failing_stub(folder):
    """A script whose config passes a session's preflight and whose run fails."""
    script = folder / "98-fails.py"
    script.write_text(FAILING_STUB)
    return script


def write_stub(folder, total_batch_size=100, sleep=0.0):
    script = folder / "99-stub.py"
    script.write_text(STUB.replace("TOTAL_BATCH_SIZE", str(total_batch_size)).replace("SLEEP", str(sleep)))
    return script


def test_bench100m_protocol(tmp_path):
    """--bench100m: 100,663,296 tokens, validation on the first 10,485,760 val tokens every quarter of the run, and
    the val loss at each quarter in the results line; an override of --val_every is kept, one of --val_tokens
    refused."""
    script = write_stub(tmp_path, total_batch_size=25_165_824)  # 4 steps make the budget
    results = tmp_path / "results.jsonl"
    common = ["--script", str(script), "--bench100m", "--out", str(tmp_path), "--results", str(results),
              "--no-torchrun", "--baseline", "q"]
    done = run_bench(*common, "--name", "q", "--", "--data=unused")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "args:--data=unused --val_tokens=10485760 --val_every=1 --max_steps=4 " in done.stdout
    line = read_jsonl(results)[-1]
    assert (line["protocol"], line["budget_tokens"], line["tokens_trained"], line["baseline"]) == \
        ("bench100m", 100_663_296, 100_663_296, "q")
    assert line["val_at_quarters"] == [{"target": 25_165_824 * q, "tokens": 25_165_824 * q, "val_loss": 10.0 - q}
                                       for q in (1, 2, 3, 4)]
    assert line["final_val_loss"] == 6.0
    assert (line["target_val"], line["train_s_to_target"]) == (1.098, None)  # the stub's losses end at 6

    done = run_bench(*common, "--name", "every3", "--", "--data=unused", "--val_every=3")
    assert done.returncode == 0 and "--val_every=1" not in done.stdout
    assert [(p["tokens"], p["val_loss"]) for p in read_jsonl(results)[-1]["val_at_quarters"]] == \
        [(75_497_472, 7.0), (75_497_472, 7.0), (75_497_472, 7.0), (100_663_296, 6.0)]  # at or nearest after
    done = run_bench(*common, "--name", "bad", "--", "--data=unused", "--val_tokens=1024")
    assert done.returncode != 0 and "drop --val_tokens" in done.stderr


def test_bench100m_trains_its_whole_budget(tmp_path):
    """A script that stops at a val target (step 19 on: 3.28 by default) gets --val_target=0 under --bench100m unless
    the overrides set one; a run that still ends before its budget is recorded as short, not ok."""
    script = tmp_path / "99-stub.py"
    script.write_text(STUB.replace("TOTAL_BATCH_SIZE", "25_165_824").replace("SLEEP", "0.0")
                      .replace("    val_tokens: int = 1024\n", "    val_tokens: int = 1024\n    val_target: float = 3.28\n"))
    results = tmp_path / "results.jsonl"
    common = ["--script", str(script), "--bench100m", "--out", str(tmp_path), "--results", str(results),
              "--no-torchrun"]
    done = run_bench(*common, "--name", "whole", "--", "--data=unused")
    assert done.returncode == 0 and "--val_every=1 --val_target=0 --max_steps=4 " in done.stdout
    done = run_bench(*common, "--name", "kept", "--", "--data=unused", "--val_target=7.5")
    assert "--val_target=0" not in done.stdout and "--val_target=7.5" in done.stdout
    script.write_text(script.read_text().replace('steps, tokens, every = int(values["max_steps"])',
                                                 'steps, tokens, every = int(values["max_steps"]) // 2'))
    done = run_bench(*common, "--name", "half", "--", "--data=unused")
    assert done.returncode != 0
    assert read_jsonl(results)[-1]["status"] == "short (stopped at 50,331,648 of 100,663,296 tokens)"


def test_runner_timeout_keeps_partial_numbers(tmp_path):
    """A run stopped by --timeout is recorded as such, with what it trained before the stop."""
    script = write_stub(tmp_path, sleep=0.1)
    t0 = time.time()
    done = run_bench("--script", str(script), "--steps", "1000", "--out", str(tmp_path), "--name", "stub",
                     "--results", str(tmp_path / "results.jsonl"), "--no-torchrun", "--timeout", "2", "--",
                     "--data=unused", "--device=cpu", "--val_every=0", timeout=60)
    assert time.time() - t0 < 30 and done.returncode == 1
    with open(tmp_path / "stub.summary.json") as f:
        s = json.load(f)
    assert s["status"] == "timeout" and 0 < s["steps"] < 1000 and s["tokens_trained"] == 100 * s["steps"]
    assert read_jsonl(tmp_path / "results.jsonl")[0]["status"] == "timeout"
    # each run compiles cold: empty torch.compile caches of its own
    assert f"inductor_cache:{tmp_path / 'compile_cache' / 'stub'}" in (tmp_path / "stub.stdout.log").read_text()
    assert s["compile_cache"] == "fresh"


def test_runner_passes_a_verified_tokenizer_cache(tmp_path, monkeypatch):
    """The child gets the --tiktoken-cache folder, else TIKTOKEN_CACHE_DIR when it holds the GPT-2 files (an image
    may set it to a folder without them), else nothing; no folder is hard-coded."""
    shared = os.path.join(SHARED, "tiktoken_cache")
    if not bench_run.gpt2_tokenizer.cache_files(shared):
        pytest.skip("no ../shared/tiktoken_cache")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    assert bench_run.tiktoken_env() == {}
    assert bench_run.tiktoken_env(shared) == {"TIKTOKEN_CACHE_DIR": shared}
    with pytest.raises(SystemExit, match="--tiktoken-cache"):
        bench_run.tiktoken_env(str(tmp_path))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", shared)
    assert bench_run.tiktoken_env() == {"TIKTOKEN_CACHE_DIR": shared}


# ---------------------------------------------------------------------------------------------------------
# A whole session


def test_short_output_keeps_a_run_small():
    session = load_bench("session")
    steps = [f"step:{i}/100 loss:5.0 dt:1ms tokens:{i} train_time:{i}ms\n" for i in range(1, 101)]
    text = "script:x.py\n" + "".join(steps) + "step:100/100 val_loss:4.0\ndone steps:100\n"
    kept = session.short_output(text).splitlines()
    assert [line.split()[0] for line in kept if " loss:" in line] == [f"step:{i}/100" for i in (1, *range(10, 101, 10))]
    assert kept[0] == "script:x.py" and kept[-2:] == ["step:100/100 val_loss:4.0", "done steps:100"]
    long = session.short_output("".join(f"line {i}\n" for i in range(10_000))).splitlines()
    assert len(long) == session.LOG_LINES_PER_RUN + 1 and long[0] == "line 0" and long[-1] == "line 9999"


def test_session_end_to_end(tree, tmp_path):
    if not os.path.isfile(CORPUS_SCRIPT):
        pytest.skip("no ../shared/bench/make_corpus.py")
    session = load_bench("session")
    assert session.parse_run_spec("name=a steps=50 nproc=2 torchrun=0 17-x.py --compile=1") == {
        "name": "a", "steps": 50, "nproc": 2, "torchrun": False, "script": "17-x.py", "overrides": ["--compile=1"]}
    out, corpus_dir, results = tmp_path / "out", tmp_path / "corpus", tmp_path / "results.jsonl"
    script_name = os.path.splitext(LINEAGE)[0]
    plan = json.dumps([{"script": str(write_failing_stub(tmp_path)), "name": "broken"},
                       {"script": LINEAGE, "overrides": TINY, "budget_tokens": "384"}])
    command = [sys.executable, os.path.join(BENCH, "session.py"), "--corpus", str(corpus_dir), "--corpus-args",
               f"--root {tree} --val-tokens 600", "--out", str(out), "--work", str(tmp_path / "work"), "--results",
               str(results), "--baseline", script_name, "--plan", plan]  # the default --corpus-script
    t0 = time.time()
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert time.time() - t0 < 60
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]  # one run failed: recorded, not fatal
    assert sorted(os.listdir(out)) == ["corpus_info.json", "logs.txt", "plot.png", "results.jsonl", "results.md",
                                       "summaries.json"]
    summaries = json.loads((out / "summaries.json").read_text())
    assert [s["name"] for s in summaries] == ["broken", script_name]
    assert summaries[0]["status"].startswith("failed") and "fails while running" in summaries[0]["error_tail"]
    good = summaries[1]
    assert good["status"] == "ok" and good["torchrun"] and good["tokens_trained"] == 384
    lines = read_jsonl(out / "results.jsonl")
    assert lines == read_jsonl(results) == [s["result"] for s in summaries]  # one line a run, in both files
    assert [(line["name"], line["status"][:6], line["baseline"]) for line in lines] == \
        [("broken", "failed", script_name), (script_name, "ok", script_name)]
    assert all(list(line) == RESULT_FIELDS for line in lines)
    table = (out / "results.md").read_text()
    assert bench_run.ROW_HEADER in table and good["row"] in table and "| broken |" in table
    logs = (out / "logs.txt").read_text()
    assert "==== corpus" in logs and "done steps:3" in logs and f"run 2/2: {script_name}" in logs
    info = json.loads((corpus_dir / "info.json").read_text())
    assert json.loads((out / "corpus_info.json").read_text()) == info and info["val_tokens"] > 600
    assert good["result"]["corpus_sha256"] == info["sha256"]
    assert good["row"] in done.stdout  # the table is printed at the end


CORPUS_STUB = '''import json, os, sys
out = sys.argv[sys.argv.index("--out") + 1]
os.makedirs(out)
print("stub corpus script:", " ".join(sys.argv[1:]), "TIKTOKEN_CACHE_DIR=" + os.environ.get("TIKTOKEN_CACHE_DIR", ""))
with open(os.path.join(out, "info.json"), "w") as f:
    json.dump({"sha256": "stub"}, f)
'''


def test_session_runs_the_corpus_script_it_is_given(tmp_path):
    """--corpus-script (on a GPU machine the shared script is carried in, e.g. .gpu/bench/make_corpus.py) with
    --corpus-args and the tokenizer cache; a missing script is a clear error."""
    stub = tmp_path / "carried" / "make_corpus.py"
    stub.parent.mkdir()
    stub.write_text(CORPUS_STUB)
    cache = os.path.join(SHARED, "tiktoken_cache")
    if not os.path.isdir(cache):
        pytest.skip("needs ../shared/tiktoken_cache beside the checkout")
    base = [sys.executable, os.path.join(BENCH, "session.py"), "--out", str(tmp_path / "out"), "--work",
            str(tmp_path / "work"), "--results", "", "--run", str(write_failing_stub(tmp_path))]
    done = subprocess.run(base + ["--corpus", str(tmp_path / "c1"), "--corpus-script", str(tmp_path / "nowhere.py")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "no corpus script at" in done.stderr and "--corpus-script" in done.stderr
    done = subprocess.run(base + ["--corpus", str(tmp_path / "c2"), "--corpus-script", str(stub), "--corpus-args",
                                  "--root /somewhere --val-tokens 600", "--tiktoken-cache", cache],
                          capture_output=True, text=True, timeout=60)
    logs = (tmp_path / "out" / "logs.txt").read_text()
    assert f"stub corpus script: --out {tmp_path / 'c2'} --root /somewhere --val-tokens 600 " \
           f"TIKTOKEN_CACHE_DIR={os.path.abspath(cache)}" in logs
    assert done.returncode == 1 and "| failed (rc=1) |" in (tmp_path / "out" / "results.md").read_text()


def test_session_refuses_a_bad_plan_before_the_corpus_or_any_run(tmp_path):
    """A missing script, overrides a lineage script rejects (the 2026-11-27 lease lost a GPU's slot to one: 11 blocks
    leave block 9 a value embedding) and an override the runner sets: all named at once, and nothing built or
    written, before the corpus script or any GPU runs."""
    stub_corpus = tmp_path / "make_corpus.py"
    stub_corpus.write_text(CORPUS_STUB)
    newest = load_script(SCRIPTS[-1])
    assert "n_layer" in {f.name for f in dataclasses.fields(newest.Config)}
    plan = ["name=missing no-such-script.py", f"name=refused {SCRIPTS[-1]} --n_layer=11 --attention_free_layers=3,7,9",
            f"name=reserved {SCRIPTS[-1]} --max_steps=5", f"name=fine {SCRIPTS[-1]}"]
    command = [sys.executable, os.path.join(BENCH, "session.py"), "--bench100m", "--corpus", str(tmp_path / "corpus"),
               "--corpus-script", str(stub_corpus), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
               "--results", str(tmp_path / "results.jsonl")]
    done = subprocess.run(command + [arg for run in plan for arg in ("--run", run)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "session: nothing run, nothing written; fix the plan" in done.stderr
    assert "run missing: --script no-such-script.py: no such file" in done.stderr
    assert "run refused: " in done.stderr and "--attention_free_layers='3,7,9'" in done.stderr
    assert "run reserved: --max_steps is set by the runner" in done.stderr and "run fine" not in done.stderr
    assert not any(os.path.exists(tmp_path / name) for name in ("corpus", "out", "work", "results.jsonl"))


def test_train_documents_go_on_across_shards(tmp_path):
    """A document cut by a shard boundary comes back whole."""
    (tmp_path / "npy").mkdir()
    stream = np.array([50256, 1, 2, 50256, 3, 4, 5, 6, 50256, 7, 50256, 8, 9], dtype=np.uint16)
    for index, (begin, end) in enumerate([(0, 5), (5, 9), (9, 13)], start=1):
        np.save(tmp_path / "npy" / f"x_train_{index:06d}.npy", stream[begin:end])
    np.save(tmp_path / "npy" / "x_val_000000.npy", np.array([50256, 99], dtype=np.uint16))
    assert [d.tolist() for d in bench_run.train_documents(str(tmp_path))] == [[1, 2], [3, 4, 5, 6], [7], [8, 9]]


def test_session_bench100m_runs_every_run_by_the_protocol(tmp_path):
    stub_corpus = tmp_path / "make_corpus.py"
    stub_corpus.write_text(CORPUS_STUB)
    script = write_stub(tmp_path, total_batch_size=25_165_824)
    base = [sys.executable, os.path.join(BENCH, "session.py"), "--bench100m", "--corpus", str(tmp_path / "corpus"),
            "--corpus-script", str(stub_corpus), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
            "--results", ""]
    done = subprocess.run(base + ["--run", f"name=a torchrun=0 {script} --data=unused"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (line,) = read_jsonl(tmp_path / "out" / "results.jsonl")
    assert (line["protocol"], line["budget_tokens"], line["baseline"]) == ("bench100m", 100_663_296, "a")
    assert [p["val_loss"] for p in line["val_at_quarters"]] == [9.0, 8.0, 7.0, 6.0]
    done = subprocess.run(base + ["--run", f"steps=2 {script}"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "drop budget= and steps=" in done.stderr


def test_session_runs_each_gpus_runs_in_turn_and_the_gpus_side_by_side(tmp_path):
    """gpu=I: each run sees GPU I alone; GPU 0's two runs go one after the other while GPU 1's runs beside them (the
    session takes about two runs' time, not three); the results keep the plan's order and name each run's GPU."""
    stub_corpus = tmp_path / "make_corpus.py"
    stub_corpus.write_text(CORPUS_STUB)
    script = write_stub(tmp_path, sleep=0.5)  # 4 steps: ~2 s a run
    command = [sys.executable, os.path.join(BENCH, "session.py"), "--corpus", str(tmp_path / "corpus"),
               "--corpus-script", str(stub_corpus), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
               "--results", str(tmp_path / "results.jsonl"), "--budget-tokens", "400"]
    plan = [f"name=a gpu=0 torchrun=0 {script} --data=unused", f"name=b gpu=1 torchrun=0 {script} --data=unused",
            f"name=c gpu=0 torchrun=0 {script} --data=unused"]
    done = subprocess.run(command + [arg for run in plan for arg in ("--run", run)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = read_jsonl(tmp_path / "out" / "results.jsonl")
    assert [(line["name"], line["gpu"], line["status"], line["baseline"]) for line in lines] == \
        [("a", 0, "ok", "a"), ("b", 1, "ok", "a"), ("c", 0, "ok", "a")]
    assert read_jsonl(tmp_path / "results.jsonl") == lines or \
        sorted(map(json.dumps, read_jsonl(tmp_path / "results.jsonl"))) == sorted(map(json.dumps, lines))
    logs = {name: (tmp_path / "work" / f"{name}.stdout.log").read_text() for name in "abc"}
    assert ["visible:0" in logs["a"], "visible:1" in logs["b"], "visible:0" in logs["c"]] == [True] * 3
    summaries = {s["name"]: s for s in json.loads((tmp_path / "out" / "summaries.json").read_text())}
    end = {name: os.path.getmtime(tmp_path / "work" / f"{name}.summary.json") for name in "abc"}
    start = {name: end[name] - summaries[name]["wall_s"] for name in "abc"}
    assert end["a"] <= start["c"] + 0.2  # GPU 0: a, then c
    assert start["b"] < end["a"] and start["a"] < end["b"]  # GPU 1's run beside GPU 0's first
    base = command + ["--run", f"gpu=0 {script}", "--run", f"{script}"]
    done = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "some runs name a gpu= and some do not" in done.stderr
    done = subprocess.run(command + ["--run", f"gpu=x {script}"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "gpu=x must be a GPU index" in done.stderr


def test_flops_count_only_what_multiplies_and_the_keys_a_query_sees():
    """Tables that are only looked up are not matmul FLOPs, and a sliding window bounds the attention term: step
    31's recipe at bench100m's mean window of 680 tokens is ~779 MFLOP/token, not the 1,517 of 6 N + 12 L C T."""
    config = {"n_layer": 8, "n_embd": 1024, "n_head": 16, "block_size": 8192, "vocab_size": 50304,
              "pos_emb": "rotary", "tie_embeddings": True}
    params = 118637568
    assert bench_run.flops_per_token(params, config) == 6 * params + 12 * 8 * 1024 * 8192
    assert bench_run.flops_per_token(params, config, 680) == 6 * params + 12 * 8 * 1024 * 680
    assert bench_run.flops_per_token(params, config, 20000) == bench_run.flops_per_token(params, config)  # <= T
    untied = dict(config, tie_embeddings=False)
    assert bench_run.flops_per_token(params + 50304 * 1024, untied, 680) == \
        bench_run.flops_per_token(params, config, 680)  # the input table of an untied head is looked up
    with_tables = dict(config, value_embeddings=2)
    assert bench_run.flops_per_token(params + 2 * 50304 * 1024, with_tables, 680) == \
        bench_run.flops_per_token(params, config, 680)
    absolute = dict(config, pos_emb="absolute")
    assert bench_run.flops_per_token(params + 8192 * 1024, absolute) == bench_run.flops_per_token(params, config)
    steps = [{"step": 1, "window": 128}, {"step": 2, "window": 256}, {"step": 3}]
    assert bench_run.mean_window(steps) == 192 and bench_run.mean_window([{"step": 1}]) is None
