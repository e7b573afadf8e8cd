#!/usr/bin/env python3
"""Keep the lineage of training scripts honest: check it, read a step's diff, carry a fix forward.

The repo root holds NN-name.py files. Each is a full copy of its parent (NN-1)-*.py plus one feature, and its
first lines (the module docstring) say which step it is and which file is its parent:

    \"\"\"Step 02 of the lineage: add DDP (torchrun, NCCL on GPU / gloo on CPU).
    Parent: 01-gpt2-baseline.py
    ...\"\"\"

Step 01 says `Parent: none`.

Usage (paths are the repo root's unless --root DIR names another folder of scripts):
    python tools/lineage.py check                 # headers, numbering, and `python FILE --help` for every step
    python tools/lineage.py check --no-run        # headers and numbering only (no subprocesses)
    python tools/lineage.py diff 8                # diff -u 07-*.py 08-*.py: what step 08 adds
    python tools/lineage.py diff 8 --stat         # only the added/removed line counts
    python tools/lineage.py propagate 3           # carry the uncommitted edit of 03 into 04, 05, ...
    python tools/lineage.py propagate 3 --base HEAD~1       # the edit = 03 at HEAD~1 -> 03 in the working tree
    python tools/lineage.py propagate 3 --from-file old.py  # the edit = old.py -> 03 (no git needed)

check: every NN-*.py names its own step number and its parent (the exact file name of step NN-1; `none` for
01) in its first 15 lines; the numbering starts at 01 with no gaps or duplicates; the file compiles; and
`python FILE --help`, run in an empty temporary directory, exits 0 with the config help on stdout and leaves
that directory empty (no runs/, no downloaded input.txt). Prints one line per problem and a summary. The --help
runs share one interpreter that has imported torch once and forks a child per script, which runs the file as
__main__ with `--help` (on Linux; elsewhere, and with --isolated, each is a fresh `python FILE --help`).

propagate: a fix belongs in the step that introduced the code and in every descendant, so that each pairwise
diff stays "one feature". The edit is the change of step N's file between the git revision (or the --from-file
copy) and the working tree. Step N+1 gets it by a 3-way merge (`git merge-file`: base = N before the edit,
ours = N+1, theirs = N after the edit); N+2 then gets N+1's resulting change the same way, and so on. The first
conflict stops it: the steps before it are updated, the conflicting step and those after it are left as they
were (or, with --write-conflicts, the conflicting step is written with conflict markers to resolve by hand).
As in any git merge, an edit on a line next to one the child itself changed counts as a conflict.

Exit status: 0 clean, 1 problems found (check) or a conflict (propagate), 2 bad usage.
Standard library only (propagate also needs `git` on PATH).
"""
import argparse
import concurrent.futures
import difflib
import json
import os
import re
import subprocess
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT_NAME = re.compile(r"^(\d\d)-.+\.py$")  # the same files as the glob [0-9][0-9]-*.py
STEP_LINE = re.compile(r"Step (\d\d)\b")
PARENT_LINE = re.compile(r"^\s*Parent: (\S+)")
HEADER_LINES = 15
HELP_TIMEOUT_S = 60
# A --help run must not believe it was launched by torchrun, and must not be invited to go online.
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
OFFLINE_VARS = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "PYTHONDONTWRITEBYTECODE": "1"}


class UsageError(Exception):
    """A problem that stops a command before it changes anything (exit status 2)."""


def list_scripts(root):
    """(number, file name) of every NN-*.py in root, sorted."""
    try:
        names = os.listdir(root)
    except OSError as e:
        raise UsageError(f"cannot list {root}: {e.strerror}") from None
    return sorted((int(name[:2]), name) for name in names
                  if SCRIPT_NAME.match(name) and os.path.isfile(os.path.join(root, name)))


def find_step(scripts, number):
    """The file name of step `number`; a usage error when it is missing or not unique."""
    names = [name for n, name in scripts if n == number]
    if not names:
        raise UsageError(f"no step {number:02d} (no {number:02d}-*.py)")
    if len(names) > 1:
        raise UsageError(f"step {number:02d} is ambiguous: {', '.join(names)}")
    return names[0]


