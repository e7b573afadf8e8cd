#!/usr/bin/env python3
"""A whole GPU benchmark session in one call: build the corpus, run a plan of benchmarks, collect the results.

    python bench/session.py --bench100m --corpus-script .gpu/bench/make_corpus.py \\
        --tiktoken-cache .gpu/tiktoken_cache --time-limit 580 \\
        --run "name=baseline 17-add-lm-head-logit-softcap.py --compile=1 --batch_size=64" \\
        --run "name=muon 17-add-lm-head-logit-softcap.py --compile=1 --batch_size=64 --optimizer=muon"

A run is `[name=N] [budget=TOKENS | steps=N] [nproc=K] [torchrun=0|1] [gpu=I] SCRIPT [--override=value ...]`:
the bench options first (defaults: the script's name, --budget-tokens, --nproc, torchrun on), then the script, then
its overrides. --plan takes the same runs from a file (one run a line, # comments) or JSON (a list of run strings or of
objects {"script", "overrides", "name", "budget_tokens", "steps", "nproc", "torchrun"}), inline or in a file.
With --bench100m every run follows the project's benchmark (bench/run.py --bench100m), so runs give no budget.

The corpus is built by the project's own corpus script, ../shared/bench/make_corpus.py (--corpus-script: on the
GPU machine it is carried in, e.g. as .gpu/bench/make_corpus.py), unless --corpus already holds its info.json.
Before anything else every run's script is found and its overrides checked by the script itself (on the CPU: a bad
plan stops the session before the corpus or a GPU is touched, naming each bad run). The runs go one after the other;
a run that fails while running is recorded and the next one starts. On a host of several GPUs,
gpu=I gives a run GPU I alone (CUDA_VISIBLE_DEVICES=I): the runs of one GPU go in turn, in plan order, and the GPUs
work side by side, so a lease of four GPUs measures four runs at a time. Then every run names its GPU, and its
results line says which: tokens/s compare exactly only between runs of one GPU (the host's CPUs, power and clocks
are shared), losses across all of them. Each run's results line names
the session's baseline (--baseline, default the first run) and is appended to --results (default
bench/results.jsonl). After every run the output folder (--out, default $OUT if set, else bench_out) is
rewritten, so a session cut off by a time limit still leaves its results; it stays flat and small:
  results.jsonl     this session's results lines (the ones appended to --results)
  results.md        the markdown table (header + one row a run)
  summaries.json    every run's summary (bench/run.py's fields; bench/README.md explains them)
  logs.txt          the corpus build, then each run's output without most train-step lines
  plot.png          val loss (train loss where a script has no validation) against time and against tokens
  corpus_info.json  the corpus's info.json (counts, sha256)
Run directories, checkpoints and each run's full output stay in --work (default: a fresh temporary folder).
"""

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CORPUS_SCRIPT = os.path.join(os.path.dirname(REPO), "shared", "bench", "make_corpus.py")  # beside the checkout
TIME_RESERVE_S = 25  # kept back from --time-limit to stop a run cleanly and write the results
LOG_LINES_PER_RUN = 400  # logs.txt keeps a run's first and last lines up to this many


