"""--fp8_scaling (step 70): float8 casts whose bounds are known before the tensor exists, so that no amax pass has to
finish before the cast. gradients (the default) bounds every gradient of a block's product by
FP8_GRADIENT_BOUND_PER_TOKEN / the micro-batch's tokens (gradient_bound): the loss is their mean. activations bounds
a norm's output by its gain (norm_bound) and the output projections' inputs by FP8_BOUND_MARGIN times their largest
entry one step before, kept as buffers (bound_from_last_step); ahead does both. amax is the parent (step 69): each
tensor scaled by its own largest entry. These tests check the bounds' arithmetic, that each mode bounds the casts it
names and no others, that the gradients' bound keeps every gradient inside e5m2's range without saturating, that the
buffers follow the last step, that evaluation, checkpoints and the kernel warm-up keep them, that under DDP every rank
casts with rank 0's, and that off the step is its parent."""
import os

import pytest
import torch
import torch.nn as nn

from conftest import script_number, step_adding
from lever_helpers import batch, build, lever_and_parent, train

lever, parent_step = lever_and_parent("fp8_scaling")
LEVER_SCRIPT = step_adding("fp8_scaling")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# float8 in the attention and the MLPs; zero-initialized output projections would give the first backward zero gradients
FLOAT8 = dict(zero_init_projections=False, fp8_mlp="full", fp8_attention="full", relu2_from_float8=True)


def bounds(model):
    return {name: buffer.item() for name, buffer in model.named_buffers() if ".fp8_" in name}


def test_gradients_by_default_and_amax_is_the_parent():
    assert lever.Config().fp8_scaling == "gradients" and not hasattr(parent_step.Config, "fp8_scaling")
    assert f"    {script_number(LEVER_SCRIPT)}  --fp8_scaling=gradients" in lever.__doc__
    model, cfg = build(lever, fp8_scaling="amax", **FLOAT8)
    assert not bounds(model)
    parent, parent_cfg = build(parent_step, **FLOAT8)
    parent_losses = train(parent, parent_cfg, parent_step, 3)
    assert train(model, cfg, lever, 3) == parent_losses
    model, cfg = build(lever, fp8_scaling="amax", **FLOAT8)
    amax_losses = train(model, cfg, lever, 8)
    for scaling in ("gradients", "activations", "ahead"):
        ahead, ahead_cfg = build(lever, fp8_scaling=scaling, **FLOAT8)
        ahead_losses = train(ahead, ahead_cfg, lever, 8)
        assert ahead_losses[:3] != parent_losses, scaling
        # it trains as the amax scaling does, within float8's rounding, and the loss falls
        assert ahead_losses == pytest.approx(amax_losses, abs=0.02), scaling
        assert ahead_losses[-1] < ahead_losses[0] - 0.5, scaling


@pytest.mark.parametrize("norm", [nn.RMSNorm(64), nn.LayerNorm(64), nn.LayerNorm(64, bias=False)])
def test_a_norms_output_never_exceeds_its_bound_and_reaches_it(norm):
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=generator))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.randn(64, generator=generator) * 0.1)
    x = torch.randn(256, 64, generator=generator) * torch.logspace(-3, 3, 256).unsqueeze(1)
    bound = lever.norm_bound(norm).item()
    assert norm(x).abs().max().item() <= bound * (1 + 1e-5)
    # the worst row: all of its size in the channel of the largest gain (a LayerNorm's mean takes a share of it)
    peak = torch.full((1, 64), -1.0 if isinstance(norm, nn.LayerNorm) else 0.0)
    peak[0, norm.weight.abs().argmax()] = 1e4
    reached = norm(peak).abs().max().item()
    assert reached == pytest.approx(bound, rel=0.02 if isinstance(norm, nn.LayerNorm) else 1e-4)


def test_a_bound_from_the_last_step_is_the_margin_times_that_steps_largest_entry():
    buffer = torch.tensor(lever.FP8_FIRST_BOUND)
    assert lever.bound_from_last_step(buffer, torch.tensor(3.0)).item() == lever.FP8_FIRST_BOUND
    assert buffer.item() == 3.0 * lever.FP8_BOUND_MARGIN
    assert lever.bound_from_last_step(buffer, torch.tensor(0.0)).item() == 6.0
    assert buffer.item() == 6.0  # an all-zero tensor (a zero-initialized product's gradient) keeps the old bound


def record_casts(monkeypatch):
    """[(float8 dtype, bound or None, the cast tensor's largest |entry|, the tensor itself)] of every to_float8 call."""
    casts = []
    original = lever.to_float8

    def recording(t, dtype, bound=None):
        casts.append((dtype, None if bound is None else float(bound), t.detach().abs().amax().item(), t))
        return original(t, dtype, bound)
    monkeypatch.setattr(lever, "to_float8", recording)
    return casts


