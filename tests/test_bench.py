"""Tests of the GPU benchmark harness in bench/: the corpus builder, the runner, the plot and a whole session.
CPU only, offline, on a tiny tree of .py files written here and a 2-layer model; the runner and the session run
the real lineage script (03, which reads the corpus's .npy shards, once it exists; 01 with train.txt before)."""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, SCRIPTS, script_number

BENCH = os.path.join(REPO, "bench")
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--total_batch_size=128",
        "--device=cpu", "--warmup_steps=1"]
# The runner's target: step 03 exercises the shard-folder path; 01 (train.txt) until 03 exists.
LINEAGE = next((s for s in SCRIPTS if script_number(s) == 3), None) or next(s for s in SCRIPTS if script_number(s) == 1)
SUMMARY_FIELDS = ["name", "script", "overrides", "nproc", "torchrun", "budget_tokens", "max_steps", "status",
                  "returncode", "wall_s", "date", "command", "card", "torch", "device", "world_size", "model_params",
                  "tokens_per_step", "steps", "tokens_trained", "train_time_s", "train_time_ex_compile_s",
                  "compile_warmup_s", "steady_from_step", "steady_step_ms", "steady_tokens_per_s", "flops_per_token",
                  "matmul_tflops", "mfu", "peak_mem_mib", "final_train_loss", "val", "final_val_loss",
                  "hellaswag_acc", "train_curve", "config", "run_dir", "stdout_log", "row"]


