"""Every lineage script trains: the loss falls, a single batch is memorised, the log and config are written."""
import json
import os

import pytest
import torch

from conftest import SCRIPTS, load_script, logged_steps, scripts_from, tiny_args


@pytest.mark.parametrize("script", scripts_from(1))
def test_loss_falls(script, shakespeare, tmp_path):
    module = load_script(script)
    result = module.main(tiny_args(script, shakespeare, tmp_path, max_steps=40, learning_rate=1e-2, warmup_steps=5))
    losses = result["losses"]
    assert len(losses) == 40
    assert losses[0] > 10.0  # ~ln(50257) for an untrained model
    assert sum(losses[-5:]) / 5 < losses[0] - 2.5, losses


@pytest.mark.parametrize("script", SCRIPTS)
def test_overfits_one_batch(script, shakespeare, tmp_path):
    """The model and optimizer can memorise one batch: the basic check that gradients reach every weight."""
    module = load_script(script)
    cfg = module.parse_config(tiny_args(script, shakespeare, tmp_path, learning_rate=1e-2, warmup_steps=0))
    torch.manual_seed(0)
    model = module.GPT(cfg)
    optimizer = module.configure_optimizer(model, cfg, "cpu")
    x = torch.randint(0, 50257, (4, 32))
    y = torch.randint(0, 50257, (4, 32))
    for _ in range(60):
        optimizer.zero_grad()
        loss = model(x, y)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


@pytest.mark.parametrize("script", scripts_from(1))
def test_run_dir_holds_config_and_full_log(script, shakespeare, tmp_path, capsys):
    module = load_script(script)
    result = module.main(tiny_args(script, shakespeare, tmp_path, max_steps=3, n_layer=1, run_name="r1"))
    run_dir = result["run_dir"]
    assert run_dir == os.path.join(str(tmp_path), "r1")
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    assert config["n_layer"] == 1 and config["script"] == script
    printed = [line for line in capsys.readouterr().out.splitlines() if line]
    with open(os.path.join(run_dir, "log.txt")) as f:
        logged = f.read().splitlines()
    assert logged == printed  # the log holds every line the run printed
    assert sorted(logged_steps(run_dir)) == [1, 2, 3]
    assert logged[-1].startswith("done steps:3")


@pytest.mark.parametrize("script", scripts_from(1))
def test_gradient_accumulation_matches_one_big_batch(script, shakespeare, tmp_path):
    """Micro-batches of 2 with 2 accumulation steps give the same losses and updates as a micro-batch of 4."""
    module = load_script(script)
    common = dict(max_steps=4, learning_rate=1e-2, warmup_steps=0)
    big = module.main(tiny_args(script, shakespeare, tmp_path / "big", batch_size=4, **common))
    accumulated = module.main(tiny_args(script, shakespeare, tmp_path / "acc", batch_size=2, **common))
    assert big["losses"] == pytest.approx(accumulated["losses"], abs=1e-4)
    big_norms = logged_steps(big["run_dir"], "grad_norm")
    acc_norms = logged_steps(accumulated["run_dir"], "grad_norm")
    assert list(big_norms.values()) == pytest.approx(list(acc_norms.values()), rel=1e-3)


@pytest.mark.parametrize("script", scripts_from(1))
def test_missing_input_offline_says_where_to_put_it(script, tmp_path, monkeypatch):
    module = load_script(script)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="input.txt"):
        module.main(tiny_args(script, "input.txt", tmp_path))  # the conftest network guard makes the download fail
    assert not os.path.exists(tmp_path / "input.txt")
