"""push_to_hub.py, offline: the run it picks, the upload plan, the model card (whose loading snippet is run), and the
Hub calls against a fake client that fails on anything but create_repo / create_commit / whoami."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file, save_model

from conftest import REPO, TINY, load_script, script_number, scripts_from, tiny_args

sys.path.insert(0, REPO)
import push_to_hub  # noqa: E402  (a repo-root tool, not a package)

FAKE_TOKEN = "hf_FAKEtoken1234567890abcdefSECRET"
RUN_NAME = "20250101-120000"

# ---------------------------------------------------------------------------------------------------------------
# A synthetic run, written exactly as the conventions lay a run directory out. Its "script" is a stand-in with the
# lineage's interface (a Config dataclass, a GPT module with tied lm_head/wte), so the card's snippet can run.

TINY_SCRIPT = '''\
"""Stand-in for a lineage script: the same Config / GPT interface, a few hundred parameters."""
from dataclasses import dataclass

from torch import nn


@dataclass
class Config:
    data: str = "input.txt"
    out_dir: str = "runs"
    run_name: str = ""
    seed: int = 1337
    vocab_size: int = 64
    block_size: int = 8
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 8
    max_steps: int = 4
    learning_rate: float = 6e-4
    ckpt_every: int = 2
    keep_last: int = 2


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList(nn.Linear(config.n_embd, config.n_embd) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as in GPT-2
'''

SYNTHETIC_CONFIG = {"data": "input.txt", "out_dir": "runs", "run_name": RUN_NAME, "seed": 1337, "vocab_size": 64,
                    "block_size": 8, "n_layer": 2, "n_head": 2, "n_embd": 8, "max_steps": 4, "learning_rate": 6e-4,
                    "ckpt_every": 2, "keep_last": 2, "script": "tiny_gpt.py"}

SYNTHETIC_LOG = f"""\
script:tiny_gpt.py
run_dir:runs/{RUN_NAME}
device:cuda:0 gpu:NVIDIA H100 80GB HBM3 torch:2.11.0+cu130 world_size:8
model_params:1234 grad_accum_steps:1 tokens_per_step:128
step:1/4 loss:10.000000 lr:1.0000e-03 grad_norm:1.5000 dt:100.0ms tok/s:1280 tokens:128 train_time:1000ms
step:2/4 loss:8.000000 lr:8.0000e-04 grad_norm:1.2000 dt:50.0ms tok/s:2560 tokens:256 train_time:1500ms
step:2/4 val_loss:8.500000 val_ppl:4914.77 tokens:256 train_time:1500ms
step:3/4 loss:7.000000 lr:5.0000e-04 grad_norm:1.1000 dt:50.0ms tok/s:2560 tokens:384 train_time:2000ms
step:4/4 loss:6.000000 lr:2.0000e-04 grad_norm:1.0000 dt:50.0ms tok/s:2560 tokens:512 train_time:2500ms
step:4/4 val_loss:6.543210 val_ppl:695.00 tokens:512 train_time:2500ms
step:4/4 hellaswag_acc:0.2500 hellaswag_correct:25 hellaswag_total:100
done steps:4 tokens:512 train_time:2500ms peak_mem:1234MiB
"""


def import_path(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def make_synthetic_run(runs_dir, name=RUN_NAME):
    """runs_dir/name/ with config.json, log.txt and checkpoints step_000002, step_000004, the weights saved by
    safetensors' save_model as the scripts save them (the tied matrix stored once)."""
    run_dir = os.path.join(runs_dir, name)
    os.makedirs(run_dir)
    config = dict(SYNTHETIC_CONFIG, run_name=name)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(run_dir, "log.txt"), "w") as f:
        f.write(SYNTHETIC_LOG)
    script = os.path.join(runs_dir, "tiny_gpt.py")
    if not os.path.exists(script):
        with open(script, "w") as f:
            f.write(TINY_SCRIPT)
    module = import_path(script, "synthetic_tiny_gpt")
    model = module.GPT(module.Config(**{k: v for k, v in config.items() if k != "script"}))
    for step in (2, 4):
        with torch.no_grad():
            for index, param in enumerate(model.parameters()):
                param.copy_(torch.full_like(param, step + index / 10))  # unlike any fresh init
        folder = os.path.join(run_dir, "checkpoints", f"step_{step:06d}")
        os.makedirs(folder)
        save_model(model, os.path.join(folder, "model.safetensors"))
        torch.save({"step": step}, os.path.join(folder, "state.pt"))
        shutil.copy(os.path.join(run_dir, "config.json"), os.path.join(folder, "config.json"))
    os.makedirs(os.path.join(run_dir, "checkpoints", "step_000006.tmp"))  # a save in progress: not a checkpoint
    return run_dir


