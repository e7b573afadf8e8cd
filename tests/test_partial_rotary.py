"""--rope_fraction (step 42, on by default: half the pairs, base 1024): RoPE rotates the first fraction of each head's channel pairs, with
frequencies from 1 down to about 1/rope_base, and leaves the other pairs unrotated: their part of a query-key product
depends on content alone. At 1 it is the parent's RoPE (step 41); bad fractions are refused."""
import pytest
import torch

from lever_helpers import build, lever_and_parent, train

lever, parent_step = lever_and_parent("rope_fraction")


def test_on_by_default_and_off_is_the_parent():
    assert (lever.Config().rope_fraction, lever.Config().rope_base) == (0.5, 1024.0)
    assert not hasattr(parent_step.Config, "rope_fraction") and parent_step.Config().rope_base == 500000.0
    assert torch.equal(lever.Rotary(64, 16, 500000.0).cos, parent_step.Rotary(64, 16, 500000.0).cos)
    model, cfg = build(lever, rope_fraction=1.0, rope_base=500000.0)
    parent, parent_cfg = build(parent_step)
    assert train(model, cfg, lever, 3) == train(parent, parent_cfg, parent_step, 3)


def test_half_the_pairs_rotate_from_1_down_to_about_1_over_the_base():
    rotary = lever.Rotary(32, 16, 1024.0, fraction=0.5)  # 16 pairs: 8 rotate, 8 do not
    step = torch.atan2(rotary.sin[1], rotary.cos[1])  # the angle one position turns each pair
    expected = 1024.0 ** (-torch.arange(8) / 8)
    torch.testing.assert_close(step[:8], expected)
    assert step[7] < 1 / 400 and torch.all(step[8:] == 0)  # 1024^(-7/8): the slowest pair turns ~1/431 a position


def test_the_unrotated_channels_carry_no_position():
    rotary = lever.Rotary(32, 16, 1024.0, fraction=0.5)
    x = torch.randn(1, 1, 1, 32).expand(1, 1, 16, 32)  # the same vector at positions 0..15
    out = rotary(x)
    unrotated = torch.cat([torch.arange(8, 16), torch.arange(24, 32)])  # pairs 8..15: channels i and i + 16
    assert torch.equal(out[..., unrotated], x[..., unrotated])
    assert not torch.allclose(out[0, 0, 5, :8], x[0, 0, 5, :8])


def test_it_trains():
    model, cfg = build(lever, rope_fraction=0.5, rope_base=1024.0)
    losses = train(model, cfg, lever, 8)
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize("fraction", ["0", "1.5", "0.01"])
def test_bad_fractions_are_refused(fraction):
    with pytest.raises(SystemExit, match=f"--rope_fraction={float(fraction)} must be in"):
        lever.parse_config([f"--rope_fraction={fraction}"])