def step_number(text):
    """Parse a step argument: 8, 08 or a file name such as 08-add-lr-schedule-options.py."""
    match = re.match(r"(\d+)", os.path.basename(text))
    if not match or not 1 <= int(match.group(1)) <= 99:
        raise argparse.ArgumentTypeError(f"not a step number or NN-*.py file name: {text!r}")
    return int(match.group(1))


def read_text(path):
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        return f.read()


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


# ---------------------------------------------------------------------------------------------------- check

def read_header(text):
    """(step number, parent) named in the first HEADER_LINES lines; None for what is not there."""
    step = parent = None
    for line in text.splitlines()[:HEADER_LINES]:
        if step is None and (match := STEP_LINE.search(line)):
            step = int(match.group(1))
        if parent is None and (match := PARENT_LINE.match(line)):
            parent = match.group(1)
    return step, parent


def structure_problems(root, scripts):
    """(file, message) for every header, numbering or syntax problem in the lineage."""
    if not scripts:
        return [(root, "no lineage scripts ([0-9][0-9]-*.py) found")]
    problems = []
    by_number = {}
    for number, name in scripts:
        by_number.setdefault(number, []).append(name)
    for number, names in by_number.items():
        for name in names:
            if len(names) > 1:
                others = ", ".join(n for n in names if n != name)
                problems.append((name, f"duplicate step {number:02d} (also {others})"))
    numbers = sorted(by_number)
    if numbers[0] != 1:
        problems.append((by_number[numbers[0]][0], f"the numbering starts at {numbers[0]:02d}, not 01"))
    for previous, number in zip(numbers, numbers[1:]):
        if number != previous + 1:
            missing = ", ".join(f"{n:02d}" for n in range(previous + 1, number))
            problems.append((by_number[number][0],
                             f"gap in the numbering: no step {missing} between {by_number[previous][0]} and it"))

    for number, name in scripts:
        text = read_text(os.path.join(root, name))
        step, parent = read_header(text)
        if step is None:
            problems.append((name, f"no 'Step {number:02d}' line in its first {HEADER_LINES} lines"))
        elif step != number:
            problems.append((name, f"its header says Step {step:02d}, its file name says step {number:02d}"))
        parents = by_number.get(number - 1, [])
        expected = "none" if number == 1 else parents[0] if len(parents) == 1 else None
        if parent is None:
            hint = f" (expected 'Parent: {expected}')" if expected else ""
            problems.append((name, f"no 'Parent: FILE' line in its first {HEADER_LINES} lines{hint}"))
        elif expected is not None and parent != expected:
            problems.append((name, f"'Parent: {parent}' should be 'Parent: {expected}'"))
        elif expected is None and not parents:
            problems.append((name, f"'Parent: {parent}' but there is no step {number - 1:02d}"))
        try:
            compile(text, name, "exec")
        except (SyntaxError, ValueError) as e:
            where = f" at line {e.lineno}" if getattr(e, "lineno", None) else ""
            problems.append((name, f"does not compile{where}: {getattr(e, 'msg', e)}"))
    return problems


def help_env():
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(OFFLINE_VARS)
    return env


def last_line(text):
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output on stderr)"


def help_messages(returncode, stdout, stderr, left, timed_out=False):
    """The problems of one --help run: its status, its stdout, what it left in its working directory."""
    problems = []
    if timed_out:
        problems.append(f"--help did not finish within {HELP_TIMEOUT_S} s")
    elif returncode != 0:
        problems.append(f"--help exited with status {returncode}: {last_line(stderr)}")
    elif not stdout.strip():
        problems.append("--help printed nothing on stdout (the config help belongs there)")
    if left:
        problems.append(f"--help left {', '.join(left)} in its working directory (it must have no side effects)")
    return problems


