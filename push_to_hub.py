"""Upload a training run to the Hugging Face Hub: its config, log, checkpoints and a generated model card.

    python push_to_hub.py --dry-run                          # newest finished run in runs/: the plan and the card
    HF_TOKEN=hf_... python push_to_hub.py --run=20250101-120000 --include-checkpoints=all --private

Without --run it picks the newest finished run in --runs-dir (a folder with config.json and a log.txt that
ends with its `done` line) and says which. A run without a checkpoint is refused unless --allow-no-checkpoint:
its upload would hold no weights.

The token comes from HF_TOKEN (or hf_token) and is never printed. The default repo id is
`{user}/gpt-3-small_{run_name}`, the user from HF_USER (or hf_user), else asked of the Hub with the token.
Everything goes up in one commit, so a failed upload leaves the repo as it was, and nothing on the Hub is ever
deleted: pushing again adds or overwrites files, and checkpoints pushed before stay.
"""
import argparse
import json
import os
import re
import sys

import runlog  # the project's one log parser

CHECKPOINT_DIR = re.compile(r"^step_(\d+)$")  # checkpoints/step_000123/; anything else there (a .tmp) is skipped
MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")  # listed first in the card
CARD = "README.md"


class UploadError(Exception):
    """An expected failure (no such run, no token, the Hub said no): main prints its message, no traceback."""


def env(name):
    """HF_TOKEN, or hf_token as some shells and notebooks spell it."""
    return os.environ.get(name) or os.environ.get(name.lower())


def redact(message, token):
    """The message with the token blanked out, so an error that quotes it cannot leak it."""
    return str(message).replace(token, "hf_***") if token else str(message)


def list_runs(runs_dir):
    """The run directories in runs_dir: those holding a config.json."""
    if not os.path.isdir(runs_dir):
        return []
    return [entry.path for entry in os.scandir(runs_dir) if os.path.isfile(os.path.join(entry.path, "config.json"))]


def is_finished(run_dir):
    """True when the run has its config.json and a log.txt holding the `done` line of its last step."""
    log = os.path.join(run_dir, "log.txt")
    return os.path.isfile(os.path.join(run_dir, "config.json")) and os.path.isfile(log) and \
        runlog.parse_log(log)["done"] is not None


def find_run(run=None, runs_dir="runs"):
    """The run directory to upload: `run` as a name under runs_dir or as a path; by default the newest finished
    run in runs_dir (the most recently started: config.json is written at the start; ties go to the later name),
    which is printed."""
    if run is None:
        runs = list_runs(runs_dir)
        finished = [path for path in runs if is_finished(path)]
        if not finished:
            unfinished = f" ({len(runs)} unfinished: no log.txt or no done line in it)" if runs else ""
            raise UploadError(f"no finished runs in {runs_dir}/{unfinished}: train one first (e.g. python "
                              "01-gpt2-baseline.py), point --runs-dir at the out_dir you trained with, or name a "
                              "run with --run")
        run_dir = max(finished, key=lambda p: (os.path.getmtime(os.path.join(p, "config.json")),
                                               os.path.basename(p)))
        skipped = len(runs) - len(finished)
        print(f"run: {run_dir} (the newest finished run in {runs_dir}/"
              + (f"; {skipped} unfinished skipped" if skipped else "") + "; --run picks another)")
    else:
        run_dir = next((p for p in (os.path.join(runs_dir, run), run) if os.path.isdir(p)), None)
        if run_dir is None:
            known = ", ".join(sorted(os.path.basename(p) for p in list_runs(runs_dir))) or "none"
            raise UploadError(f"unknown run {run!r}: neither a run in {runs_dir}/ (runs there: {known}) "
                              "nor a directory")
    for name in ("config.json", "log.txt"):
        if not os.path.isfile(os.path.join(run_dir, name)):
            raise UploadError(f"{run_dir} has no {name}: not a run directory "
                              "(every run writes config.json and log.txt)")
    return run_dir