@pytest.fixture
def synthetic_run(tmp_path):
    return make_synthetic_run(str(tmp_path / "runs"))


# Real tiny CPU runs of the lead's scripts, once they exist: 01 (baseline), 04 (validation), 06 (checkpoints). The
# parameter lists below are built at collection time, so these cases exist exactly when the scripts do.
_real_runs = {}


def real_run(script, tmp_path_factory, shakespeare):
    """Run the script once per module; returns its run directory. Checkpoints at steps 2, 4 and 5, each ~10 MB
    (the 50,304-token embedding and its AdamW moments): remove_real_runs deletes them after the module."""
    if script not in _real_runs:
        checkpointing = dict(ckpt_every=2, keep_last=10) if script_number(script) >= 6 else {}
        args = tiny_args(script, shakespeare, str(tmp_path_factory.mktemp("runs")), run_name="tiny", n_embd=16,
                         **checkpointing)
        _real_runs[script] = load_script(script).main(args)["run_dir"]
    return _real_runs[script]


@pytest.fixture(scope="module", autouse=True)
def remove_real_runs():
    """Nothing large outlives a passing run: pytest keeps tmp folders of the last runs, so delete the checkpoints."""
    yield
    for run_dir in _real_runs.values():
        shutil.rmtree(run_dir, ignore_errors=True)
    _real_runs.clear()


REAL_RUNS = scripts_from(1, 1) + scripts_from(4, 4) + scripts_from(6, 6)
CHECKPOINT_RUNS = scripts_from(6, 6)


@pytest.fixture(params=["synthetic"] + REAL_RUNS)
def any_run(request, tmp_path, tmp_path_factory, shakespeare):
    """(run_dir, source): the synthetic run, then each real tiny run that can be made."""
    if request.param == "synthetic":
        return make_synthetic_run(str(tmp_path / "runs")), "synthetic"
    return real_run(request.param, tmp_path_factory, shakespeare), request.param


# ---------------------------------------------------------------------------------------------------------------
# A fake Hub client: records what it is asked; anything else (delete_*, upload_folder, ...) is a failure.

class FakeHub:
    def __init__(self, fail_with=None, user="alice"):
        self.calls, self.forbidden, self.tokens = [], [], []
        self.fail_with, self.user = fail_with, user

    def client(self, token=None, **kwargs):
        """Stands in for huggingface_hub.HfApi(token=...)."""
        self.tokens.append(token)
        return self

    def whoami(self, token=None):
        self.calls.append(("whoami",))
        return {"name": self.user}

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", repo_id, list(operations), kwargs))
        if self.fail_with:
            raise self.fail_with
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc", oid="abc")

    def __getattr__(self, name):
        self.forbidden.append(name)
        raise AssertionError(f"push_to_hub called HfApi.{name}: only whoami, create_repo, create_commit are allowed")


def hub_error(message):
    """A real HfHubHTTPError (it wants a response object: headers and request are all it reads)."""
    from huggingface_hub.errors import HfHubHTTPError
    return HfHubHTTPError(message, response=SimpleNamespace(headers={}, request=None))