def load_sibling(name):
    """bench/<name>.py as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_run = load_sibling("run")


# ---------------------------------------------------------------------------------------------------------
# The plan


def parse_run_spec(spec):
    """'name=x steps=50 17-....py --compile=1' -> {"script", "overrides", "name", ...}."""
    words = shlex.split(spec) if isinstance(spec, str) else list(spec)
    run = {}
    while words and "=" in words[0] and not words[0].startswith("-"):
        key, value = words.pop(0).split("=", 1)
        if key not in ("name", "budget", "steps", "nproc", "torchrun", "gpu"):
            raise SystemExit(f"run {spec!r}: unknown bench option {key!r} (name, budget, steps, nproc, torchrun, gpu)")
        run[{"budget": "budget_tokens"}.get(key, key)] = value
    if not words:
        raise SystemExit(f"run {spec!r} names no script")
    run["script"], run["overrides"] = words[0], words[1:]
    return normalize_run(run)


def normalize_run(run):
    run = dict(run)
    if "script" not in run:
        raise SystemExit(f"plan entry {run} has no script")
    if isinstance(run.get("overrides"), str):
        run["overrides"] = shlex.split(run["overrides"])
    run.setdefault("overrides", [])
    for key in ("budget_tokens", "steps"):
        if run.get(key) is not None:
            run[key] = bench_run.parse_count(run[key])
    if run.get("budget_tokens") and run.get("steps"):
        raise SystemExit(f"plan entry {run}: give budget or steps, not both")
    if run.get("nproc") is not None:
        run["nproc"] = int(run["nproc"])
    if run.get("gpu") is not None:
        if not str(run["gpu"]).isdigit():
            raise SystemExit(f"plan entry {run}: gpu={run['gpu']} must be a GPU index (0, 1, ...)")
        run["gpu"] = int(run["gpu"])
    if run.get("torchrun") is not None and not isinstance(run["torchrun"], bool):
        run["torchrun"] = str(run["torchrun"]).lower() in ("1", "true", "yes", "on")
    return run


def load_plan(plan):
    """Runs from --plan: a file or inline text; JSON (list of strings or objects) or one run a line."""
    text = plan
    if os.path.isfile(plan):
        with open(plan, encoding="utf-8") as f:
            text = f.read()
    if text.lstrip().startswith(("[", "{")):
        entries = json.loads(text)
        entries = entries if isinstance(entries, list) else [entries]
        return [parse_run_spec(e) if isinstance(e, str) else normalize_run(e) for e in entries]
    lines = [line.strip() for line in text.splitlines()]
    return [parse_run_spec(line) for line in lines if line and not line.startswith("#")]


def unique_names(runs):
    taken = set()
    for run in runs:
        base = run.get("name") or os.path.splitext(os.path.basename(run["script"]))[0]
        name, suffix = base, 1
        while name in taken:
            suffix += 1
            name = f"{base}-{suffix}"
        taken.add(name)
        run["name"] = name
    return runs


# ---------------------------------------------------------------------------------------------------------
# Steps of the session


def tee(command, log, prefix="", env=None):
    """Run command, printing its output and appending it to the open log file; returns (rc, output text)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                               env={**(env or os.environ), "PYTHONUNBUFFERED": "1"}, errors="replace")
    output = []
    for line in process.stdout:
        print(prefix + line, end="", flush=True)
        output.append(line)
        if log is not None:
            log.write(line)
            log.flush()
    return process.wait(), "".join(output)


def build_corpus(args, log):
    info_path = os.path.join(args.corpus, "info.json")
    log.write(f"==== corpus: {args.corpus}\n")
    if os.path.exists(info_path):
        print(f"session: corpus {args.corpus} exists (info.json): not rebuilding", flush=True)
        log.write("exists: not rebuilt\n")
    else:
        if not os.path.isfile(args.corpus_script):
            raise SystemExit(f"session: no corpus script at {args.corpus_script}: pass --corpus-script (the "
                             "project's ../shared/bench/make_corpus.py, carried to a GPU machine as e.g. "
                             ".gpu/bench/make_corpus.py) or a --corpus that holds info.json")
        command = [sys.executable, args.corpus_script, "--out", args.corpus, *shlex.split(args.corpus_args)]
        print("session: " + shlex.join(command), flush=True)
        env = {**os.environ, **bench_run.tiktoken_env(args.tiktoken_cache)}
        returncode, _ = tee(command, log, env=env)
        if returncode != 0 or not os.path.exists(info_path):
            raise SystemExit(f"session: the corpus build failed (rc={returncode}); see {log.name}")
    shutil.copyfile(info_path, os.path.join(args.out, "corpus_info.json"))
    with open(info_path, encoding="utf-8") as f:
        return json.load(f)