def checkpoints(run_dir):
    """[(step, folder)] of the run's checkpoints holding weights (model.safetensors), oldest first."""
    root = os.path.join(run_dir, "checkpoints")
    found = []
    if os.path.isdir(root):
        for entry in os.scandir(root):
            match = CHECKPOINT_DIR.match(entry.name)
            if match and entry.is_dir() and os.path.isfile(os.path.join(entry.path, "model.safetensors")):
                found.append((int(match.group(1)), entry.path))
    return sorted(found)


def plan_upload(run_dir, include_checkpoints="newest"):
    """[(local_path, path_in_repo)]: config.json, log.txt, the model card (local_path None: model_card() writes it)
    and every file of the chosen checkpoint folders under the same relative path as in the run dir."""
    chosen = {"all": slice(None), "newest": slice(-1, None), "none": slice(0)}.get(include_checkpoints)
    if chosen is None:
        raise UploadError(f"--include-checkpoints={include_checkpoints!r}: use all, newest or none")
    plan = [(os.path.join(run_dir, "config.json"), "config.json"), (os.path.join(run_dir, "log.txt"), "log.txt"),
            (None, CARD)]
    for _, folder in checkpoints(run_dir)[chosen]:
        for parent, subdirs, files in os.walk(folder):
            subdirs.sort()
            for name in sorted(files):
                local = os.path.join(parent, name)
                plan.append((local, os.path.relpath(local, run_dir).replace(os.sep, "/")))
    return plan


def _duration(total):
    """Seconds as a readable duration: 12.3 s, 45.6 min, 7.89 h."""
    if total < 120:
        return f"{total:.1f} s"
    return f"{total / 60:.1f} min" if total < 7200 else f"{total / 3600:.2f} h"


def _cell(value):
    """A config value as a markdown table cell: JSON spelling (strings quoted, true/false), pipes escaped."""
    return "`" + json.dumps(value).replace("|", "\\|") + "`"


def model_card(run_dir, repo_id, plan):
    """The README.md for the Hub: front matter, results read from the log, the config, how to load the weights."""
    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    log = runlog.parse_log(os.path.join(run_dir, "log.txt"))
    header, done, train, val, hellaswag = log["header"], log["done"] or {}, log["train"], log["val"], log["hellaswag"]
    script = config.get("script") or header.get("script", "the training script")
    run_name = os.path.basename(os.path.abspath(run_dir))
    weights = [path for _, path in plan if path.endswith("/model.safetensors")]  # oldest first
    folders = sorted({path.split("/")[1] for _, path in plan if path.startswith("checkpoints/")})
    if folders:
        uploaded = (" and checkpoints " + ", ".join(f"`checkpoints/{name}/`" for name in folders) +
                    " (`model.safetensors`: the weights; `state.pt`: optimizer, data position and RNG, for resuming).")
    else:
        uploaded = "; no checkpoints were uploaded."

    if isinstance(done.get("tokens"), float):
        tokens = f"{int(done['tokens']):,}"
    elif train and isinstance(train[-1].get("tokens"), float):
        tokens = f"{int(train[-1]['tokens']):,} (last logged step {train[-1]['step']}: the run did not finish)"
    else:
        tokens = "not measured"
    val_loss = f"{val[-1]['val_loss']:.4f} (step {val[-1]['step']})" if val else "not measured"
    if isinstance(done.get("train_time"), float):
        wall = f"{_duration(done['train_time'] / 1000)} (training only: validation, evals and saves excluded)"
    else:
        wall = "unknown: the log has no `done` line (the run did not finish)"
    if "gpu" in header or "device" in header:
        gpu = "CPU" if header.get("gpu", "none") == "none" else header["gpu"]
        hardware = f"{header.get('world_size', '1')} × {gpu} (device {header.get('device', '?')}, " \
                   f"torch {header.get('torch', '?')})"
    else:
        hardware = "unknown (no device:/gpu: line in the log)"

    rows = [("script", f"`{script}`"), ("run", f"`{run_name}`"), ("tokens seen", tokens),
            ("final val loss", val_loss)]
    if hellaswag:
        last = hellaswag[-1]
        rows.append(("HellaSwag acc", f"{last['hellaswag_acc']:.4f} ({int(last['hellaswag_correct'])}/"
                                      f"{int(last['hellaswag_total'])}, step {last['step']})"))
    rows += [("training time", wall), ("hardware", hardware)]
    if "model_params" in header:
        rows.append(("parameters", f"{int(float(header['model_params'])):,}"))

    fields = [k for k in MODEL_FIELDS if k in config] + [k for k in config if k not in MODEL_FIELDS and k != "script"]
    lines = [
        "---", "license: mit", "library_name: pytorch", "tags:", "- gpt2", "- nanogpt", "- pretraining", "---", "",
        f"# {repo_id.split('/')[-1]}", "",
        f"A GPT-2-style language model pretrained from scratch by `{script}` (run `{run_name}`). This repository "
        f"holds the run's resolved `config.json`, its full `log.txt`{uploaded}", "",
        "## Results", "", "| | |", "|---|---|", *[f"| {name} | {value} |" for name, value in rows], "",
        "## Model config", "", "| field | value |", "|---|---|", *[f"| {k} | {_cell(config[k])} |" for k in fields], "",
    ]
    if weights:
        lines += ["## Loading the weights", "", *_loading_snippet(repo_id, run_name, script, weights[-1]), ""]
    return "\n".join(lines)