def help_problems(root, name):
    """Messages for `python NAME --help` run in an empty temporary directory: status, stdout, side effects."""
    with tempfile.TemporaryDirectory(prefix="lineage-help-") as cwd:
        try:
            proc = subprocess.run([sys.executable, os.path.join(root, name), "--help"], cwd=cwd, env=help_env(),
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                                  timeout=HELP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return help_messages(None, "", "", sorted(os.listdir(cwd)), timed_out=True)
        return help_messages(proc.returncode, proc.stdout, proc.stderr, sorted(os.listdir(cwd)))


# The --help runs without a fresh interpreter each: this program imports what the scripts import (torch: seconds)
# once, then forks a child per script that runs it as __main__ with --help in its own empty folder, its stdout
# and stderr in files, and prints one JSON line per script: what help_problems() reads from a subprocess.
FORK_RUNNER = r"""
import importlib, json, os, runpy, sys, tempfile, time, traceback
for module in ("numpy", "torch", "torch.distributed", "torch.nn.attention.flex_attention", "safetensors.torch"):
    try:
        importlib.import_module(module)
    except Exception:
        pass
root, timeout, jobs, names = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]

def start(name, work):
    cwd = tempfile.mkdtemp(prefix="lineage-help-", dir=work)
    out, err = os.path.join(work, name + ".out"), os.path.join(work, name + ".err")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(cwd)
            for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, out, os.O_WRONLY | os.O_CREAT),
                                    (2, err, os.O_WRONLY | os.O_CREAT)):
                os.dup2(os.open(path, flags), fd)
            sys.argv = [os.path.join(root, name), "--help"]
            try:
                runpy.run_path(sys.argv[0], run_name="__main__")
                code = 0
            except SystemExit as e:  # as the interpreter does: None is 0, a number itself, anything else printed, 1
                code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    return pid, cwd, out, err, time.time()

def finish(name, cwd, out, err, status, timed_out):
    read = lambda path: open(path, errors="replace").read() if os.path.exists(path) else ""
    code = os.waitstatus_to_exitcode(status) if status is not None else None
    print(json.dumps({"name": name, "returncode": code, "timed_out": timed_out, "stdout": read(out),
                      "stderr": read(err), "left": sorted(os.listdir(cwd))}), flush=True)

with tempfile.TemporaryDirectory(prefix="lineage-check-") as work:
    waiting, running = list(names), {}
    while waiting or running:
        while waiting and len(running) < jobs:
            name = waiting.pop(0)
            running[name] = start(name, work)
        time.sleep(0.01)
        for name, (pid, cwd, out, err, started) in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                finish(name, cwd, out, err, status, False)
            elif time.time() - started > timeout:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                finish(name, cwd, out, err, None, True)
            else:
                continue
            del running[name]
"""


def forked_help_problems(root, names, jobs):
    """{name: messages} for `--help` of every script in `names`, run by FORK_RUNNER: the checks of help_problems()
    on what each child printed, its status and what it left in its folder. None where it could not run at all."""
    proc = subprocess.run([sys.executable, "-c", FORK_RUNNER, root, str(HELP_TIMEOUT_S), str(jobs), *names],
                          env=help_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          errors="replace", timeout=HELP_TIMEOUT_S * len(names) + 60)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            results[result["name"]] = help_messages(result["returncode"], result["stdout"], result["stderr"],
                                                    result["left"], result["timed_out"])
    if set(results) != set(names):  # the runner itself failed: say so on every script it did not report
        reason = f"the --help runner stopped (status {proc.returncode}): {last_line(proc.stderr)}"
        results.update({name: [reason] for name in names if name not in results})
    return results


def cmd_check(args):
    root = args.root
    scripts = list_scripts(root)
    problems = structure_problems(root, scripts)
    if scripts and not args.no_run:
        names = [name for _, name in scripts]
        if sys.platform.startswith("linux") and not args.isolated:  # macOS's fork after imports is not safe
            results = forked_help_problems(root, names, args.jobs)
            problems += [(name, message) for name in names for message in results[name]]
        else:
            # Each run imports torch (seconds); a few at a time keeps the wall time down on a small machine.
            with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
                results = pool.map(lambda name: (name, help_problems(root, name)), names)
                problems += [(name, message) for name, messages in results for message in messages]
    order = {name: i for i, (_, name) in enumerate(scripts)}
    for name, message in sorted(problems, key=lambda p: order.get(p[0], -1)):
        print(f"{name}: {message}")
    what = "structure only" if args.no_run else "structure and --help"
    names = [name for _, name in scripts]
    span = f" ({names[0]})" if len(names) == 1 else f" ({names[0]} .. {names[-1]})" if names else ""
    if problems:
        print(f"lineage check FAILED: {len(problems)} problem(s) in {len(scripts)} script(s){span}, {what}")
        return 1
    print(f"lineage check OK: {len(scripts)} script(s){span}, {what}")
    return 0


# ----------------------------------------------------------------------------------------------------- diff

def unified_diff(old, new, old_name, new_name):
    """`diff -u` text, with diff's marker for a last line that has no newline."""
    out = []
    for line in difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                     fromfile=old_name, tofile=new_name):
        out.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return "".join(out)


