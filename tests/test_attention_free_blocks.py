"""--attention_free_layers (step 47, off: it trades loss for speed): the listed blocks have no attention (no weights,
no attention call), only their MLP, as record #28's block 7; a block with a value-embedding table or a list that
leaves no attention is refused early; empty, the step is its parent (step 46)."""
import pytest

from lever_helpers import batch, build, lever_and_parent, train

lever, parent_step = lever_and_parent("attention_free_layers")
FOUR = dict(n_layer=4)  # value_embeddings=1: blocks 0 and 3 hold its table, 1 and 2 may drop their attention


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


def test_off_by_default_and_off_is_the_parent():
    assert lever.Config().attention_free_layers == "" and not hasattr(parent_step.Config, "attention_free_layers")
    model, cfg = build(lever, **FOUR)
    parent, parent_cfg = build(parent_step, **FOUR)
    assert list(model.state_dict()) == list(parent.state_dict())
    assert train(model, cfg, lever, 3) == train(parent, parent_cfg, parent_step, 3)


def test_listed_blocks_have_no_attention_and_still_train(monkeypatch):
    model, cfg = build(lever, attention_free_layers="2", **FOUR)
    full, _ = build(lever, **FOUR)
    block, attending = model.transformer.h[2], full.transformer.h[2]
    assert block.attn is None and not any(name.startswith("transformer.h.2.attn") for name, _ in
                                          model.named_parameters())
    dropped = sum(p.numel() for p in attending.attn.parameters()) + sum(p.numel() for p in attending.ln_1.parameters())
    assert parameter_count(full) - parameter_count(model) == dropped > 0
    called = []
    for layer, other in enumerate(model.transformer.h):
        if other.attn is not None:
            original = other.attn.forward
            monkeypatch.setattr(other.attn, "forward", lambda *a, layer=layer, f=original: called.append(layer) or f(*a))
    x, y = batch()
    model(x, y)
    assert called == [0, 1, 3]
    losses = train(model, cfg, lever, 8)
    assert losses[-1] < losses[0] - 0.5, losses
    full_cfg = lever.Config(**{**cfg.__dict__, "attention_free_layers": ""})
    assert losses != train(build(lever, **FOUR)[0], full_cfg, lever, 8)


@pytest.mark.parametrize("value, message", [
    ("4", r"must list block indices 0\.\.3 separated by commas"),
    ("1,x", r"must list block indices"),
    ("0", r"block\(s\) \[0\] add a value embedding .* list blocks 1\.\.2"),
    ("3,1", r"block\(s\) \[3\] add a value embedding"),
])
def test_bad_lists_fail_early(value, message):
    with pytest.raises(SystemExit, match=message):
        lever.parse_config([f"--attention_free_layers={value}", "--n_layer=4", "--value_embeddings=1"])


def test_no_block_left_to_attend_is_refused():
    with pytest.raises(SystemExit, match="leaves no block that attends"):
        lever.parse_config(["--attention_free_layers=0,1", "--n_layer=2", "--value_embeddings=0"])
    cfg = lever.parse_config(["--attention_free_layers=1", "--n_layer=2", "--value_embeddings=0"])
    assert lever.attention_free_layers(cfg) == {1}
