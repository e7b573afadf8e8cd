"""--unet_skips (candidate step 48, off until measured): block i's output is added, times a learned weight that
starts at 1, to the input of block n_layer-1-i, for the first n_layer // 2 blocks (records #9 and #11); the weights
train; a model with no pair of blocks is refused early; off, the step is its parent (step 47)."""
import pytest
import torch

from lever_helpers import batch, build, lever_and_parent, train

lever, parent_step = lever_and_parent("unet_skips")


def test_off_by_default_and_off_is_the_parent():
    assert lever.Config().unet_skips is False and not hasattr(parent_step.Config, "unet_skips")
    model, cfg = build(lever, n_layer=4)
    parent, parent_cfg = build(parent_step, n_layer=4)
    assert list(model.state_dict()) == list(parent.state_dict())
    assert train(model, cfg, lever, 3) == train(parent, parent_cfg, parent_step, 3)


@pytest.mark.parametrize("n_layer, pairs", [(4, {2: 1, 3: 0}), (5, {3: 1, 4: 0})])
def test_each_skip_joins_block_i_to_block_n_layer_minus_1_minus_i(monkeypatch, n_layer, pairs):
    """Every block records its input and output; with the skip weights at 1, block j's input is what it would be
    without skips (the previous block's output) plus the output of block n_layer-1-j, for the paired blocks only."""
    model, _ = build(lever, n_layer=n_layer, unet_skips=True)
    assert model.skip_weights.tolist() == [1.0] * (n_layer // 2)
    inputs, outputs = {}, {}
    for layer, block in enumerate(model.transformer.h):
        original = block.forward

        def recorded(x, *args, layer=layer, f=original):
            inputs[layer] = x
            outputs[layer] = f(x, *args)
            return outputs[layer]
        monkeypatch.setattr(block, "forward", recorded)
    with torch.no_grad():
        model(*batch())
    for layer in range(1, n_layer):
        expected = outputs[layer - 1] + (outputs[pairs[layer]] if layer in pairs else 0)
        torch.testing.assert_close(inputs[layer], expected)


def test_skip_weights_train_and_change_the_run():
    model, cfg = build(lever, n_layer=4, unet_skips=True)
    losses = train(model, cfg, lever, 8)
    assert losses[-1] < losses[0] - 0.5, losses
    assert not torch.equal(model.skip_weights.detach(), torch.ones(2))  # AdamW moved them
    plain, plain_cfg = build(lever, n_layer=4)
    assert losses != train(plain, plain_cfg, lever, 8)


def test_a_single_block_is_refused():
    with pytest.raises(SystemExit, match=r"--unet_skips joins block i to block n_layer-1-i.*--n_layer >= 2"):
        lever.parse_config(["--unet_skips=true", "--n_layer=1"])
    assert lever.parse_config(["--unet_skips=true", "--n_layer=2", "--value_embeddings=1"]).unet_skips is True