def runner_command(args, run):
    probe = "probe.json" if run.get("gpu") is None else f"probe-gpu{run['gpu']}.json"  # each GPU its own probe
    command = [sys.executable, os.path.join(HERE, "run.py"), "--script", run["script"], "--corpus", args.corpus,
               "--out", args.work, "--name", run["name"], "--probe-file", os.path.join(args.work, probe),
               "--nproc", str(run.get("nproc") or args.nproc), "--baseline", args.baseline, "--results",
               args.results, "--quiet"]
    if args.bench100m:
        command.append("--bench100m")
    elif run.get("steps"):
        command += ["--steps", str(run["steps"])]
    else:
        command += ["--budget-tokens", str(run.get("budget_tokens") or args.budget_tokens)]
    if run.get("torchrun") is False:
        command.append("--no-torchrun")
    if run.get("gpu") is not None:
        command += ["--gpu", str(run["gpu"])]
    if args.warm_compile_cache:
        command.append("--warm-compile-cache")
    if args.tiktoken_cache:
        command += ["--tiktoken-cache", args.tiktoken_cache]
    return command


def short_output(text):
    """A run's output for logs.txt: without the train-step lines bench_run.worth_showing leaves out, and at most
    LOG_LINES_PER_RUN lines (the first quarter and the rest from the end, where an error would be)."""
    lines = [line for line in text.splitlines(keepends=True) if bench_run.worth_showing(line)]
    if len(lines) > LOG_LINES_PER_RUN:
        head = LOG_LINES_PER_RUN // 4
        tail = LOG_LINES_PER_RUN - head
        lines = lines[:head] + [f"... {len(lines) - LOG_LINES_PER_RUN} lines left out ...\n"] + lines[-tail:]
    return "".join(lines)


def failed_summary(args, run, status, output):
    """A summary for a run that produced none (skipped, or the runner itself failed), with its results line, which
    is appended to --results too: every planned run leaves one line."""
    summary = {key: None for key in ("card", "torch", "tokens_trained", "compile_warmup_s", "steady_tokens_per_s",
                                     "train_time_ex_compile_s", "mfu", "peak_mem_mib", "final_val_loss",
                                     "final_train_loss", "train_time_s", "wall_s")}
    budget = bench_run.BENCH100M_TOKENS if args.bench100m else run.get("budget_tokens") or args.budget_tokens
    summary.update(name=run["name"], script=os.path.basename(run["script"]), overrides=run["overrides"],
                   protocol="bench100m" if args.bench100m else "custom", baseline=args.baseline,
                   budget_tokens=None if run.get("steps") else budget, nproc=run.get("nproc") or args.nproc,
                   torchrun=run.get("torchrun") is not False, status=status, gpu=run.get("gpu"),
                   date=time.strftime("%Y-%m-%d", time.gmtime()), val=[], train_curve=[], error_tail=output[-3000:])
    summary["row"] = bench_run.markdown_row(summary)
    summary["result"] = bench_run.result_line(summary)
    if args.results:
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(json.dumps(summary["result"]) + "\n")
    return summary