def _loading_snippet(repo_id, run_name, script, weights):
    return f'''The weights load into the `GPT` class of the script that trained them (`{script}` from the project's
repository; importing it only defines things, it does not train):

```python
# hf download {repo_id} --local-dir {run_name}
# then put {script} in {run_name}/ too and run this there
import dataclasses
import importlib.util
import json
import sys

from safetensors.torch import load_model

spec = importlib.util.spec_from_file_location("gpt_script", "{script}")
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module  # dataclasses look their module up by name
spec.loader.exec_module(module)

with open("config.json") as f:
    config = json.load(f)
names = {{field.name for field in dataclasses.fields(module.Config)}}  # config.json also records "script"
model = module.GPT(module.Config(**{{k: v for k, v in config.items() if k in names}}))
# strict: a weight missing from the file, or one the model does not have, raises (a tied lm_head/wte matrix
# stored once is not missing: load_model knows the two names share it)
load_model(model, "{weights}", strict=True)
model.eval()
```'''.splitlines()


def hub_user(token):
    """The namespace for the default repo id: HF_USER, else the token's own user name (one Hub call)."""
    user = env("HF_USER")
    if user:
        return user
    from huggingface_hub import HfApi
    try:
        return HfApi(token=token).whoami()["name"]
    except Exception as e:  # any Hub or network failure: report it, the token redacted
        raise UploadError(f"could not get your user name from the Hub (set HF_USER or pass --repo-id): "
                          f"{type(e).__name__}: {redact(e, token)}") from None


def push(repo_id, plan, card, token, private=False, api=None):
    """Create the repo if missing and upload the plan in one commit (only additions: nothing is deleted).
    `api` is an HfApi (tests pass a fake). Returns the Hub's CommitInfo."""
    from huggingface_hub import CommitOperationAdd, HfApi
    api = api if api is not None else HfApi(token=token)
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=card.encode() if local is None else local)
                  for local, path in plan]
    n_checkpoints = len({path.split("/")[1] for _, path in plan if path.startswith("checkpoints/")})
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.create_commit(repo_id, operations, repo_type="model",
                                 commit_message=f"Upload run: config, log, model card, {n_checkpoints} checkpoint(s)")
    except Exception as e:  # HfHubHTTPError, network errors, ...: one line with the Hub's message
        raise UploadError(f"Hub upload to {repo_id} failed: {type(e).__name__}: {redact(e, token)}") from None


