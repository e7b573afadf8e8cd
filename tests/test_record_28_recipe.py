"""Step 51 changes the defaults, by design, to the combination measured best on bench100m (bench/RESULTS.md
2026-11-26 (i)): record #28's shape (12 blocks of 768, 6 heads, an MLP 4x wide), step 46's long windows in blocks 0,
4 and 11, step 47's block 7 without attention and step 49's 12-channel attention gate. Given the old values back on
the command line it is step 50, config for config and loss for loss; each of the three switches still changes what
it claims; a shape the defaults' block lists do not fit fails early, naming the field."""
import pytest
import torch

from conftest import load_script
from lever_helpers import assert_recipe_defaults, build, train

step = load_script(51)
parent = load_script(50)

RECIPE = dict(n_layer=12, n_head=6, n_embd=768, mlp_ratio=4.0, long_window_layers="0,4,11",
              attention_free_layers="7", attention_gate=12)
OLD = dict(n_layer=8, n_head=16, n_embd=1024, mlp_ratio=2.0, long_window_layers="", attention_free_layers="",
           attention_gate=0)
# A small copy of the recipe's 12 blocks: 6 heads of 8 channels, token windows of 8 on the CPU's dense-mask path
SMALL_RECIPE = dict(n_layer=12, n_head=6, n_embd=48, mlp_ratio=4.0, window=8, window_unit="token")


def test_the_defaults_are_the_recipe_and_the_old_values_are_the_parent():
    assert_recipe_defaults(step, parent, RECIPE, OLD)
    assert step.parse_config(["--preset=bench100m"]).n_layer == 12  # the benchmark trains the recipe's model


def test_the_default_model_is_record_28s_shape():
    with torch.device("meta"):  # shapes only: no memory, no init arithmetic
        model = step.GPT(step.parse_config([]))
    blocks = model.transformer.h
    assert len(blocks) == 12 and [block.attn is None for block in blocks] == [layer == 7 for layer in range(12)]
    assert all(block.mlp.c_fc.weight.shape == (3072, 768) for block in blocks)
    assert all(block.attn.gate.weight.shape == (6, 12) for block in blocks if block.attn is not None)
    assert step.window_layers(model.cfg) == {0, 4, 11}


def test_old_values_train_as_the_parent_and_the_recipe_learns():
    off = dict(SMALL_RECIPE, long_window_layers="", attention_free_layers="", attention_gate=0)
    model, cfg = build(step, **off)
    parent_model, parent_cfg = build(parent, **off)
    assert train(model, cfg, step, 3) == train(parent_model, parent_cfg, parent, 3)
    model, cfg = build(step, **SMALL_RECIPE)
    recipe = train(model, cfg, step, 8)
    assert recipe[-1] < recipe[0] - 0.5, recipe
    for switch in (dict(long_window_layers=""), dict(attention_free_layers=""), dict(attention_gate=0)):
        model, cfg = build(step, **SMALL_RECIPE, **switch)
        assert train(model, cfg, step, 8) != recipe, f"{switch} changed nothing"


def test_a_shape_the_block_lists_do_not_fit_fails_early_naming_the_field():
    with pytest.raises(SystemExit, match="--attention_free_layers='7'"):
        step.parse_config(["--n_layer=8"])
    with pytest.raises(SystemExit, match="--long_window_layers='0,4,11' must list block indices 0..9"):
        step.parse_config(["--n_layer=10", "--attention_free_layers=5"])
    cfg = step.parse_config(["--n_layer=8", "--attention_free_layers=", "--long_window_layers=0,7"])
    assert (cfg.n_layer, cfg.attention_free_layers, cfg.long_window_layers) == (8, "", "0,7")