def cmd_diff(args):
    scripts = list_scripts(args.root)
    child = find_step(scripts, args.step)
    if args.step == 1:
        raise UsageError(f"{child} is step 01: it has no parent to diff against")
    parent = find_step(scripts, args.step - 1)
    diff = unified_diff(read_text(os.path.join(args.root, parent)), read_text(os.path.join(args.root, child)),
                        parent, child)
    if args.stat:
        body = [line for line in diff.splitlines()[2:] if not line.startswith(("@@", "\\"))]
        added = sum(line.startswith("+") for line in body)
        removed = sum(line.startswith("-") for line in body)
        print(f"{parent} -> {child}: {added} line(s) added, {removed} removed")
    else:
        sys.stdout.write(diff)
    return 0


# ------------------------------------------------------------------------------------------------ propagate

def run_git(argv, cwd=None):
    try:
        return subprocess.run(["git", *argv], cwd=cwd, capture_output=True)
    except FileNotFoundError:
        raise UsageError("git is not on PATH (propagate merges with `git merge-file`)") from None


def git_show(root, rev, name):
    """The bytes of root/name at revision rev (the path is taken relative to root, wherever the repo top is)."""
    proc = run_git(["show", f"{rev}:./{name}"], cwd=root)
    if proc.returncode != 0:
        reason = proc.stderr.decode(errors="replace").strip().splitlines()
        raise UsageError(f"cannot read {name} at {rev}: {reason[-1] if reason else 'git show failed'} "
                         "(outside git, give the old text with --from-file OLD)")
    return proc.stdout


def merge3(workdir, ours, base, theirs, labels):
    """`git merge-file -p ours base theirs`: (merged bytes, number of conflict hunks)."""
    paths = []
    for role, data in zip(("ours", "base", "theirs"), (ours, base, theirs)):
        path = os.path.join(workdir, role)
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
    argv = ["merge-file", "-p"]
    for label in labels:
        argv += ["-L", label]
    proc = run_git(argv + paths)
    # The exit status is the number of conflicts (capped at 127) and negative (255) on an error.
    if not 0 <= proc.returncode <= 127:
        raise UsageError(f"git merge-file failed: {proc.stderr.decode(errors='replace').strip()}")
    if proc.returncode == 0:
        return proc.stdout, 0
    hunks = sum(line.startswith(b"<<<<<<< ") for line in proc.stdout.splitlines())
    return proc.stdout, hunks or proc.returncode