@pytest.mark.parametrize("scaling", ["gradients", "activations", "ahead", "amax"])
def test_each_mode_bounds_the_casts_it_names(monkeypatch, scaling):
    model, cfg = build(lever, fp8_scaling=scaling, fp8_head=True, fused_head_loss=False, **FLOAT8)
    weights = {id(p) for p in model.parameters()}
    casts = record_casts(monkeypatch)
    x, y = batch()
    model(x, y).backward()
    # per block: the attention's and the MLP's two products, each a weight and an input in e4m3 and a gradient in
    # e5m2; the head one of each (its gradient's bound, 1 / scored targets, is the parent's)
    assert len(casts) == 2 * cfg.n_layer * 2 * 3 + 3
    products = 2 * cfg.n_layer * 2
    unbounded = [t for _, bound, _, t in casts if bound is None]
    assert sum(id(t) in weights for t in unbounded) == products + 1  # a weight's cast always takes its own amax
    inputs = [t for dtype, bound, _, t in casts if dtype == torch.float8_e4m3fn and id(t) not in weights]
    gradients = [bound for dtype, bound, _, _ in casts if dtype == torch.float8_e5m2][1:]  # the head's comes first
    bounded_inputs = sum(bound is not None for dtype, bound, _, t in casts
                         if dtype == torch.float8_e4m3fn and id(t) not in weights)
    assert len(inputs) == products + 1 and len(gradients) == products
    assert bounded_inputs == (products + 1 if scaling in ("activations", "ahead") else 0)
    if scaling in ("gradients", "ahead"):
        assert gradients == [pytest.approx(lever.FP8_GRADIENT_BOUND_PER_TOKEN / x.numel())] * products
    else:
        assert gradients == [None] * products
    # buffers only where a bound comes from the last step: the output projections' inputs
    assert len(bounds(model)) == (cfg.n_layer * 2 if scaling in ("activations", "ahead") else 0)
    assert all(name.endswith(".c_proj.fp8_input_bound") for name in bounds(model))


def test_the_gradients_bound_saturates_nothing_and_keeps_them_in_range(monkeypatch):
    """Each gradient of a block's product, cast to e5m2 under its bound (256 / tokens), is at most that bound and
    its largest entry far above e5m2's smallest normal (2^-14 of 57,344 times the bound), so small entries keep
    their precision: the fixed bound of 1.0 measured in RESULTS (v) did not."""
    model, cfg = build(lever, **FLOAT8)
    train(model, cfg, lever, 3)
    casts = record_casts(monkeypatch)
    x, y = batch()
    model(x, y).backward()
    gradients = [(bound, largest) for dtype, bound, largest, _ in casts if dtype == torch.float8_e5m2]
    assert len(gradients) == 2 * cfg.n_layer * 2
    e5m2 = torch.finfo(torch.float8_e5m2)
    for bound, largest in gradients:
        assert bound == pytest.approx(lever.FP8_GRADIENT_BOUND_PER_TOKEN / x.numel())
        assert 0 < largest < bound / 4
        assert largest / bound * e5m2.max > 1e4 * e5m2.smallest_normal


def test_the_bounds_follow_the_last_step(monkeypatch):
    model, cfg = build(lever, fp8_scaling="ahead", **FLOAT8)
    first = bounds(model)
    assert first and all(value == lever.FP8_FIRST_BOUND for value in first.values())
    casts = record_casts(monkeypatch)
    x, y = batch()
    model(x, y).backward()
    after = bounds(model)
    # the c_proj inputs: the attention's output, and relu(h)^2 (its largest entry from h's)
    inputs = sorted(lever.FP8_BOUND_MARGIN * largest for dtype, bound, largest, _ in casts
                    if dtype == torch.float8_e4m3fn and bound == lever.FP8_FIRST_BOUND)
    assert sorted(after.values()) == pytest.approx(inputs, rel=1e-2)
    # the next step's casts use them
    casts.clear()
    model(x, y).backward()
    used = [bound for _, bound, _, _ in casts if bound is not None]
    for name, value in after.items():
        assert any(bound == pytest.approx(value, rel=1e-6) for bound in used), name


