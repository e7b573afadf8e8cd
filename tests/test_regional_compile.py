"""--compile_scope (step 43, off by default: it trades tokens/s for compile time): with compile on, `blocks` compiles each transformer block and the
head (final norm, LM head, loss) as regions of their own instead of the whole model as one graph. Here with dynamo's
eager backend (the regions are traced; nothing goes to inductor, so the test takes seconds): the right regions, the
same losses as an uncompiled run, nothing traced again after the first steps; `model` (the default) is step 42's."""
import pytest
import torch

from lever_helpers import build, lever_and_parent, train
from lever_helpers import traced_run as traced_step_run

lever, parent_step = lever_and_parent("compile_scope")


def traced_run(monkeypatch, shakespeare, tmp_path, **overrides):
    return traced_step_run(lever, monkeypatch, shakespeare, tmp_path, **overrides)


def test_off_by_default_and_off_is_the_parent():
    assert lever.Config().compile_scope == "model" and not hasattr(parent_step.Config, "compile_scope")
    model, cfg = build(lever)
    parent, parent_cfg = build(parent_step)
    assert train(model, cfg, lever, 3) == train(parent, parent_cfg, parent_step, 3)


def test_blocks_compiles_each_block_and_the_head(monkeypatch, shakespeare, tmp_path):
    eager, _ = traced_run(monkeypatch, shakespeare, tmp_path, compile=False)
    whole, whole_compiled = traced_run(monkeypatch, shakespeare, tmp_path, compile=True)
    torch._dynamo.reset()
    regions, compiled = traced_run(monkeypatch, shakespeare, tmp_path, compile=True, compile_scope="blocks")
    model = regions["model"]
    assert [type(fn).__name__ for fn in whole_compiled] == ["GPT"]  # the default: one graph of the whole model
    owners = [getattr(fn, "__self__", None) for fn in compiled]
    assert owners == list(model.transformer.h) + [model]  # each block's call, then the model's head
    assert [fn.__name__ for fn in compiled] == ["_call_impl"] * len(model.transformer.h) + ["head"]
    assert regions["losses"] == pytest.approx(eager["losses"], abs=1e-5)
    assert regions["val_losses"] == pytest.approx(eager["val_losses"], abs=1e-5)
    assert whole["losses"] == pytest.approx(eager["losses"], abs=1e-5)


def test_regions_are_traced_once(monkeypatch, shakespeare, tmp_path):
    """After the first training step and the first validation, no region is traced again (a new mask each step
    must not recompile a block)."""
    graphs = torch._dynamo.utils.counters["stats"]  # cumulative over the test session: count differences
    traced = []
    for steps in (2, 6):
        torch._dynamo.reset()
        before = graphs["unique_graphs"]
        traced_run(monkeypatch, shakespeare, tmp_path, compile=True, compile_scope="blocks", max_steps=steps,
                   val_every=1)
        traced.append(graphs["unique_graphs"] - before)
    assert traced[0] > 0 and traced[1] == traced[0]


def test_bad_scopes_are_refused():
    with pytest.raises(SystemExit, match="--compile_scope='layers' is not one of: model, blocks"):
        lever.parse_config(["--compile_scope=layers"])


def test_samples_run_the_regions_eagerly(monkeypatch, shakespeare, tmp_path):
    """Samples grow a token per forward through raw_model, whose blocks are compiled in place: they must not trace
    a graph for each new length."""
    graphs = torch._dynamo.utils.counters["stats"]
    traced = []
    for sample_every in (0, 2):
        torch._dynamo.reset()
        before = graphs["unique_graphs"]
        traced_run(monkeypatch, shakespeare, tmp_path, compile=True, compile_scope="blocks", sample_every=sample_every,
                   sample_max_tokens=8, sample_min_tokens=4)
        traced.append(graphs["unique_graphs"] - before)
    assert traced[0] > 0 and traced[1] == traced[0]