@pytest.fixture(autouse=True)
def hub_env(monkeypatch):
    """No token or user from the machine running the tests; any real HfApi use fails."""
    for name in ("HF_TOKEN", "hf_token", "HF_USER", "hf_user"):
        monkeypatch.delenv(name, raising=False)

    def no_real_hub(*args, **kwargs):
        raise AssertionError("the real Hub client was created")
    monkeypatch.setattr(huggingface_hub, "HfApi", no_real_hub)


@pytest.fixture
def fake_hub(monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.client)
    return hub


# ---------------------------------------------------------------------------------------------------------------
# Which run

def test_find_run_default_is_the_newest_run(tmp_path):
    runs_dir = str(tmp_path / "runs")
    older, newer = make_synthetic_run(runs_dir, "20250101-120000"), make_synthetic_run(runs_dir, "20250102-090000")
    os.makedirs(os.path.join(runs_dir, "not-a-run"))  # no config.json
    os.utime(os.path.join(older, "config.json"), (1_000, 1_000))
    os.utime(os.path.join(newer, "config.json"), (2_000, 2_000))
    assert push_to_hub.find_run(None, runs_dir) == newer
    os.utime(os.path.join(older, "config.json"), (3_000, 3_000))  # started later despite its name
    assert push_to_hub.find_run(None, runs_dir) == older
    os.utime(os.path.join(newer, "config.json"), (3_000, 3_000))  # same time: the later name wins
    assert push_to_hub.find_run(None, runs_dir) == newer


def test_find_run_default_skips_unfinished_runs_and_says_which_it_picked(tmp_path, capsys):
    runs_dir = str(tmp_path / "runs")
    finished = make_synthetic_run(runs_dir, "20250101-120000")
    running = make_synthetic_run(runs_dir, "20250102-090000")  # newer, but still training: no done line
    with open(os.path.join(running, "log.txt"), "w") as f:
        f.write(SYNTHETIC_LOG.split("done ")[0])
    no_log = make_synthetic_run(runs_dir, "20250103-090000")  # crashed before its first line
    os.remove(os.path.join(no_log, "log.txt"))
    os.utime(os.path.join(finished, "config.json"), (1_000, 1_000))
    assert push_to_hub.find_run(None, runs_dir) == finished
    assert capsys.readouterr().out == (f"run: {finished} (the newest finished run in {runs_dir}/; 2 unfinished "
                                       "skipped; --run picks another)\n")
    assert push_to_hub.find_run(running, runs_dir) == running  # named explicitly: taken as it is
    assert capsys.readouterr().out == ""
    shutil.rmtree(finished)
    with pytest.raises(push_to_hub.UploadError, match=r"no finished runs in .* \(2 unfinished"):
        push_to_hub.find_run(None, runs_dir)


def test_find_run_by_name_or_path(synthetic_run, tmp_path):
    runs_dir = os.path.dirname(synthetic_run)
    assert push_to_hub.find_run(RUN_NAME, runs_dir) == os.path.join(runs_dir, RUN_NAME)
    assert push_to_hub.find_run(synthetic_run, str(tmp_path / "elsewhere")) == synthetic_run


# ---------------------------------------------------------------------------------------------------------------
# The upload plan

CHECKPOINT_FILES = ["config.json", "model.safetensors", "state.pt"]


@pytest.mark.parametrize("include, steps", [("newest", [4]), ("all", [2, 4]), ("none", [])])
def test_plan_upload_exact_paths(synthetic_run, include, steps):
    plan = push_to_hub.plan_upload(synthetic_run, include)
    expected = [(os.path.join(synthetic_run, "config.json"), "config.json"),
                (os.path.join(synthetic_run, "log.txt"), "log.txt"),
                (None, "README.md")]
    expected += [(os.path.join(synthetic_run, "checkpoints", f"step_{step:06d}", name),
                  f"checkpoints/step_{step:06d}/{name}") for step in steps for name in CHECKPOINT_FILES]
    assert plan == expected


