"""The files a fresh clone needs: tiny Shakespeare at the top level (so the README's quick demo runs offline), the
data/ folder's README, and a .gitignore that keeps what runs write out of git."""
import dataclasses
import hashlib
import os
import re
import subprocess

import pytest

from conftest import REPO, load_script

SHAKESPEARE_SHA256 = "53493bf304b639aba6a47400da75c58ce32372b378fd2cd9d16ee987aeb12e4e"


def git(*args):
    return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True)


needs_git = pytest.mark.skipif(git("rev-parse", "--git-dir").returncode != 0, reason="not a git checkout")


def test_tiny_shakespeare_is_at_the_top_level():
    with open(os.path.join(REPO, "input.txt"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == SHAKESPEARE_SHA256


@needs_git
def test_input_txt_and_data_readme_are_tracked_and_what_runs_write_is_ignored():
    assert git("ls-files", "--error-unmatch", "input.txt", "data/README.md").returncode == 0
    ignored = ["runs/20250101-120000/log.txt", "data/edu_fineweb10B/edufineweb_val_000000.npy",
               "data/mine/.progress.json"]
    kept = ["data/README.md", "input.txt"]
    result = git("check-ignore", "--no-index", *ignored, *kept)
    assert result.stdout.split() == ignored


def quick_start_script():
    """The script of the README's quick-start command (`python NN-....py --preset=demo`)."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        match = re.search(r"python3? (\S+\.py) --preset=demo", f.read())
    assert match, "the README's quick start names no `python NN-....py --preset=demo` command"
    return match.group(1)


def test_the_quick_demo_reads_the_committed_input_txt_offline(tmp_path, monkeypatch):
    """The demo's data is input.txt in the current folder: from the repo's root it is there, so the script never
    fetches it (conftest fails any connection). One step, one val batch, no samples or checkpoints: short and small."""
    script = quick_start_script()
    module = load_script(script)
    assert module.PRESETS["demo"]["data"] == "input.txt"
    fields = {field.name for field in dataclasses.fields(module.Config)}
    quick = {"max_steps": 1, "val_every": 0, "val_tokens": 1024, "sample_every": 0, "ckpt_every": 0,
             "out_dir": str(tmp_path), "run_name": "demo"}
    monkeypatch.chdir(REPO)
    result = module.main(["--preset=demo"] + [f"--{key}={value}" for key, value in quick.items() if key in fields])
    assert len(result["losses"]) == 1 and result["run_dir"] == os.path.join(str(tmp_path), "demo")
    assert not os.path.exists(os.path.join(REPO, "runs", "demo"))


def test_readme_set_up_shows_a_venv_and_both_installs():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        section = f.read().split("## Set up and try it", 1)[1].split("\n## ", 1)[0]
    for needed in ("python3 -m venv", "pip install -r requirements.txt",
                   "--index-url https://download.pytorch.org/whl/cpu", "CUDA", "offline"):
        assert needed in section, needed
    assert "fetched" not in section  # input.txt is committed