def cmd_propagate(args):
    root = args.root
    scripts = list_scripts(root)
    start = find_step(scripts, args.step)
    later = [(number, name) for number, name in scripts if number > args.step]
    for expected, (number, name) in enumerate(later, start=args.step + 1):
        if number != expected:
            raise UsageError(f"the lineage after {start} is broken at {name} (expected step {expected:02d}, "
                             "one file per step); fix it first (see `check --no-run`)")

    new_text = read_bytes(os.path.join(root, start))
    if args.from_file:
        try:
            old_text, source = read_bytes(args.from_file), args.from_file
        except OSError as e:
            raise UsageError(f"cannot read --from-file {args.from_file}: {e.strerror}") from None
    else:
        old_text, source = git_show(root, args.base, start), f"{start} at {args.base}"
    if old_text == new_text:
        print(f"{start}: no change against {source}; nothing to propagate")
        return 0
    if not later:
        print(f"{start} is the last step; nothing to propagate")
        return 0

    # Merge everything first, write afterwards: a crash mid-way leaves no half-propagated lineage.
    merged_steps = []  # (name, text before, text after) for the steps that merged cleanly
    conflict = None  # (name, merged text with markers, hunks, parent name)
    parent, parent_old, parent_new = start, old_text, new_text
    with tempfile.TemporaryDirectory(prefix="lineage-merge-") as workdir:
        for _, name in later:
            child_old = read_bytes(os.path.join(root, name))
            labels = (name, f"{parent} before the edit", f"{parent} after the edit")
            merged, hunks = merge3(workdir, child_old, parent_old, parent_new, labels)
            if hunks:
                conflict = (name, merged, hunks, parent)
                break
            merged_steps.append((name, child_old, merged))
            parent, parent_old, parent_new = name, child_old, merged

    updated = []
    for name, before, after in merged_steps:
        if after == before:
            print(f"unchanged {name} (the change of its parent did not alter it)")
            continue
        if not args.dry_run:
            with open(os.path.join(root, name), "wb") as f:
                f.write(after)
        updated.append(name)
        print(f"{'would update' if args.dry_run else 'updated'} {name}")

    if conflict is None:
        verb = "would carry" if args.dry_run else "carried"
        print(f"{verb} the edit of {start} into {len(updated)} of {len(later)} later step(s)")
        return 0

    name, merged, hunks, parent = conflict
    rest = [n for _, n in later][len(merged_steps) + 1:]
    print(f"CONFLICT in {name}: {hunks} conflict hunk(s) merging the change of {parent} (its parent) into it")
    print(f"  updated: {', '.join(updated) if updated else 'nothing'}"
          + (" (dry run: nothing written)" if args.dry_run else ""))
    if args.write_conflicts and not args.dry_run:
        with open(os.path.join(root, name), "wb") as f:
            f.write(merged)
        print(f"  wrote {name} with conflict markers (<<<<<<< ======= >>>>>>>); resolve them by hand")
        print(f"  left untouched: {', '.join(rest) if rest else 'nothing (it is the last step)'}")
    else:
        print(f"  left untouched: {', '.join([name] + rest)}")
        print(f"  rerun with --write-conflicts to get {name} with conflict markers, or edit it by hand")
    if rest:
        if args.from_file:
            how = f"propagate {name[:2]} --from-file COPY, where COPY is {name} as it is now"
        else:
            how = f"propagate {name[:2]}" + (f" --base {args.base}" if args.base != "HEAD" else "")
        print(f"  once {name} is resolved, carry on with: {how}")
    return 1


# ----------------------------------------------------------------------------------------------------- main

def main(argv=None):
    root_help = "folder holding the NN-*.py scripts (default: the repo root, %(default)s)"
    parser = argparse.ArgumentParser(prog="lineage.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Run `lineage.py COMMAND --help` for a command's options.")
    parser.add_argument("--root", default=REPO_ROOT, help=root_help)
    # --root is also accepted after the command; SUPPRESS keeps the subparser from overwriting the value above.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", default=argparse.SUPPRESS, help="as above")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser("check", parents=[common], help="check headers, numbering and --help of every step")
    check.add_argument("--no-run", action="store_true", help="skip the `python FILE --help` runs (structure only)")
    check.add_argument("--isolated", action="store_true", help="each --help in a fresh interpreter (slower: torch "
                       "is imported once per script), not in children forked from one")
    check.add_argument("--jobs", type=int, default=max(2, min(4, os.cpu_count() or 2)),
                       help="--help runs at a time (default %(default)s)")
    check.set_defaults(func=cmd_check)

    diff = commands.add_parser("diff", parents=[common], help="diff -u of step N against its parent")
    diff.add_argument("step", type=step_number, metavar="N", help="step number (8, 08) or its file name")
    diff.add_argument("--stat", action="store_true", help="print only the added/removed line counts")
    diff.set_defaults(func=cmd_diff)

    propagate = commands.add_parser("propagate", parents=[common],
                                    help="carry an edit of step N into every later step (3-way merges)")
    propagate.add_argument("step", type=step_number, metavar="N", help="step number (3, 03) or its file name")
    source = propagate.add_mutually_exclusive_group()
    source.add_argument("--base", default="HEAD", help="git revision holding N before the edit (default HEAD)")
    source.add_argument("--from-file", metavar="OLD", help="a file holding N's text before the edit (no git)")
    propagate.add_argument("--write-conflicts", action="store_true",
                           help="on a conflict, write that step with conflict markers (later steps stay untouched)")
    propagate.add_argument("--dry-run", action="store_true", help="report what would change; write nothing")
    propagate.set_defaults(func=cmd_propagate)

    args = parser.parse_args(argv)
    args.root = os.path.abspath(args.root)
    if getattr(args, "jobs", 1) < 1:
        parser.error("--jobs must be at least 1")
    try:
        return args.func(args)
    except UsageError as e:
        print(f"lineage.py {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