@pytest.mark.parametrize("include", ["newest", "all", "none"])
def test_plan_upload_of_any_run(any_run, include):
    """Real runs too: the three files, then every file of the chosen step_NNNNNN folders, same relative paths."""
    run_dir, source = any_run
    folders = sorted(name for name in os.listdir(os.path.join(run_dir, "checkpoints"))
                     if name.startswith("step_") and name[5:].isdigit()) \
        if os.path.isdir(os.path.join(run_dir, "checkpoints")) else []
    chosen = {"newest": folders[-1:], "all": folders, "none": []}[include]
    expected = [f"checkpoints/{folder}/{name}" for folder in chosen
                for name in sorted(os.listdir(os.path.join(run_dir, "checkpoints", folder)))]
    plan = push_to_hub.plan_upload(run_dir, include)
    assert [path for _, path in plan] == ["config.json", "log.txt", "README.md"] + expected
    for local, path in plan:
        assert local is None or os.path.samefile(local, os.path.join(run_dir, path))
    if source in CHECKPOINT_RUNS:  # --ckpt_every=2 over 5 steps: 'all' is more than 'newest'
        assert len(folders) >= 2 and len(push_to_hub.checkpoints(run_dir)) == len(folders)


# ---------------------------------------------------------------------------------------------------------------
# The model card

def test_model_card_of_synthetic_run(synthetic_run):
    plan = push_to_hub.plan_upload(synthetic_run, "all")
    card = push_to_hub.model_card(synthetic_run, f"alice/gpt-3-small_{RUN_NAME}", plan)
    assert card.startswith("---\nlicense: mit\nlibrary_name: pytorch\ntags:\n- gpt2\n- nanogpt\n- pretraining\n---\n")
    assert f"# gpt-3-small_{RUN_NAME}" in card
    assert "| tokens seen | 512 |" in card
    assert "| final val loss | 6.5432 (step 4) |" in card  # the last val line
    assert "| HellaSwag acc | 0.2500 (25/100, step 4) |" in card
    assert "| training time | 2.5 s" in card
    assert "| hardware | 8 × NVIDIA H100 80GB HBM3 (device cuda:0, torch 2.11.0+cu130) |" in card
    assert "| parameters | 1,234 |" in card
    assert "`tiny_gpt.py`" in card
    for field in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        assert f"| {field} | `{SYNTHETIC_CONFIG[field]}` |" in card
    assert '| data | `"input.txt"` |' in card and "| learning_rate | `0.0006` |" in card
    assert "| script |" not in card.split("## Model config")[1].split("##")[0]  # not a Config field
    assert "`checkpoints/step_000002/`" in card and "`checkpoints/step_000004/`" in card
    assert 'load_model(model, "checkpoints/step_000004/model.safetensors"' in card  # the newest weights


def test_model_card_of_unfinished_run_without_val_or_checkpoints(tmp_path):
    run_dir = make_synthetic_run(str(tmp_path / "runs"))
    with open(os.path.join(run_dir, "log.txt"), "w") as f:
        f.write("device:cpu gpu:none torch:2.13.0 world_size:1\n"
                "step:1/9 loss:10.0 lr:1e-3 tok/s:10 tokens:128 train_time:100ms\n"
                "step:2/9 loss:9.0 lr:1e-3 tok/s:10 tokens:256 train_time:200ms\n")
    card = push_to_hub.model_card(run_dir, "alice/x", push_to_hub.plan_upload(run_dir, "none"))
    assert "| final val loss | not measured |" in card
    assert "HellaSwag" not in card
    assert "| tokens seen | 256 (last logged step 2: the run did not finish) |" in card
    assert "| training time | unknown" in card
    assert "| hardware | 1 × CPU" in card
    assert "no checkpoints were uploaded" in card and "load_model" not in card


