"""The config of every lineage script: --key=value overrides typed by field, bad input rejected early by name."""
import dataclasses
import os
import subprocess
import sys

import pytest

from conftest import REPO, SCRIPTS, load_script


@pytest.mark.parametrize("script", SCRIPTS)
def test_overrides_are_parsed_with_the_field_type(script):
    module = load_script(script)
    # 16 layers: step 34's default 2 value-embedding tables need 2 x 2 blocks (tests/test_value_embeddings.py), and
    # step 51's default block lists name blocks up to 11
    cfg = module.parse_config(["--n_layer=16", "--learning_rate=1e-3", "--compile=true", "--data=x.txt",
                               "--run-name=abc"])
    assert (cfg.n_layer, cfg.learning_rate, cfg.compile, cfg.data, cfg.run_name) == (16, 1e-3, True, "x.txt", "abc")
    assert isinstance(cfg.n_layer, int) and isinstance(cfg.learning_rate, float)
    assert module.parse_config(["--compile=0"]).compile is False
    assert module.parse_config([]) == module.Config()


@pytest.mark.parametrize("script", SCRIPTS)
def test_preset_first_then_explicit_values(script):
    module = load_script(script)
    demo = module.PRESETS["demo"]
    cfg = module.parse_config(["--n_layer=7", "--preset=demo"])
    assert cfg.n_layer == 7  # the command line's own values win, whatever their order
    assert cfg.n_embd == demo["n_embd"] != module.Config().n_embd


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("argv, message", [
    (["--n_layer=two"], "--n_layer='two' is not a valid int"),
    (["--learning_rate=fast"], "--learning_rate='fast' is not a valid float"),
    (["--compile=maybe"], "--compile='maybe' is not a valid bool"),
    (["--n_layers=3"], "unknown field --n_layers"),
    (["n_layer=3"], "not of the form --key=value"),
    (["--preset=huge"], "--preset='huge' is unknown"),
    (["--n_embd=100", "--n_head=3"], "--n_embd=100 is not divisible by --n_head=3"),
    (["--total_batch_size=1000"], "--total_batch_size=1000 is not a multiple of"),
    (["--max_steps=0"], "--max_steps=0 must be positive"),
    (["--vocab_size=1000"], "--vocab_size=1000"),
    (["--device=tpu"], "--device='tpu'"),
])
def test_bad_values_name_the_field(script, argv, message):
    module = load_script(script)
    with pytest.raises(SystemExit) as error:
        module.parse_config(argv)
    assert message in str(error.value)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_field_and_import_does_nothing(script, tmp_path):
    done = subprocess.run([sys.executable, os.path.join(REPO, script), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    module = load_script(script)
    comments = module.field_comments()
    for field in dataclasses.fields(module.Config):
        assert f"--{field.name}=" in done.stdout
        assert comments.get(field.name), f"field {field.name} has no comment"
    assert os.listdir(tmp_path) == []  # no run directory, no download
