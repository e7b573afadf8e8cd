"""--muon_ns_coefficients (step 59, polar_express by default): polar_express gives each Newton-Schulz iteration its own
(a, b, c), Polar Express's five, the norm divided by 1.02 first. Jordan's is the parent (step 58); Polar Express's
singular values end closer to 1 than Jordan's in the same five steps, on well- and ill-conditioned matrices; a sixth
step repeats the last set; batched and one-by-one Muon agree; a bad value is refused, naming both choices."""
import pytest
import torch

from conftest import script_number, step_adding
from lever_helpers import build, lever_and_parent, train

lever, parent_step = lever_and_parent("muon_ns_coefficients")
LEVER_SCRIPT = step_adding("muon_ns_coefficients")


def matrices():
    """Gaussian matrices of three aspects (not square: a square one has singular values near 0, out of Polar
    Express's fitted range), and each with its singular values respread over 1e-3..1 (a gradient's are uneven)."""
    generator = torch.Generator().manual_seed(0)
    for shape in ((64, 32), (32, 64), (128, 96)):
        G = torch.randn(*shape, generator=generator)
        U, S, V = torch.linalg.svd(G, full_matrices=False)
        yield shape, "gaussian", G
        yield shape, "ill-conditioned", U @ torch.diag(torch.logspace(-3, 0, S.numel())) @ V


def test_polar_express_by_default_jordan_is_the_parent_and_polar_express_differs():
    assert lever.Config().muon_ns_coefficients == "polar_express"
    assert not hasattr(parent_step.Config, "muon_ns_coefficients")
    assert f"    {script_number(LEVER_SCRIPT)}  --muon_ns_coefficients=polar_express by default" in lever.__doc__
    model, cfg = build(lever, muon_ns_coefficients="jordan")
    parent, parent_cfg = build(parent_step)
    parent_losses = train(parent, parent_cfg, parent_step, 4)
    assert train(model, cfg, lever, 4) == parent_losses
    polar, polar_cfg = build(lever, muon_ns_coefficients="polar_express")
    losses = train(polar, polar_cfg, lever, 8)
    assert losses[1:4] != parent_losses[1:] and losses[-1] < losses[0] - 0.5


def test_polar_express_ends_closer_to_orthogonal_in_five_steps():
    for shape, kind, G in matrices():
        distance = {}
        for coefficients in ("jordan", "polar_express"):
            values = torch.linalg.svdvals(lever.newton_schulz(G, 5, coefficients))
            distance[coefficients] = (values - 1).abs().max().item()
        assert distance["polar_express"] < 0.8 * distance["jordan"], (shape, kind, distance)
        assert distance["polar_express"] < 0.65, (shape, kind, distance)
    G = next(matrices())[2]
    assert torch.equal(lever.newton_schulz(G, 5), parent_step.newton_schulz(G, 5))  # jordan: the parent's values


def test_each_iteration_takes_its_own_coefficients_and_later_ones_repeat_the_last(monkeypatch):
    G = next(matrices())[2]
    five = lever.newton_schulz(G, 5, "polar_express")
    assert not torch.equal(five, lever.newton_schulz(G, 4, "polar_express"))
    # a table whose sets after the first are all the first: five steps of it differ from the real five
    monkeypatch.setattr(lever, "POLAR_EXPRESS", (lever.POLAR_EXPRESS[0],) * 5)
    assert not torch.allclose(five, lever.newton_schulz(G, 5, "polar_express"))
    monkeypatch.undo()
    # a sixth step applies the last set once more, by hand
    X = five.mT  # newton_schulz iterates on the wide side: (32, 64)
    a, b, c = lever.POLAR_EXPRESS[-1]
    A = X @ X.mT
    torch.testing.assert_close(lever.newton_schulz(G, 6, "polar_express"), (a * X + (b * A + c * A @ A) @ X).mT)


def test_batched_and_one_by_one_muon_agree():
    results = []
    for batched in (True, False):
        model, cfg = build(lever, muon_ns_coefficients="polar_express", muon_batched_ns=batched)
        muon = lever.configure_optimizer(model, cfg, "cpu").optimizers[1]
        assert muon.ns_coefficients == "polar_express"
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in muon.param_groups[0]["params"]:
                p.grad = torch.randn(p.shape, generator=generator)
            muon.step()
        results.append([p.detach().clone() for p in muon.param_groups[0]["params"]])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_a_bad_value_is_refused():
    with pytest.raises(SystemExit, match="--muon_ns_coefficients='polar' is not one of: jordan, polar_express"):
        lever.parse_config(["--muon_ns_coefficients=polar"])
    assert lever.parse_config(["--muon_ns_coefficients=polar_express"]).muon_ns_coefficients == "polar_express"