def test_model_card_of_any_run(any_run):
    run_dir, source = any_run
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    log = push_to_hub.runlog.parse_log(os.path.join(run_dir, "log.txt"))
    card = push_to_hub.model_card(run_dir, "alice/gpt-3-small_x", push_to_hub.plan_upload(run_dir))
    assert f"`{config['script']}`" in card
    if source != "synthetic":
        assert config["script"] == source
        tokens = TINY["max_steps"] * TINY["total_batch_size"]  # from the done line
        assert f"| tokens seen | {tokens:,} |" in card
        assert "| training time | " in card and "unknown" not in card
        assert "| n_layer | `2` |" in card and "| n_embd | `16` |" in card and "| block_size | `32` |" in card
    if log["val"]:
        assert f"| final val loss | {log['val'][-1]['val_loss']:.4f} (step {log['val'][-1]['step']}) |" in card
    else:
        assert "| final val loss | not measured |" in card
    if source != "synthetic" and script_number(source) >= 4:
        assert log["val"], "validation runs at least at the end from 04 on"
    assert ("load_model(" in card) == bool(push_to_hub.checkpoints(run_dir))


def extract_snippet(card):
    return card.split("```python\n", 1)[1].split("\n```", 1)[0]


def download_and_run_snippet(run_dir, script_path, folder, monkeypatch, edit_weights=None):
    """Lay the uploaded files out in `folder` as `hf download` would, add the script, optionally change the
    weights file (edit_weights(dict of tensors) -> dict), and run the card's snippet; returns (namespace, plan)."""
    plan = push_to_hub.plan_upload(run_dir, "newest")
    card = push_to_hub.model_card(run_dir, "alice/gpt-3-small_x", plan)
    for local, path in plan:
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        if local is None:
            (folder / path).write_text(card)
        elif path.endswith("/model.safetensors") and edit_weights:
            save_file(edit_weights(load_file(local)), folder / path)
        elif not path.endswith("/state.pt"):  # the optimizer state: not read by the snippet, the largest file
            shutil.copy(local, folder / path)
    with open(os.path.join(run_dir, "config.json")) as f:
        shutil.copy(script_path, folder / json.load(f)["script"])
    monkeypatch.chdir(folder)
    monkeypatch.delitem(sys.modules, "gpt_script", raising=False)
    namespace = {}
    try:
        exec(extract_snippet(card), namespace)
    finally:
        sys.modules.pop("gpt_script", None)
    return namespace, plan


@pytest.mark.parametrize("source", ["synthetic"] + CHECKPOINT_RUNS)
def test_model_card_snippet_loads_the_weights(source, tmp_path, tmp_path_factory, shakespeare, monkeypatch):
    """The model the card's snippet builds holds exactly the newest checkpoint's weights."""
    if source == "synthetic":
        run_dir = make_synthetic_run(str(tmp_path / "runs"))
        script_path = os.path.join(tmp_path, "runs", "tiny_gpt.py")
    else:
        run_dir = real_run(source, tmp_path_factory, shakespeare)
        script_path = os.path.join(REPO, source)
    download = tmp_path / "download"
    namespace, plan = download_and_run_snippet(run_dir, script_path, download, monkeypatch)
    model = namespace["model"]
    weights = load_file(next(local for local, path in plan if path.endswith("/model.safetensors")))
    state = model.state_dict()
    for name, tensor in weights.items():
        assert torch.equal(state[name], tensor), name
    assert not model.training
    shutil.rmtree(download)  # megabytes of weights: not kept in pytest's tmp folders


def drop_a_block_weight(weights):
    name = next(name for name in sorted(weights) if ".h.0." in name or ".h.1." in name)
    return {key: value for key, value in weights.items() if key != name}


@pytest.mark.parametrize("mismatch, edit, message", [
    ("missing", drop_a_block_weight, "Missing key"),
    ("unexpected", lambda weights: {**weights, "transformer.h.9.extra.weight": torch.zeros(2)}, "Unexpected key"),
])
@pytest.mark.parametrize("script", CHECKPOINT_RUNS)
def test_model_card_snippet_fails_loudly_on_mismatched_keys(script, mismatch, edit, message, tmp_path,
                                                            tmp_path_factory, shakespeare, monkeypatch):
    """A checkpoint whose keys do not match the model (a weight missing, or one the model lacks) must raise, not
    leave a half-initialized model behind."""
    run_dir = real_run(script, tmp_path_factory, shakespeare)
    download = tmp_path / "download"
    with pytest.raises(RuntimeError, match=message):
        download_and_run_snippet(run_dir, os.path.join(REPO, script), download, monkeypatch, edit)
    shutil.rmtree(download)