def load_bench(name):
    spec = importlib.util.spec_from_file_location(f"test_bench_{name}", os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_corpus = load_bench("make_corpus")
bench_run = load_bench("run")


def gpt2():
    import tiktoken
    return tiktoken.get_encoding("gpt2")  # offline: conftest points TIKTOKEN_CACHE_DIR at ../shared


# ---------------------------------------------------------------------------------------------------------
# A tiny site-packages: six small packages, one with a long file, a duplicate, vendored code, an empty file


def module_source(package, index, functions):
    return "".join(f'def {package}_f{index}_{i}(x):\n    """{package.upper()}_MARKER {index}-{i}"""\n'
                   f'    return x * {i} + {index}\n\n' for i in range(functions))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """(root, {file text: package}) for the unique, non-vendored, non-empty files."""
    root = tmp_path_factory.mktemp("site-packages")
    texts = {}

    def write(relative, text, package=None):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        if package:
            texts[text] = package

    for package in ("alpha", "gamma", "delta", "epsilon", "zeta"):
        for index in range(2):
            write(f"{package}/mod{index}.py", module_source(package, index, 4), package)
    write("solo.py", module_source("solo", 0, 3), "solo")  # a top-level module is a package of its own
    write("beta/long.py", module_source("beta", 0, 600), "beta")  # ~20k tokens: longer than any window
    write("beta/short.py", module_source("beta", 1, 2), "beta")
    write("beta/copy_of_alpha.py", module_source("alpha", 0, 4))  # the same bytes as alpha/mod0.py
    write("gamma/_vendor/six.py", module_source("vendored", 0, 2))
    write("pip/__init__.py", module_source("pip", 0, 2))
    write("delta/__init__.py", "\n")  # whitespace only
    return root, texts


def build(root, out, seed=1337, workers=1, cli=False, **flags):
    argv = ["--roots", str(root), "--out", str(out), "--seed", str(seed), "--workers", str(workers),
            "--val-tokens", "600", "--shard-size", "5000", "--text-mb", "0.01"]
    for key, value in flags.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    if cli:
        subprocess.run([sys.executable, os.path.join(BENCH, "make_corpus.py"), *argv], check=True,
                       capture_output=True, text=True)
        with open(os.path.join(out, "info.json")) as f:
            return json.load(f)
    return make_corpus.main(argv)


@pytest.fixture(scope="module")
def corpus(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    info = build(tree[0], out, workers=2, cli=True)  # the command line, with a process pool
    return out, info


def split_documents(tokens):
    """A split's token stream -> its documents (each must start with EOT)."""
    assert tokens[0] == make_corpus.EOT
    starts = list(np.flatnonzero(tokens == make_corpus.EOT)) + [len(tokens)]
    return [tokens[a + 1:b] for a, b in zip(starts, starts[1:])]


def read_bin(path):
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(1024), dtype="<i4")
        tokens = np.frombuffer(f.read(), dtype="<u2")
    return header, tokens


# ---------------------------------------------------------------------------------------------------------
# The corpus builder


def test_corpus_counts_skip_vendored_and_duplicates(tree, corpus):
    root, texts = tree
    _, info = corpus
    assert info["files_seen"] == len(list(root.rglob("*.py")))
    assert info["skipped_vendored"] == 2  # gamma/_vendor/six.py and pip/
    assert info["duplicates"] == 1  # beta/copy_of_alpha.py
    assert info["skipped_empty"] == 1
    assert info["documents"]["val"] + info["documents"]["train"] == len(texts)
    assert info["packages"]["val"] + info["packages"]["train"] == len(set(texts.values()))
    assert info["tokens"]["val"] >= 600  # --val-tokens: whole packages until val holds at least that
    assert info["seed"] == 1337


def test_corpus_splits_by_package_with_eot_per_document(tree, corpus):
    _, texts = tree
    out, info = corpus
    enc = gpt2()
    val = np.load(out / "bench_val_000000.npy")
    train_files = sorted(p.name for p in out.glob("bench_train_*.npy"))
    assert train_files == [f"bench_train_{i:06d}.npy" for i in range(1, len(train_files) + 1)]
    assert len(train_files) > 1  # --shard-size 5000: the ~20k-token train split spans several shards
    assert all(len(np.load(out / name)) <= 5000 for name in train_files)
    train = np.concatenate([np.load(out / name) for name in train_files])
    assert (len(val), len(train)) == (info["tokens"]["val"], info["tokens"]["train"])
    val_docs = [enc.decode(d.tolist()) for d in split_documents(val)]
    train_docs = [enc.decode(d.tolist()) for d in split_documents(train)]
    # one EOT before each document, and every document is one whole source file
    assert (int((val == make_corpus.EOT).sum()), int((train == make_corpus.EOT).sum())) == \
        (info["documents"]["val"], info["documents"]["train"])
    assert sorted(val_docs + train_docs) == sorted(texts)
    val_packages = set(info["val_packages"])
    assert {texts[d] for d in val_docs} == val_packages
    assert not {texts[d] for d in train_docs} & val_packages
    train_text = "".join(train_docs)
    for package in val_packages:  # none of the val packages' code is in train
        assert f"{package.upper()}_MARKER" not in train_text


def test_corpus_npy_and_bin_agree_and_sha256_matches(corpus):
    out, info = corpus
    stream = []
    for shard in info["shards"]:
        npy = np.load(out / shard["file"])
        assert npy.dtype == np.uint16
        header, tokens = read_bin(out / shard["file"].replace(".npy", ".bin"))
        assert list(header[:3]) == [20240520, 1, len(npy)] and not header[3:].any()
        assert np.array_equal(npy, tokens) and len(npy) == shard["tokens"]
        stream.append(npy)
    assert info["shards"][0]["file"] == "bench_val_000000.npy"  # val first in the stream
    assert hashlib.sha256(np.concatenate(stream).astype("<u2").tobytes()).hexdigest() == info["sha256"]


def test_corpus_text_file_holds_whole_train_documents(corpus):
    out, info = corpus
    enc = gpt2()
    train = np.concatenate([np.load(out / shard["file"]) for shard in info["shards"][1:]])
    train_docs = [enc.decode(d.tolist()) for d in split_documents(train)]
    text = (out / "train.txt").read_text(encoding="utf-8")
    count = info["text_file"]["documents"]
    # the first train documents of the stream, whole, each followed by a blank line, within --text-mb 0.01
    assert text == "".join(d + "\n\n" for d in train_docs[:count])
    assert 0 < count < len(train_docs)
    assert info["text_file"]["tokens_approx"] == sum(len(d) + 1 for d in split_documents(train)[:count])
    assert len(text.encode()) <= 0.01 * 2**20 < len((text + train_docs[count] + "\n\n").encode())


def test_corpus_is_deterministic_and_independent_of_workers(tree, corpus, tmp_path):
    _, info = corpus
    again = build(tree[0], tmp_path / "again", workers=1)  # in-process, no pool: same bytes
    assert again["sha256"] == info["sha256"] and again["val_packages"] == info["val_packages"]
    other = build(tree[0], tmp_path / "other", seed=7)
    assert other["sha256"] != info["sha256"]
    # an existing corpus is kept, not rebuilt
    assert build(tree[0], tmp_path / "again", seed=7)["sha256"] == info["sha256"]


def test_corpus_without_tokenizer_fails_clearly(tree, tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(make_corpus, "REPO", str(tmp_path / "no-repo" / "repo"))
    monkeypatch.setattr(make_corpus.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match="GPT-2 BPE"):
        build(tree[0], tmp_path / "out")


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


def test_parse_log_reads_key_value_lines():
    run = bench_run.parse_log(LOG.splitlines())
    assert run["header"]["gpu"] == "NVIDIA H100 80GB HBM3" and run["header"]["device"] == "cuda:0"
    assert [s["step"] for s in run["steps"]] == list(range(1, 11))  # the source-code line is not a step
    assert [v["val_loss"] for v in run["val"]] == [7.4, 6.5]
    assert run["hellaswag"][0]["acc"] == 0.2512
    assert run["done"] == {"steps": 10, "tokens": 5242880, "train_time_ms": 40000.0, "peak_mem_mib": 1234.0}


def test_summarize_timing_and_mfu():
    run = bench_run.parse_log(LOG.splitlines())
    config = {"n_layer": 12, "n_embd": 768, "block_size": 1024, "total_batch_size": 524288}
    s = bench_run.summarize(run, config, {"card": "ignored", "torch": "x", "matmul_tflops": 800.0}, nproc=1)
    assert s["card"] == "NVIDIA H100 80GB HBM3" and s["torch"] == "2.11.0+cu130"
    # steady: steps after the first max(5, 10%) = steps 6..10, median dt 1000 ms
    assert (s["steady_from_step"], s["steady_step_ms"], s["steady_tokens_per_s"]) == (6, 1000.0, 524288.0)
    assert s["compile_warmup_s"] == 30.0  # (30000 + 2000 + 1000) - 3 * 1000 ms
    flops = 6 * 124475904 + 12 * 12 * 768 * 1024
    assert s["flops_per_token"] == flops
    assert s["mfu"] == round(flops * 524288 / 800e12, 4)
    assert (s["tokens_trained"], s["peak_mem_mib"], s["train_time_s"], s["train_time_ex_compile_s"]) == \
        (5242880, 1234.0, 40.0, 10.0)
    assert s["final_val_loss"] == 6.5 and s["final_train_loss"] == 6.6 and s["hellaswag_acc"] == 0.2512
    assert [v["train_time_ex_compile_ms"] for v in s["val"]] == [5000.0, 10000.0]
    on_cpu = bench_run.summarize(bench_run.parse_log(LOG.replace("device:cuda:0", "device:cpu").splitlines()),
                                 config, {"card": "x", "torch": "x", "matmul_tflops": 800.0}, nproc=1)
    assert on_cpu["card"] == "cpu" and on_cpu["mfu"] is None and on_cpu["matmul_tflops"] is None


def test_parse_count():
    assert [bench_run.parse_count(t) for t in ("50M", "5e7", "26_214_400", "1.5B", "500k")] == \
        [50_000_000, 50_000_000, 26_214_400, 1_500_000_000, 500_000]


def test_runner_rejects_overrides_it_sets(tmp_path):
    args, overrides = bench_run.parse_args(["--script", LINEAGE, "--budget-tokens", "1M", "--out", str(tmp_path),
                                            "--", "--max_steps=3"])
    with pytest.raises(SystemExit, match="--max_steps is set by the runner"):
        bench_run.benchmark(args, overrides)


# ---------------------------------------------------------------------------------------------------------
# The runner on the real lineage script, then the plot


@pytest.fixture(scope="module")
def tiny_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    command = [sys.executable, os.path.join(BENCH, "run.py"), "--script", LINEAGE, "--budget-tokens", "700",
               "--corpus", str(corpus[0]), "--out", str(out), "--name", "tiny", "--no-torchrun", "--", *TINY]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out / "tiny.summary.json") as f:
        return out, json.load(f), done.stdout


def test_runner_summary_of_a_real_run(corpus, tiny_run):
    out, s, stdout = tiny_run
    assert [k for k in SUMMARY_FIELDS if k not in s] == []
    assert s["status"] == "ok" and s["script"] == LINEAGE and s["overrides"] == TINY
    assert (s["max_steps"], s["steps"], s["tokens_trained"]) == (6, 6, 768)  # ceil(700 / 128) whole steps
    expected_data = str(corpus[0] / "train.txt") if script_number(LINEAGE) < 3 else str(corpus[0])
    assert s["config"]["data"] == expected_data
    assert s["card"] == "cpu" and s["matmul_tflops"] is None and s["mfu"] is None and s["peak_mem_mib"] == 0
    assert s["steady_tokens_per_s"] > 0 and s["compile_warmup_s"] is not None and s["flops_per_token"] > 0
    assert s["model_params"] > 0 and s["final_train_loss"] > 0 and s["wall_s"] > 0
    assert s["final_val_loss"] is None and s["val"] == []  # steps before 04 have no validation
    assert len(s["train_curve"]) == 6
    row = (out / "tiny.row.md").read_text().strip()
    assert row == s["row"] and row.startswith("| tiny | cpu |") and "| ok |" in row
    assert row.count("|") == bench_run.ROW_HEADER.splitlines()[0].count("|")
    assert os.path.exists(out / "runs" / "tiny" / "log.txt") and os.path.exists(out / "tiny.stdout.log")
    assert row in stdout


def test_plot_two_summaries(tiny_run, tmp_path):
    out, s, _ = tiny_run
    other = dict(s, name="other", val=[{"step": 3, "tokens": 384, "train_time_ms": 50.0, "val_loss": 10.5},
                                       {"step": 6, "tokens": 768, "train_time_ms": 90.0, "val_loss": 10.2}])
    with open(tmp_path / "other.json", "w") as f:
        json.dump([other], f)
    png = tmp_path / "plot.png"
    load_bench("plot").main(["--out", str(png), str(out / "tiny.summary.json"), str(tmp_path / "other.json")])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.skipif(not [s for s in SCRIPTS if script_number(s) >= 4], reason="needs a lineage step with validation")
def test_runner_records_val_curve(corpus, tmp_path):
    script = next(s for s in SCRIPTS if script_number(s) >= 4)
    command = [sys.executable, os.path.join(BENCH, "run.py"), "--script", script, "--steps", "6", "--corpus",
               str(corpus[0]), "--out", str(tmp_path), "--name", "val", "--no-torchrun", "--", *TINY,
               "--val_every=3", "--val_tokens=256"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(tmp_path / "val.summary.json") as f:
        s = json.load(f)
    assert {3, 6} <= {v["step"] for v in s["val"]}  # every 3 steps (some steps also score the untrained model)
    assert s["val"][-1]["tokens"] == 768 and s["final_val_loss"] == s["val"][-1]["val_loss"] > 0


STUB = '''import dataclasses, os, sys, time
@dataclasses.dataclass
class Config:
    total_batch_size: int = 100
def main(argv):
    values = dict(a[2:].split("=", 1) for a in argv)
    run_dir = os.path.join(values["out_dir"], values["run_name"])
    os.makedirs(run_dir)
    print("inductor_cache:" + os.environ.get("TORCHINDUCTOR_CACHE_DIR", "unset"), flush=True)
    with open(os.path.join(run_dir, "log.txt"), "w") as log:
        for step in range(1, int(values["max_steps"]) + 1):
            line = f"step:{step}/{values['max_steps']} loss:5.0 dt:100.0ms tokens:{100 * step} train_time:{step}00ms"
            print(line, flush=True)
            log.write(line + "\\n")
            log.flush()
            time.sleep(0.1)
if __name__ == "__main__":
    main(sys.argv[1:])
'''


def test_runner_timeout_keeps_partial_numbers(tmp_path):
    """A run stopped by --timeout is recorded as such, with what it trained before the stop."""
    script = tmp_path / "99-stub.py"
    script.write_text(STUB)
    command = [sys.executable, os.path.join(BENCH, "run.py"), "--script", str(script), "--steps", "1000",
               "--out", str(tmp_path), "--name", "stub", "--no-torchrun", "--timeout", "2",
               "--", "--data=unused", "--device=cpu"]
    t0 = time.time()
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert time.time() - t0 < 30 and done.returncode == 1
    with open(tmp_path / "stub.summary.json") as f:
        s = json.load(f)
    assert s["status"] == "timeout" and 0 < s["steps"] < 1000 and s["tokens_trained"] == 100 * s["steps"]
    # each run compiles cold: empty torch.compile caches of its own
    assert f"inductor_cache:{tmp_path / 'compile_cache' / 'stub'}" in (tmp_path / "stub.stdout.log").read_text()
    assert s["compile_cache"] == "fresh"


def test_runner_passes_a_verified_tokenizer_cache(tmp_path, monkeypatch):
    """An image may set TIKTOKEN_CACHE_DIR to a folder without the GPT-2 files: the child gets one that has them."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    folder = bench_run.tiktoken_env()["TIKTOKEN_CACHE_DIR"]
    assert folder != str(tmp_path) and make_corpus.is_tiktoken_cache(folder)


# ---------------------------------------------------------------------------------------------------------
# A whole session


def test_session_end_to_end(tree, tmp_path):
    session = load_bench("session")
    assert session.parse_run_spec("name=a steps=50 nproc=2 torchrun=0 17-x.py --compile=1") == {
        "name": "a", "steps": 50, "nproc": 2, "torchrun": False, "script": "17-x.py", "overrides": ["--compile=1"]}
    out, corpus_dir = tmp_path / "out", tmp_path / "corpus"
    plan = json.dumps([{"script": "no-such-script.py", "name": "broken"},
                       {"script": LINEAGE, "overrides": TINY, "budget_tokens": "384"}])
    command = [sys.executable, os.path.join(BENCH, "session.py"), "--corpus", str(corpus_dir), "--roots", str(tree[0]),
               "--val-tokens", "600", "--text-mb", "1", "--workers", "2", "--out", str(out), "--work",
               str(tmp_path / "work"), "--plan", plan]
    t0 = time.time()
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert time.time() - t0 < 30
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]  # one run failed: recorded, not fatal
    assert sorted(os.listdir(out)) == ["corpus_info.json", "logs.txt", "plot.png", "results.md", "summaries.json"]
    summaries = json.loads((out / "summaries.json").read_text())
    assert [s["name"] for s in summaries] == ["broken", script_name := os.path.splitext(LINEAGE)[0]]
    assert summaries[0]["status"].startswith("failed") and "no-such-script.py" in summaries[0]["error_tail"]
    good = summaries[1]
    assert good["status"] == "ok" and good["torchrun"] and good["tokens_trained"] == 384
    results = (out / "results.md").read_text()
    assert bench_run.ROW_HEADER in results and good["row"] in results and "| broken |" in results
    logs = (out / "logs.txt").read_text()
    assert "==== corpus" in logs and "done steps:3" in logs and f"run 2/2: {script_name}" in logs
    assert json.loads((out / "corpus_info.json").read_text())["sha256"] == \
        json.loads((corpus_dir / "info.json").read_text())["sha256"]
    assert good["row"] in done.stdout  # the table is printed at the end
