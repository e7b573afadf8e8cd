"""Step 29's feature: with --log_source the run log starts with the script's own source, the resolved config and
the environment, which reproduce the run, and which the project's log readers skip."""
import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import REPO, load_script, logged_steps, read_log, scripts_from, tiny_args

sys.path.insert(0, REPO)
import runlog  # noqa: E402  (the project's one log reader, a repo-root module)

RUN = dict(max_steps=3, learning_rate=1e-2, warmup_steps=0, sample_every=0, ckpt_every=0)


@pytest.mark.parametrize("script", scripts_from(29))
def test_the_log_reproduces_the_run(script, shakespeare, tmp_path):
    module = load_script(script)
    result = module.main(tiny_args(script, shakespeare, tmp_path, run_name="first", log_source=True, **RUN))
    log_path = os.path.join(result["run_dir"], "log.txt")
    record = module.read_run_record(log_path)
    with open(os.path.join(REPO, script), encoding="utf-8") as f:
        assert record["source"] == f.read()  # the script itself, exactly
    with open(os.path.join(result["run_dir"], "config.json"), encoding="utf-8") as f:
        assert {**record["config"], "script": os.path.basename(script)} == json.load(f)  # the resolved config
    environment = record["environment"]
    assert environment["world_size"] == 1 and environment["devices"] == ["cpu"]
    assert {"python", "torch", "cuda", "cudnn", "platform"} <= set(environment)
    assert socket.gethostname() not in json.dumps(environment)
    with open(log_path, encoding="utf-8") as f:
        assert f.readline().startswith("====== source 29-add-self-logging-run-record.py")  # the log starts with it

    # Rerun: the source from the log, written to a file, run with the config from the log: the same losses.
    rerun = tmp_path / "rerun.py"
    rerun.write_text(record["source"], encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, str(rerun), *record["args"], "--run_name=again"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "| " not in done.stdout  # the record goes to the log only, not to the console
    again = os.path.join(tmp_path, "again")
    assert logged_steps(again) == logged_steps(result["run_dir"]) and len(logged_steps(again)) == 3
    assert logged_steps(again, "val_loss") == logged_steps(result["run_dir"], "val_loss")
    assert list(logged_steps(again).values()) == pytest.approx(result["losses"], abs=1e-6)
    assert module.read_run_record(os.path.join(again, "log.txt"))["config"]["run_name"] == "again"

    # The readers see the same run with the record as without it (its lines stripped from a copy of the log).
    with open(log_path, encoding="utf-8") as f:
        lines = f.readlines()
    end = lines.index("====== end of the run record ======\n")
    bare_dir = tmp_path / "bare"
    bare_dir.mkdir()
    (bare_dir / "log.txt").write_text("".join(lines[end + 1:]), encoding="utf-8")
    assert [row for row in read_log(result["run_dir"]) if "step" in row] == \
        [row for row in read_log(bare_dir) if "step" in row]
    assert runlog.parse_log(log_path) == runlog.parse_log(str(bare_dir / "log.txt"))


@pytest.mark.parametrize("script", scripts_from(29))
def test_off_by_default(script, shakespeare, tmp_path):
    module = load_script(script)
    assert module.parse_config([]).log_source is False  # the parent's log
    result = module.main(tiny_args(script, shakespeare, tmp_path, run_name="plain", max_steps=1, val_tokens=128,
                                   sample_every=0, ckpt_every=0))
    with open(os.path.join(result["run_dir"], "log.txt"), encoding="utf-8") as f:
        assert f.readline().startswith("script:")
    with pytest.raises(ValueError, match="no run record.*--log_source=true"):
        module.read_run_record(os.path.join(result["run_dir"], "log.txt"))