def write_results(args, summaries, corpus_info, session_command):
    with open(os.path.join(args.out, "summaries.json"), "w", encoding="utf-8") as f:
        json.dump(summaries, f, indent=1)
    with open(os.path.join(args.out, "results.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(s["result"]) + "\n" for s in summaries if "result" in s)
    table = bench_run.ROW_HEADER + "\n" + "\n".join(s["row"] for s in summaries) + "\n"
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(f"<!-- {session_command} -->\n")
        f.write(f"Corpus: {corpus_info.get('train_tokens', 0):,} train + {corpus_info.get('val_tokens', 0):,} val "
                f"tokens of site-packages Python ({corpus_info.get('documents', 0):,} files), sha256 "
                f"{str(corpus_info.get('sha256'))[:16]}…\n\n")
        f.write(table)
    try:
        load_sibling("plot").plot(summaries, os.path.join(args.out, "plot.png"))
    except Exception as error:  # a broken plot must not lose the table
        print(f"session: plot failed: {error!r}", flush=True)
    return table


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", default=[], help="one run (see above); repeat for more")
    parser.add_argument("--plan", help="runs from a file or inline JSON (see above); before the --run ones")
    parser.add_argument("--bench100m", action="store_true", help="every run is the project's benchmark "
                        f"({bench_run.BENCH100M_TOKENS:,} tokens, ../shared/RECIPES.md §1); runs give no budget")
    parser.add_argument("--budget-tokens", type=bench_run.parse_count, default=50_000_000,
                        help="tokens per run unless the run says budget= or steps= (default 50M)")
    parser.add_argument("--baseline", default="", help="the baseline run's name, recorded in every results line "
                        "(default: the first run)")
    parser.add_argument("--results", default=bench_run.RESULTS, help="JSON-lines file each run's result line is "
                        "appended to (default: bench/results.jsonl)")
    parser.add_argument("--nproc", type=int, default=1, help="torchrun processes per run unless it says nproc=")
    parser.add_argument("--warm-compile-cache", action="store_true", help="runs share torch.compile caches "
                        "(saves ~30 s a compiled run after the first; compile times are then warm starts)")
    parser.add_argument("--tiktoken-cache", default=None, help="tiktoken cache folder with the GPT-2 BPE files, for "
                        "the corpus script and the runs (default: TIKTOKEN_CACHE_DIR)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench_out", help="results folder")
    parser.add_argument("--work", help="run directories and per-run files (default: a new temporary folder)")
    parser.add_argument("--time-limit", type=float, default=0, help="seconds for the whole session (0 = none): a run "
                        f"still going {TIME_RESERVE_S} s before it is stopped (its partial numbers kept) and later "
                        "runs are skipped")
    corpus = parser.add_argument_group("corpus (built unless --corpus holds info.json)")
    corpus.add_argument("--corpus", default="/tmp/pycorpus", help="the corpus folder (default /tmp/pycorpus)")
    corpus.add_argument("--corpus-script", default=CORPUS_SCRIPT, help="the project's corpus builder (default: "
                        "../shared/bench/make_corpus.py beside the checkout)")
    corpus.add_argument("--corpus-args", default="", help="more arguments for the corpus script, one string "
                        "(e.g. \"--root DIR --val-tokens 600\")")
    args = parser.parse_args(argv)
    runs = (load_plan(args.plan) if args.plan else []) + [parse_run_spec(spec) for spec in args.run]
    if not runs:
        parser.error("nothing to run: give --run or --plan")
    if args.bench100m and any(run.get("budget_tokens") or run.get("steps") for run in runs):
        parser.error("--bench100m fixes every run's budget: drop budget= and steps= from the runs")
    args.corpus = os.path.abspath(args.corpus)
    args.corpus_script = os.path.abspath(args.corpus_script)
    args.out = os.path.abspath(args.out)
    args.results = os.path.abspath(args.results) if args.results else ""
    args.work = os.path.abspath(args.work) if args.work else tempfile.mkdtemp(prefix="bench-session-")
    runs = unique_names(runs)
    if len({run.get("gpu") is None for run in runs}) > 1:
        parser.error("some runs name a gpu= and some do not: give every run its GPU (runs on a GPU go in turn, the "
                     "GPUs side by side), or none")
    args.baseline = args.baseline or runs[0]["name"]
    if args.baseline not in [run["name"] for run in runs]:
        parser.error(f"--baseline={args.baseline} is not one of the runs: {', '.join(r['name'] for r in runs)}")
    return args, runs


def preflight(args, runs):
    """Every run's script exists and accepts its overrides (the script's own parse_config, then the runner's and
    the protocol's rules), checked on the CPU before the corpus is built or any GPU works: a plan's typo found
    mid-lease costs a GPU's slot. A bad plan stops the session here, naming every bad run."""
    problems = []
    for run in runs:
        try:
            script = bench_run.resolve_script(run["script"])
            config = bench_run.checked_config(script, run["overrides"])
            bench_run.protocol_overrides(args, run["overrides"], config, 1)
        except SystemExit as error:
            problems.append(f"run {run['name']}: {error}")
    if problems:
        raise SystemExit("session: nothing run, nothing written; fix the plan:\n  " + "\n  ".join(problems))


def run_one(args, run, index, total, corpus_info, t0):
    """One run of the plan: its banner, the runner, and its summary (a failed or skipped run's too), with the part
    of logs.txt it adds (written by the caller, so that runs of several GPUs do not interleave there)."""
    gpu = run.get("gpu")
    where = "" if gpu is None else f" (gpu {gpu})"
    banner = f"==== run {index}/{total}: {run['name']}{where}: {run['script']} {shlex.join(run['overrides'])}"
    print("\n" + banner, flush=True)
    log = [banner + "\n"]
    command = runner_command(args, run)
    if args.time_limit:
        left = args.time_limit - (time.time() - t0) - TIME_RESERVE_S
        if left < 30:
            log.append("skipped: the session's time limit is near\n")
            return failed_summary(args, run, "skipped (time limit)", ""), "".join(log)
        command += ["--timeout", f"{left:.0f}"]
    command += ["--", *run["overrides"]]
    log.append("$ " + shlex.join(command) + "\n")
    env = None if gpu is None else {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
    returncode, output = tee(command, None, prefix="  " if gpu is None else f"  [gpu {gpu}] ", env=env)
    summary_path = os.path.join(args.work, f"{run['name']}.summary.json")
    stdout_log = os.path.join(args.work, f"{run['name']}.stdout.log")
    log.append("".join(line for line in output.splitlines(keepends=True) if line.startswith("bench:")))
    if os.path.exists(stdout_log):  # the script's output, short (the full one stays in --work)
        with open(stdout_log, encoding="utf-8", errors="replace") as f:
            log.append(short_output(f.read()))
    if os.path.exists(summary_path):
        with open(summary_path, encoding="utf-8") as f:
            summary = json.load(f)
    else:  # the runner itself stopped early: a bad override, a missing script, a failed probe
        log.append(output)
        summary = failed_summary(args, run, f"failed (runner rc={returncode})", output)
    log.append(f"==== {run['name']}: {summary['status']}\n")
    return summary, "".join(log)


def main(argv=None):
    t0 = time.time()
    argv = sys.argv[1:] if argv is None else argv
    args, runs = parse_args(argv)
    preflight(args, runs)
    session_command = shlex.join(["python", "bench/session.py", *argv])
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    done = {}  # run index -> summary; the results stay in plan order whichever GPU finishes first
    lock = threading.Lock()
    with open(os.path.join(args.out, "logs.txt"), "w", encoding="utf-8") as log:
        log.write(f"==== session: {session_command}\n")
        corpus_info = build_corpus(args, log)

        def chain(indices):  # the runs of one GPU (or of the whole session), in turn
            for index in indices:
                summary, text = run_one(args, runs[index], index + 1, len(runs), corpus_info, t0)
                with lock:
                    done[index] = summary
                    log.write(text)
                    log.flush()
                    write_results(args, [done[i] for i in sorted(done)], corpus_info, session_command)

        chains = {}
        for index, run in enumerate(runs):
            chains.setdefault(run.get("gpu"), []).append(index)
        threads = [threading.Thread(target=chain, args=(indices,)) for indices in chains.values()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    summaries = [done[i] for i in sorted(done)]
    table = write_results(args, summaries, corpus_info, session_command)
    print(f"\nsession: {len(runs)} runs in {time.time() - t0:.0f}s; results in {args.out}\n")
    print(table)
    return 0 if len(summaries) == len(runs) and all(s["status"] == "ok" for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