def test_evaluation_keeps_the_exact_products_and_the_bounds():
    model, cfg = build(lever, fp8_scaling="ahead", **FLOAT8)
    train(model, cfg, lever, 2)
    exact, _ = build(lever, fp8_scaling="amax", fp8_mlp="off", fp8_attention="off", relu2_from_float8=False,
                     zero_init_projections=False)
    exact.load_state_dict({k: v for k, v in model.state_dict().items() if ".fp8_" not in k})
    before = bounds(model)
    model.eval()
    exact.eval()
    x, y = batch()
    with torch.no_grad():
        assert torch.equal(model(x, y), exact(x, y))
    assert bounds(model) == before


def run(out_dir, run_name, **overrides):
    values = dict(data=os.path.join(REPO, "input.txt"), device="cpu", compile=False, kernel_warmup_steps=0,
                  val_target=0.0, lr_decay_tokens=0, n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=2,
                  total_batch_size=128, window=0, window_ramp=False, attention="sdpa", blockmask_from_kv_blocks=False,
                  val_tokens=128, val_every=0, sample_every=0, max_steps=6, warmup_steps=1, value_embeddings=1,
                  fp8_head=False, fused_head_loss=False, long_window_layers="", attention_free_layers="",
                  backout_layer=-1, compile_ahead=False, out_dir=out_dir, run_name=run_name, **FLOAT8)
    values.update(overrides)
    return lever.main([f"--{key}={value}" for key, value in values.items()])


def test_a_resumed_run_and_a_warmed_up_run_continue_the_same_curve(tmp_path):
    whole = run(tmp_path, "whole", ckpt_every=3, keep_last=0, fp8_scaling="ahead")
    resumed = run(tmp_path, "whole", ckpt_every=0, fp8_scaling="ahead",
                  resume=os.path.join(whole["run_dir"], "checkpoints", "step_000003"))
    assert resumed["losses"] == whole["losses"][3:]  # bit for bit: the bounds came back with the weights
    warmed = run(tmp_path, "warmed", ckpt_every=0, kernel_warmup_steps=2, fp8_scaling="ahead")
    assert warmed["losses"] == whole["losses"]  # the warm-up's steps moved the bounds, and they were put back
    # the log gives the bounds' range after each validation
    with open(os.path.join(whole["run_dir"], "log.txt"), encoding="utf-8") as f:
        lines = [line for line in f if "fp8_input_bounds:" in line]
    # one validation a run, the last step's; the resumed run goes on in the same folder and log
    assert len(lines) == 2 and all(line.startswith("step:6/6 fp8_input_bounds:") for line in lines)
    for scaling in ("amax", "gradients"):  # no bounds from the last step, nothing to log
        other = run(tmp_path, scaling, ckpt_every=0, fp8_scaling=scaling)
        with open(os.path.join(other["run_dir"], "log.txt"), encoding="utf-8") as f:
            assert "fp8_input_bounds:" not in f.read()


def test_bad_values_are_refused():
    with pytest.raises(SystemExit, match="--fp8_scaling='delayed' is not one of: amax, gradients, activations, ahead"):
        lever.parse_config(["--fp8_scaling=delayed"])
    assert lever.parse_config(["--fp8_scaling=amax"]).fp8_scaling == "amax"


def ddp_worker(rank, world_size, store, out):
    """Two steps of a tiny float8 model under DDP, each rank on its own batch; saves the bounds the second step's casts
    used on this rank, and the rank's buffers after that step."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    model, cfg = build(lever, fp8_scaling="ahead", **FLOAT8)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = lever.configure_optimizer(model, cfg, "cpu")
    used = []
    original = lever.to_float8
    for step in range(2):
        if step == 1:
            lever.to_float8 = lambda t, dtype, bound=None: used.append(None if bound is None else float(bound)) or \
                original(t, dtype, bound)
        optimizer.zero_grad(set_to_none=True)
        x, y = batch(seed=rank + 1)
        ddp(x, y).backward()
        optimizer.step()
    lever.to_float8 = original
    torch.save((used, bounds(model)), os.path.join(out, f"{rank}.pt"))
    torch.distributed.barrier()
    os._exit(0)  # as in test_distributed_muon.py: gloo's teardown at exit can abort a rank after its results are saved


def test_under_ddp_every_rank_casts_with_rank_0s_bounds(tmp_path):
    """DDP broadcasts the buffers from rank 0 before each forward, so every rank scales its float8 casts alike, though
    each rank's batch (and so its amax) differs; the buffers then hold each rank's own step."""
    torch.multiprocessing.start_processes(ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2,
                                          start_method="spawn")
    (used0, after0), (used1, after1) = (torch.load(tmp_path / f"{rank}.pt") for rank in range(2))
    assert len(used0) == len(used1) > 0 and used0 == used1
    assert after0.keys() == after1.keys() and after0 != after1