# ---------------------------------------------------------------------------------------------------------------
# Hub calls (fake client)

def test_push_creates_repo_and_commits_the_plan_without_deleting(synthetic_run):
    hub = FakeHub()
    plan = push_to_hub.plan_upload(synthetic_run, "all")
    card = push_to_hub.model_card(synthetic_run, "alice/run", plan)
    push_to_hub.push("alice/run", plan, card, FAKE_TOKEN, private=True, api=hub)
    assert hub.calls[0] == ("create_repo", "alice/run", {"private": True, "exist_ok": True, "repo_type": "model"})
    (name, repo_id, operations, kwargs), = hub.calls[1:]
    assert (name, repo_id, kwargs["repo_type"]) == ("create_commit", "alice/run", "model")
    assert [op.path_in_repo for op in operations] == [path for _, path in plan]
    for op, (local, _) in zip(operations, plan):
        assert op.path_or_fileobj == (card.encode() if local is None else os.path.normpath(local))
    assert hub.forbidden == []


def test_main_pushes_newest_run_with_user_from_whoami(synthetic_run, fake_hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    result = push_to_hub.main([f"--runs-dir={os.path.dirname(synthetic_run)}", "--private",
                               "--include-checkpoints=all"])
    repo_id = f"alice/gpt-3-small_{RUN_NAME}"
    assert result["repo_id"] == repo_id
    assert fake_hub.tokens and set(fake_hub.tokens) == {FAKE_TOKEN}
    assert [call[0] for call in fake_hub.calls] == ["whoami", "create_repo", "create_commit"]
    assert fake_hub.calls[1] == ("create_repo", repo_id, {"private": True, "exist_ok": True, "repo_type": "model"})
    committed = [op.path_in_repo for op in fake_hub.calls[2][2]]
    assert committed == ["config.json", "log.txt", "README.md"] + [
        f"checkpoints/step_{step:06d}/{name}" for step in (2, 4) for name in CHECKPOINT_FILES]
    assert fake_hub.forbidden == []
    out, err = capsys.readouterr()
    assert FAKE_TOKEN not in out + err
    assert f"https://huggingface.co/{repo_id}" in out


def test_main_user_and_token_from_lower_case_env_and_repo_id_flag(synthetic_run, fake_hub, monkeypatch):
    monkeypatch.setenv("hf_token", FAKE_TOKEN)
    monkeypatch.setenv("hf_user", "bob")
    result = push_to_hub.main([f"--run={synthetic_run}", "--include-checkpoints=none"])
    assert result["repo_id"] == f"bob/gpt-3-small_{RUN_NAME}" and ("whoami",) not in fake_hub.calls
    assert fake_hub.calls[0][2]["private"] is False
    assert [op.path_in_repo for op in fake_hub.calls[1][2]] == ["config.json", "log.txt", "README.md"]
    push_to_hub.main([f"--run={synthetic_run}", "--repo-id=carol/my-model"])
    assert fake_hub.calls[-1][1] == "carol/my-model"


@pytest.mark.parametrize("failing", ["create_commit", "whoami"])
def test_hub_error_is_one_line_without_the_token(synthetic_run, fake_hub, monkeypatch, capsys, failing):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    error = hub_error(f"401 Client Error: Unauthorized for token {FAKE_TOKEN} (Invalid credentials)")
    if failing == "create_commit":
        fake_hub.fail_with = error
    else:
        def whoami(*args, **kwargs):
            raise error
        monkeypatch.setattr(fake_hub, "whoami", whoami, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        push_to_hub.main([f"--runs-dir={os.path.dirname(synthetic_run)}"])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert "401 Client Error: Unauthorized" in message and "HfHubHTTPError" in message
    out, err = capsys.readouterr()
    assert FAKE_TOKEN not in message + out + err
    assert fake_hub.forbidden == []


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs

def test_run_without_checkpoint_is_refused_unless_allowed(synthetic_run, fake_hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    shutil.rmtree(os.path.join(synthetic_run, "checkpoints"))
    with pytest.raises(SystemExit) as exit_info:
        push_to_hub.main([f"--run={synthetic_run}", "--repo-id=alice/x"])
    assert str(exit_info.value.code).startswith(f"error: {synthetic_run} has no checkpoint") and \
        "--allow-no-checkpoint" in str(exit_info.value.code)
    assert fake_hub.calls == []
    result = push_to_hub.main([f"--run={synthetic_run}", "--repo-id=alice/x", "--allow-no-checkpoint"])
    assert [path for _, path in result["plan"]] == ["config.json", "log.txt", "README.md"]
    assert [call[0] for call in fake_hub.calls] == ["create_repo", "create_commit"]
    assert "has no checkpoint (--allow-no-checkpoint)" in capsys.readouterr().out


@pytest.mark.parametrize("case, message", [
    ("no runs", "no finished runs in"),
    ("no runs dir", "no finished runs in"),
    ("unknown run", "unknown run 'nope'"),
    ("no config", "has no config.json"),
    ("no log", "has no log.txt"),
    ("no token", "no Hub token: set HF_TOKEN"),
    ("bad repo id", "bad repo id"),
])
def test_bad_input_is_a_clear_error(tmp_path, case, message, monkeypatch):
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    argv = [f"--runs-dir={runs_dir}"]
    if case != "no token":
        monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)  # so the run problem, not the token, is what fails
    if case == "no runs dir":
        argv = [f"--runs-dir={tmp_path / 'nowhere'}"]
    elif case == "unknown run":
        make_synthetic_run(str(runs_dir))
        argv.append("--run=nope")
    elif case in ("no config", "no log"):
        run_dir = make_synthetic_run(str(runs_dir))
        os.remove(os.path.join(run_dir, "log.txt" if case == "no log" else "config.json"))
        argv.append(f"--run={RUN_NAME}")
    elif case in ("no token", "bad repo id"):
        make_synthetic_run(str(runs_dir))
        argv.append("--repo-id=alice/bad..name" if case == "bad repo id" else "--repo-id=alice/x")
    with pytest.raises(SystemExit) as exit_info:  # the autouse fixture fails any Hub client creation
        push_to_hub.main(argv)
    assert str(exit_info.value.code).startswith("error: ") and message in str(exit_info.value.code)
    if case == "unknown run":
        assert RUN_NAME in str(exit_info.value.code)  # lists the runs there are


def test_expected_error_exits_non_zero_without_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("hf_token", "hf_user")}
    result = subprocess.run([sys.executable, os.path.join(REPO, "push_to_hub.py"), f"--runs-dir={tmp_path}"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: no finished runs in {tmp_path}/: train one first "
                                                  "(e.g. python 01-gpt2-baseline.py), point --runs-dir at the "
                                                  "out_dir you trained with, or name a run with --run"]


# ---------------------------------------------------------------------------------------------------------------
# Dry run

@pytest.mark.parametrize("user", [None, "bob"])
def test_dry_run_prints_the_plan_and_never_calls_the_hub(synthetic_run, capsys, monkeypatch, user):
    if user:
        monkeypatch.setenv("HF_USER", user)
    result = push_to_hub.main([f"--runs-dir={os.path.dirname(synthetic_run)}", "--dry-run",
                               "--include-checkpoints=all"])  # no token; the autouse fixture fails any Hub client
    out, _ = capsys.readouterr()
    repo_id = f"{user or '<user>'}/gpt-3-small_{RUN_NAME}"
    assert result["repo_id"] == repo_id and f"repo: {repo_id}" in out
    assert len(result["plan"]) == 3 + 2 * len(CHECKPOINT_FILES)
    for local, path in result["plan"]:
        assert f"  {local or '(generated model card)'} -> {path} (" in out
        if local is not None and os.path.getsize(local) < 1024:
            assert f"-> {path} ({os.path.getsize(local)} B)" in out
    assert result["card"] in out
