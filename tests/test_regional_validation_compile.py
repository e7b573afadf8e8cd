"""--val_compile_scope (step 54, `blocks` by default): with the whole model compiled for training, `blocks` validates
through a second view of the same model whose blocks and head are compiled regions, so validation does not cost a
second whole-model compile. Here with dynamo's eager backend (traced, nothing goes to inductor): training still
compiles the whole model once; validation goes through the regions, shares every weight (its losses are the eager
run's at every validation, after training moved the weights), traces nothing after its first call; raw_model stays
uncompiled for samples; `same` is step 53."""
import pytest
import torch

from lever_helpers import build, lever_and_parent, train
from lever_helpers import traced_run as traced_step_run

lever, parent_step = lever_and_parent("val_compile_scope")


def traced_run(monkeypatch, shakespeare, tmp_path, **overrides):
    return traced_step_run(lever, monkeypatch, shakespeare, tmp_path, **{"val_target": 0.0, **overrides})


def test_on_by_default_and_off_is_the_parent():
    assert lever.Config().val_compile_scope == "blocks" and not hasattr(parent_step.Config, "val_compile_scope")
    model, cfg = build(lever, val_compile_scope="same")
    parent, parent_cfg = build(parent_step)
    assert train(model, cfg, lever, 3) == train(parent, parent_cfg, parent_step, 3)


def test_validation_runs_the_regions_and_training_the_whole_model(monkeypatch, shakespeare, tmp_path):
    eager, _ = traced_run(monkeypatch, shakespeare, tmp_path, compile=False)
    whole, whole_compiled = traced_run(monkeypatch, shakespeare, tmp_path, compile=True, val_compile_scope="same")
    torch._dynamo.reset()
    regional, compiled = traced_run(monkeypatch, shakespeare, tmp_path, compile=True, kernel_warmup_steps=1)
    model = regional["model"]
    assert [type(fn).__name__ for fn in whole_compiled] == ["GPT"]  # same (step 53): one graph for both
    assert compiled[0] is model  # training: the whole model, as before
    blocks, head = compiled[1:-1], compiled[-1]
    assert blocks == list(model.transformer.h)  # validation: each of raw_model's own blocks ...
    view = head.__self__  # ... and the head of a second GPT object holding the same tensors
    assert head.__name__ == "head" and view is not model and type(view) is type(model)
    assert [id(p) for p in view.parameters()] == [id(p) for p in model.parameters()] and view.window is model.window
    assert all(type(block) is lever.Block for block in model.transformer.h)  # raw_model is left uncompiled
    assert "head" not in vars(model)
    assert regional["losses"] == pytest.approx(eager["losses"], abs=1e-5)
    assert len(regional["val_losses"]) == len(eager["val_losses"]) == 3  # steps 0, 2, 4: weights that moved
    assert regional["val_losses"] == pytest.approx(eager["val_losses"], abs=1e-5)
    assert whole["val_losses"] == pytest.approx(eager["val_losses"], abs=1e-5)


def test_validations_trace_nothing_new(monkeypatch, shakespeare, tmp_path):
    """After the warm-up's validation, neither more validations nor the training steps between them trace a graph."""
    graphs = torch._dynamo.utils.counters["stats"]  # cumulative over the test session: count differences
    traced = []
    for val_every in (0, 1):
        torch._dynamo.reset()
        before = graphs["unique_graphs"]
        traced_run(monkeypatch, shakespeare, tmp_path, compile=True, val_compile_scope="blocks", kernel_warmup_steps=1,
                   max_steps=4, val_every=val_every)
        traced.append(graphs["unique_graphs"] - before)
    assert traced[0] > 0 and traced[1] == traced[0]


def test_only_with_the_whole_model_compiled(monkeypatch, shakespeare, tmp_path):
    """With compile off, or the blocks already regions (--compile_scope=blocks), the switch changes nothing."""
    _, compiled = traced_run(monkeypatch, shakespeare, tmp_path, compile=False, val_compile_scope="blocks")
    assert compiled == []
    torch._dynamo.reset()
    _, regions = traced_run(monkeypatch, shakespeare, tmp_path, compile=True, compile_scope="blocks",
                            val_compile_scope="same")
    torch._dynamo.reset()
    _, both = traced_run(monkeypatch, shakespeare, tmp_path, compile=True, compile_scope="blocks",
                         val_compile_scope="blocks")
    assert [getattr(fn, "__name__", None) for fn in both] == [getattr(fn, "__name__", None) for fn in regions]


def test_bad_scopes_are_refused():
    with pytest.raises(SystemExit, match="--val_compile_scope='model' is not one of: same, blocks"):
        lever.parse_config(["--val_compile_scope=model"])
