"""Validation's own batch shape (from step 20): validation reads val_batch_size x val_block_size batches, the
model's rotary positions reach the longest sequence, and the value is the same at any world size."""
import numpy as np
import pytest
import torch

from conftest import load_script, scripts_from

NO_AUTOCAST = torch.autocast("cpu", enabled=False)
SMALL = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--batch_size=2", "--block_size=8", "--pos_emb=rotary",
         "--val_batch_size=3", "--val_block_size=32", "--val_tokens=384"]


class ShapeRecorder(torch.nn.Module):
    """A stand-in model whose loss is the mean target token id, and which notes the shapes it was given."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def forward(self, x, y):
        self.shapes.add(tuple(x.shape))
        return y.float().mean()


def val_at_world_size(module, model, val, world_size, monkeypatch):
    """The value every rank would return: each rank's mean over its batches, summed and divided (all_reduce)."""
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    cfg = module.parse_config(SMALL + [f"--total_batch_size={16 * world_size}"])
    monkeypatch.setattr(module.dist, "all_reduce", lambda tensor: None)  # each rank returns its mean / world_size
    return sum(module.evaluate(model, val, cfg, rank, world_size, torch.device("cpu"), NO_AUTOCAST)
               for rank in range(world_size))


@pytest.mark.parametrize("script", scripts_from(20))
def test_validation_uses_its_own_shape(script, monkeypatch):
    module = load_script(script)
    assert module.val_shape(module.parse_config(["--batch_size=2", "--block_size=8", "--total_batch_size=16",
                                                 "--val_tokens=64"])) == (2, 8)  # 0 = the training shape
    val = [np.arange(5000, dtype=np.uint16)]
    recorder = ShapeRecorder()
    value = val_at_world_size(module, recorder, val, 1, monkeypatch)
    assert recorder.shapes == {(3, 32)}  # not the training batch's 2 x 8
    assert value == pytest.approx(np.arange(1, 385).mean())  # still exactly the first val_tokens tokens
    assert val_at_world_size(module, ShapeRecorder(), val, 2, monkeypatch) == pytest.approx(value)


@pytest.mark.parametrize("script", scripts_from(20))
def test_long_val_sequences_give_the_same_value_at_any_world_size(script, monkeypatch):
    module = load_script(script)
    torch.manual_seed(0)
    model = module.GPT(module.parse_config(SMALL + ["--total_batch_size=16"]))
    assert model.transformer.h[0].attn.rotary.cos.size(0) == 32  # positions for the longest sequence
    val = [np.random.default_rng(0).integers(0, 50257, 5000).astype(np.uint16)]
    values = [val_at_world_size(module, model, val, world_size, monkeypatch) for world_size in (1, 2, 4)]
    assert values == pytest.approx([values[0]] * 3, abs=1e-5)
    with pytest.raises(ValueError, match="longer than block_size=8 and val_block_size=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("script", scripts_from(20))
def test_bad_val_shapes_are_refused(script):
    module = load_script(script)
    with pytest.raises(SystemExit, match="--pos_emb=absolute learns a vector only for the training positions"):
        module.parse_config(["--val_block_size=2048"])
    with pytest.raises(SystemExit, match="--val_batch_size=-1"):
        module.parse_config(["--val_batch_size=-1"])
    with pytest.raises(SystemExit, match="--val_tokens=1000 is not a positive multiple of val_batch_size"):
        module.parse_config(["--val_tokens=1000", "--val_batch_size=4", "--pos_emb=rotary", "--val_block_size=2048"])
