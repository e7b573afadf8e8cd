"""--compile_cache=FILE (step 56, off by default): after the warm-up (or at the end of a run without one) rank 0 writes
torch.compile's artifacts to FILE, atomically, under a header with the torch version and the payload's sha256; the next
run loads them before anything compiles, so inductor finds its graphs instead of building them. A file of another
torch is skipped, a damaged one stops the run before any work with the fix, a folder for FILE is refused (a missing
folder is made), and off the step is its parent (step 55). One test goes through real inductor on the CPU: a fresh
cache's miss becomes a hit."""
import os

import pytest
import torch

from conftest import read_log
from lever_helpers import REAL_COMPILE, build, lever_and_parent, train, traced_run

lever, parent_step = lever_and_parent("compile_cache")


def cache_lines(run_dir):
    return [row["compile_cache"] for row in read_log(run_dir) if "compile_cache" in row]


def log_text(run_dir):
    with open(os.path.join(run_dir, "log.txt"), encoding="utf-8") as f:
        return f.read()


@pytest.fixture
def fake_artifacts(monkeypatch):
    """torch.compiler's save and load, recorded: dynamo's eager backend (traced_run) gives inductor nothing to save."""
    loaded = []
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"kernels and graphs", None))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", loaded.append)
    return loaded


def test_off_by_default_and_off_is_the_parent():
    assert lever.Config().compile_cache == "" and not hasattr(parent_step.Config, "compile_cache")
    model, cfg = build(lever)
    parent, parent_cfg = build(parent_step)
    assert train(model, cfg, lever, 3) == train(parent, parent_cfg, parent_step, 3)


def test_a_run_saves_after_its_warm_up_and_the_next_one_loads_first(monkeypatch, fake_artifacts, shakespeare, tmp_path):
    path = tmp_path / "compile_cache.bin"
    runs = tmp_path / "runs"
    runs.mkdir()
    first, _ = traced_run(lever, monkeypatch, shakespeare, runs, compile=True, compile_cache=path, kernel_warmup_steps=1)
    text = log_text(first["run_dir"])
    assert text.index("warmup_time:") < text.index("saved 18 bytes") < text.index("step:1/")
    assert not fake_artifacts and sorted(p.name for p in tmp_path.iterdir()) == ["compile_cache.bin", "runs"]
    with open(path, "rb") as f:
        assert f.readline() == lever.COMPILE_CACHE_MAGIC
    second, _ = traced_run(lever, monkeypatch, shakespeare, runs, compile=True, compile_cache=path,
                           kernel_warmup_steps=1)
    assert fake_artifacts == [b"kernels and graphs"]
    assert cache_lines(first["run_dir"])[0].endswith("none yet") and "loaded 18 bytes" in log_text(second["run_dir"])
    assert second["losses"] == first["losses"]


def test_without_a_warm_up_it_saves_at_the_end(monkeypatch, fake_artifacts, shakespeare, tmp_path):
    path = tmp_path / "cache.bin"
    result, _ = traced_run(lever, monkeypatch, shakespeare, tmp_path, compile=True, compile_cache=path,
                           kernel_warmup_steps=0)
    text = log_text(result["run_dir"])
    assert path.exists() and text.index("done steps:") < text.index("saved 18 bytes")


def test_another_torchs_file_is_skipped_and_a_damaged_one_stops_the_run(monkeypatch, fake_artifacts, tmp_path):
    path = tmp_path / "cache.bin"
    cfg = lever.Config(compile_cache=str(path))
    assert lever.load_compile_cache(cfg) == "none yet"
    lever.save_compile_cache(str(path))
    assert lever.load_compile_cache(cfg) == "loaded 18 bytes" and fake_artifacts == [b"kernels and graphs"]
    monkeypatch.setattr(lever.torch, "__version__", "2.0.0")
    assert lever.load_compile_cache(cfg).startswith("skipped: written by torch ")
    assert len(fake_artifacts) == 1
    intact = path.read_bytes()
    for damaged in (intact[:-3], b"#!/bin/sh\n", intact.replace(b'"sha256"', b'"sha512"'),
                    intact.replace(b'"torch"', b'"jax"'), b""):
        path.write_bytes(damaged)
        with pytest.raises(SystemExit, match=r"--compile_cache=.*cache.bin is not an intact compile cache .* delete it"):
            lever.load_compile_cache(cfg)
    assert len(fake_artifacts) == 1


def test_a_real_inductor_cache_round_trip(monkeypatch, tmp_path):
    """Inductor on the CPU: a function compiled into an empty cache misses; saved, then loaded into another empty cache
    in a fresh process state, the same function hits."""
    path = tmp_path / "cache.bin"

    def compile_once(cache_dir):
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache_dir))
        torch._dynamo.reset()
        torch._inductor.utils.clear_inductor_caches()
        torch._dynamo.utils.counters.clear()
        REAL_COMPILE(lambda x: (x.sin() * 3).relu(), backend="inductor")(torch.randn(8, 8))
        counters = torch._dynamo.utils.counters["inductor"]  # looked up after compiling, which may start new ones
        return counters["fxgraph_cache_hit"], counters["fxgraph_cache_miss"]

    with torch._inductor.config.patch(fx_graph_cache=True):
        torch.compiler.save_cache_artifacts()  # start the recording afresh: earlier tests compiled too
        assert compile_once(tmp_path / "first") == (0, 1)
        assert lever.save_compile_cache(str(path)) > 0
        assert compile_once(tmp_path / "empty") == (0, 1)  # no file loaded: an empty cache misses again
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "second"))  # a new machine's empty cache ...
        torch._dynamo.reset()
        torch._inductor.utils.clear_inductor_caches()
        assert lever.load_compile_cache(lever.Config(compile_cache=str(path))).startswith("loaded")
        assert compile_once(tmp_path / "second") == (1, 0)  # ... holds the graph once the file is loaded


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="--compile is off: set --compile=true, or --compile_cache="):
        lever.parse_config([f"--compile_cache={tmp_path / 'c.bin'}", "--compile=false"])
    with pytest.raises(SystemExit, match=f"--compile_cache={tmp_path} is a folder: name a file in it, e.g. "):
        lever.parse_config([f"--compile_cache={tmp_path}"])
    assert lever.parse_config([f"--compile_cache={tmp_path / 'c.bin'}"]).compile_cache == str(tmp_path / "c.bin")


def test_the_files_folder_is_made_when_it_is_written(fake_artifacts, tmp_path):
    """runs/compile_cache.bin on a fresh clone: runs/ does not exist before the first run."""
    path = tmp_path / "runs" / "compile_cache.bin"
    assert lever.parse_config([f"--compile_cache={path}"]).compile_cache == str(path)
    assert lever.load_compile_cache(lever.Config(compile_cache=str(path))) == "none yet"
    assert lever.save_compile_cache(str(path)) == 18 and path.read_bytes().startswith(lever.COMPILE_CACHE_MAGIC)