def _size(n_bytes):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024


def describe(repo_id, plan, card, private):
    """The plan as printed lines: each local path -> path_in_repo with its size."""
    sizes = [len(card.encode()) if local is None else os.path.getsize(local) for local, _ in plan]
    lines = [f"repo: {repo_id} ({'private' if private else 'public'} model repo, created if missing)"]
    lines += [f"  {local or '(generated model card)'} -> {path} ({_size(size)})"
              for (local, path), size in zip(plan, sizes)]
    lines.append(f"{len(plan)} files, {_size(sum(sizes))}, in one commit to {repo_id}")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=None,
                        help="run name under --runs-dir or a run directory (default: the newest run)")
    parser.add_argument("--runs-dir", default="runs", help="where runs live (the scripts' out_dir; default: runs)")
    parser.add_argument("--repo-id", default=None, help="Hub repo (default: {user}/gpt-3-small_{run_name})")
    parser.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps "
                                                                "its visibility)")
    parser.add_argument("--include-checkpoints", choices=("all", "newest", "none"), default="newest",
                        help="which checkpoints/step_NNNNNN/ folders to upload (default: newest)")
    parser.add_argument("--allow-no-checkpoint", action="store_true",
                        help="upload a run that has no checkpoint (config, log and card only; scripts save "
                             "checkpoints from 06 on)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would be uploaded where and the model card; touch nothing on the Hub")
    args = parser.parse_args(argv)

    token = env("HF_TOKEN")
    try:
        run_dir = find_run(args.run, args.runs_dir)
        if not checkpoints(run_dir):
            if not args.allow_no_checkpoint:
                raise UploadError(f"{run_dir} has no checkpoint (checkpoints/step_NNNNNN/model.safetensors), so "
                                  "the upload would hold no weights: train with --ckpt_every (steps 06 on), or "
                                  "pass --allow-no-checkpoint to upload the config, log and card alone")
            print(f"note: {run_dir} has no checkpoint (--allow-no-checkpoint): uploading config, log, card")
        plan = plan_upload(run_dir, args.include_checkpoints)
        if not args.dry_run and not token:
            raise UploadError("no Hub token: set HF_TOKEN to a write token (https://huggingface.co/settings/tokens), "
                              "or use --dry-run")
        repo_id = args.repo_id
        if repo_id is None:
            # A dry run stays offline: without HF_USER the user is shown as a placeholder.
            user = (env("HF_USER") or "<user>") if args.dry_run else hub_user(token)
            repo_id = f"{user}/gpt-3-small_{os.path.basename(os.path.abspath(run_dir))}"
        if "<user>" not in repo_id:
            from huggingface_hub.utils import HFValidationError, validate_repo_id
            try:
                validate_repo_id(repo_id)
            except HFValidationError as e:
                raise UploadError(f"bad repo id {repo_id!r} ({e}): pass a valid --repo-id") from None
        card = model_card(run_dir, repo_id, plan)
        if args.dry_run:
            print("dry run: nothing is uploaded")
            print("\n".join(describe(repo_id, plan, card, args.private)))
            if "<user>" in repo_id:
                print("(<user>: set HF_USER or pass --repo-id)")
            print(f"\n----- {CARD} -----\n{card}")
            return {"run_dir": run_dir, "repo_id": repo_id, "plan": plan, "card": card, "commit": None}
        print("\n".join(describe(repo_id, plan, card, args.private)))
        commit = push(repo_id, plan, card, token, private=args.private)
    except UploadError as e:
        sys.exit(f"error: {redact(e, token)}")
    print(f"pushed {len(plan)} files: https://huggingface.co/{repo_id}")
    return {"run_dir": run_dir, "repo_id": repo_id, "plan": plan, "card": card, "commit": commit}


if __name__ == "__main__":
    main()
