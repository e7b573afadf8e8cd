"""Steps 30, 31 and 32 (written as feature files, merged into the lineage later): the training config resolved for the
world size, the window ramp of step 30 (linear, on or off) and the stepwise window schedule of step 31, the
window a resumed run goes on with, and the presets (demo, bench100m; step 32 changes bench100m). Step 37 turns
the logit soft-cap on."""
import dataclasses
import math
import os

import pytest
import torch

from conftest import load_script, logged_steps, read_log, tiny_args

S30 = "30-gpt-3-small-with-training-config-and-with-or-without-swa-window-size-ramp.py"
S31 = "31-add-flexible-swa-schedule.py"
S32 = "32-bench100m-recipe-half-batch-linear-cooldown.py"
S36 = "36-add-muon-momentum-warmup.py"
S37 = "37-recipe-logit-softcap-15.py"
BOTH = [S30, S31]
# 31's linear ramp is 30's, with 30's end width
LINEAR = {S30: [], S31: ["--window_schedule=linear", "--window=1024"]}

# Tiny CPU runs: the new defaults (compile, kernel warm-up, the val target) off; sequences of 512 tokens, so that
# windows of 128-384 tokens restrict attention and a width that is wrong changes the losses.
TINY_30 = dict(compile=False, kernel_warmup_steps=0, val_target=0.0, block_size=512, batch_size=1,
               total_batch_size=512, val_tokens=512, max_steps=4)
# The same widths from either schedule: 128, 256, 384, 512 at steps 0, 1, 2, 3.
RAMP_4_STEPS = {S30: dict(window=512, window_ramp_start=128, window_ramp_steps=3),
                S31: dict(window=512, window_ramp_start=128, window_schedule_start=1, window_schedule_every=1)}
# 128, 128, 256, 256, 384, 384, 512 at steps 0-6: every width of steps 3-5 differs from the model's initial 512.
RAMP_6_STEPS = {S30: dict(window=512, window_ramp_start=128, window_ramp_steps=6),
                S31: dict(window=512, window_ramp_start=128, window_schedule_start=2, window_schedule_every=2)}


@pytest.mark.parametrize("script", BOTH)
def test_training_config_resolves_for_the_world_size(script, monkeypatch):
    module = load_script(script)
    cfg = module.Config()
    expected = {1: (8, 4, 160), 2: (8, 2, 80), 4: (8, 1, 40), 8: (4, 1, 20)}  # micro-batch, accumulation, val steps
    for world_size, (micro_batch, accumulation, val_steps) in expected.items():
        plan = module.resolve_training(cfg, world_size)
        assert (plan.micro_batch_size, plan.grad_accum_steps, plan.val_steps) == (micro_batch, accumulation, val_steps)
        assert plan.tokens_per_step == 262144 == micro_batch * 8192 * world_size * accumulation  # the same batch
        assert val_steps * 8 * 8192 * world_size == cfg.val_tokens == 10485760
        assert (plan.max_steps, plan.train_tokens) == (cfg.max_steps, cfg.max_steps * 262144)
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        assert module.parse_config([]) == cfg  # torchrun with 1, 2, 4 or 8 processes passes the checks
    assert module.resolve_training(cfg, 1).lr_decay_steps == math.ceil(cfg.lr_decay_tokens / 262144)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit) as error:
        module.parse_config([])
    message = str(error.value)
    assert "--total_batch_size=262144" in message and "3 processes" in message
    assert "make it a multiple of 24576" in message and "divides its 32 sequences: 1, 2, 4, 8, 16, 32" in message
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit, match=r"--batch_size=3 does not divide the 32 sequences .* use one of 1, 2, 4, 8"):
        module.parse_config(["--batch_size=3"])


@pytest.mark.parametrize("script", BOTH)
def test_linear_ramp_gives_the_stated_windows(script):
    """128 -> 1,024 over 1,650 steps in whole 128-token blocks: the first block is reached at step 236
    (896 * 236 / 1650 >= 128), the end at step 1650; ramp off = the fixed window, or none at all."""
    module = load_script(script)
    cfg = module.parse_config(LINEAR[script])
    widths = module.window_widths(cfg, 3000)
    assert len(widths) == 3001
    assert [widths[s] for s in (0, 235, 236, 825, 1649, 1650, 3000)] == [128, 128, 256, 512, 896, 1024, 1024]
    assert widths == sorted(widths) and all(w % 128 == 0 for w in widths)
    assert module.window_widths(module.parse_config(LINEAR[script] + ["--window_ramp=false"]), 10) == [1024] * 11
    full_causal = module.parse_config(LINEAR[script] + ["--window_ramp=false", "--window=0"])
    assert module.window_widths(full_causal, 10) == [0] * 11


def test_stepwise_schedule_gives_the_stated_windows():
    module = load_script(S31)
    cfg = module.Config()  # the 4.87-min recipe: 128 for steps 0-199, then +128 every 200 steps up to 2,048
    widths = module.window_widths(cfg, cfg.max_steps)
    assert [widths[s] for s in (0, 199, 200, 399, 400, 2999, 3000, cfg.max_steps)] == \
        [128, 128, 256, 256, 384, 1920, 2048, 2048]

    def changes(*argv, steps=100):
        widths = module.window_widths(module.parse_config(list(argv)), steps)
        return [(s, w) for s, w in enumerate(widths) if s == 0 or w != widths[s - 1]]

    # w <- w + 1*w (doubling), s <- s + 1*s: updates at 5, 5+20, 25+40, then capped at --window
    doubling = ["--window_schedule_mult=1", "--window_schedule_add=0", "--window_schedule_start=5",
                "--window_schedule_every=10", "--window_schedule_every_mult=1", "--window=2048"]
    assert changes(*doubling) == [(0, 128), (5, 256), (25, 512), (65, 1024)]
    assert changes(*doubling, steps=400) == [(0, 128), (5, 256), (25, 512), (65, 1024), (145, 2048)]
    assert changes(*doubling, "--window=1536", steps=400)[-1] == (145, 1536)  # the cap
    # w <- w + 0.5*w + 1*128, s <- s - 3: 128 + 64 + 128 at step 10, 320 + 160 + 128 at 17 (the end step included)
    assert changes("--window_schedule_mult=0.5", "--window_schedule_start=10", "--window_schedule_every=10",
                   "--window_schedule_every_add=-3", "--window_schedule_end=17") == [(0, 128), (10, 320), (17, 608)]
    # from a width below one block: doubling works in tokens (32, 64, 128) and n adds whole blocks
    assert changes("--window_ramp_start=32", "--window_schedule_mult=1", "--window_schedule_add=0",
                   "--window_schedule_start=1", "--window_schedule_every=1", steps=3) == \
        [(0, 32), (1, 64), (2, 128), (3, 256)]
    # an update every step from step 0 with s shrinking to its floor of 1
    assert changes("--window_schedule_start=0", "--window_schedule_every=2", "--window_schedule_every_add=-5",
                   steps=4) == [(0, 256), (1, 384), (2, 512), (3, 640), (4, 768)]


def test_bench100m_preset_is_the_scaled_recipe():
    module = load_script(S31)
    cfg = module.parse_config(["--preset=bench100m"])
    plan = module.resolve_training(cfg, 1)
    assert (plan.max_steps, plan.tokens_per_step, plan.train_tokens) == (384, 262144, 100663296)
    assert (plan.micro_batch_size, plan.grad_accum_steps, plan.val_steps) == (8, 4, 160)
    assert cfg.lr_decay_tokens == 121_600_000 and plan.lr_decay_steps == 464  # past the run's end:
    assert module.get_lr(383, cfg) > cfg.learning_rate * cfg.min_lr_ratio  # the lr is above its floor at the end
    widths = module.window_widths(cfg, cfg.max_steps)
    assert [widths[s] for s in (0, 39, 40, 79, 80, 383)] == [128, 128, 256, 256, 384, 1280]
    assert (cfg.val_every, cfg.val_target, cfg.val_tokens) == (32, 0.0, 10485760)  # from the start, no early stop
    # the rest is the 4.87-min recipe
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.mlp_ratio, cfg.block_size) == (8, 1024, 16, 2.0, 8192)


def test_step_32_changes_only_the_bench100m_preset():
    """Step 32's bench100m: half the tokens per step over twice the steps, the window's steps doubled (so the same
    widths at the same tokens), the peak held, then a linear fall over the last 45% of the steps to 0.1x."""
    s31, s32 = load_script(S31), load_script(S32)
    assert dataclasses.asdict(s32.Config()) == dataclasses.asdict(s31.Config())
    assert s32.PRESETS["demo"] == s31.PRESETS["demo"]
    cfg, old = s32.parse_config(["--preset=bench100m"]), s31.parse_config(["--preset=bench100m"])
    plan = s32.resolve_training(cfg, 1)
    assert (plan.max_steps, plan.tokens_per_step, plan.train_tokens) == (768, 131072, 100663296)
    assert (plan.micro_batch_size, plan.grad_accum_steps, plan.val_steps) == (8, 2, 160)
    assert [s32.window_widths(cfg, 768)[2 * s] for s in range(384)] == s31.window_widths(old, 383)[:384]
    lrs = [s32.get_lr(step, cfg) for step in range(768)]
    assert lrs[:422] == [cfg.learning_rate] * 422  # held, then the cool-down over the last 346 steps (45%) ...
    assert lrs[422] == pytest.approx(cfg.learning_rate)
    assert all(b < a for a, b in zip(lrs[422:], lrs[423:]))  # ... falls every step ...
    assert lrs[422] - lrs[500] == pytest.approx(lrs[500] - lrs[578])  # ... linearly
    assert lrs[767] == pytest.approx(cfg.learning_rate * (0.1 + 0.9 / 346))  # to 0.1x at step 768
    assert (cfg.val_every, cfg.val_target, cfg.val_tokens) == (64, 0.0, 10485760)
    changed = {k for k in s32.PRESETS["bench100m"] if s32.PRESETS["bench100m"][k] != s31.PRESETS["bench100m"].get(k)}
    assert changed == {"max_steps", "total_batch_size", "lr_decay_tokens", "lr_decay", "cooldown_fraction",
                       "min_lr_ratio", "window_schedule_start", "window_schedule_every", "val_every"}


def test_step_37_changes_only_the_logit_softcap_default():
    """Step 37 is step 36 with --logit_softcap=15: the same config otherwise, the same model and loss as step 36
    with the cap passed, every logit inside [-15, 15]; --logit_softcap=0 gives step 36's logits back."""
    s36, s37 = load_script(S36), load_script(S37)
    ours, theirs = dataclasses.asdict(s37.Config()), dataclasses.asdict(s36.Config())
    assert {k for k in ours if ours[k] != theirs[k]} == {"logit_softcap"}
    assert (ours["logit_softcap"], theirs["logit_softcap"]) == (15.0, 0.0)
    assert s37.PRESETS == s36.PRESETS
    tiny = dict(vocab_size=128, block_size=32, n_layer=2, n_head=2, n_embd=64, window=0, window_ramp=False,
                attention="sdpa", blockmask_from_kv_blocks=False, compile=False, value_embeddings=1)

    def model(module, **overrides):
        torch.manual_seed(0)
        net = module.GPT(module.Config(**{**tiny, **overrides}))
        with torch.no_grad():  # logits large enough for the cap to bind
            net.lm_head.weight.mul_(20.0)
        return net
    x = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        capped, same = model(s37)(x), model(s36, logit_softcap=15.0)(x)
        uncapped, off = model(s36)(x), model(s37, logit_softcap=0.0)(x)
    assert torch.equal(capped, same) and torch.equal(uncapped, off)
    assert capped.abs().max() <= 15 < uncapped.abs().max()


def test_the_defaults_are_the_original_recipes():
    c30, c31 = load_script(S30).Config(), load_script(S31).Config()
    shared = dict(norm="rmsnorm", pos_emb="rotary", rope_base=500000.0, bias=False, activation="relu2",
                  tie_embeddings=True, qk_norm="rms", qk_scale_max=5.0, attention="flex", doc_masking=False,
                  logit_softcap=0.0, attn_softcap=0.0, grad_clip=math.inf, block_size=8192, batch_size=8,
                  total_batch_size=262144, learning_rate=5e-3, warmup_steps=0, min_lr_ratio=0.15, optimizer="muon",
                  muon_update_scale="max_dim", beta1=0.9, beta2=0.95, val_tokens=10485760, val_target=3.28,
                  val_every=50, compile=True, window_ramp=True, window_ramp_start=128,
                  residual_scaling="forward", window_unit="block", shuffle_sequences=True)
    for cfg in (c30, c31):
        assert {k: getattr(cfg, k) for k in shared} == shared
        assert cfg.muon_lr == pytest.approx(0.15 * cfg.learning_rate) and cfg.kernel_warmup_steps > 0
    assert (c30.n_layer, c30.n_embd, c30.n_head, c30.mlp_ratio, c30.window, c30.window_ramp_steps) == \
        (12, 768, 12, 4.0, 1024, 1650)
    assert (c30.lr_decay_tokens, c30.weight_decay, c30.val_target_margin) == (800_000_000, 0.1, 0.05)
    assert (c31.n_layer, c31.n_embd, c31.n_head, c31.mlp_ratio, c31.window, c31.window_schedule) == \
        (8, 1024, 16, 2.0, 2048, "stepwise")
    assert (c31.lr_decay_tokens, c31.weight_decay, c31.val_target_margin) == (600_000_000, 0.01, 0.075)


@pytest.mark.parametrize("script, argv, message", [
    (S30, ["--window=0"], "--window_ramp grows the window from --window_ramp_start=128 to --window=0"),
    (S30, ["--window_ramp_start=2048"], "set --window >= window_ramp_start"),
    (S30, ["--window_ramp_steps=0"], "--window_ramp_steps=0 must be >= 1"),
    (S30, ["--window_ramp_start=0"], "--window_ramp_start=0"),
    (S31, ["--window=0"], "--window_ramp=false for a fixed window"),
    (S31, ["--window_schedule=cubic"], "--window_schedule='cubic' is not one of: linear, stepwise"),
    (S31, ["--window_schedule_every=0"], "--window_schedule_every=0 >= 1"),
    (S31, ["--window_schedule_start=-1"], "--window_schedule_start=-1"),
    (S31, ["--window_schedule_end=100"], "--window_schedule_end=100 is before --window_schedule_start=200"),
    (S31, ["--window_schedule_add=0"], "the stepwise schedule would never change the window"),
    (S31, ["--window_schedule_mult=-0.5"], "--window_schedule_mult=-0.5"),
    (S31, ["--window_schedule_add=-1"], "--window_schedule_add=-1"),
    (S31, ["--window_schedule_every_mult=-1"], "--window_schedule_every_mult=-1.0 must be > -1"),
])
def test_bad_window_settings_name_the_field_and_the_fix(script, argv, message):
    with pytest.raises(SystemExit) as error:
        load_script(script).parse_config(argv)
    assert message in str(error.value)


def run(script, data, out_dir, **overrides):
    module = load_script(script)
    return module.main(tiny_args(script, data, out_dir, **{**TINY_30, **overrides}))


@pytest.mark.parametrize("script", BOTH)
def test_ramp_on_and_off_and_full_causal_train(script, shakespeare, tmp_path):
    ramp = run(script, shakespeare, tmp_path, run_name="ramp", **RAMP_4_STEPS[script])
    fixed = run(script, shakespeare, tmp_path, run_name="fixed", window=512, window_ramp=False)
    causal = run(script, shakespeare, tmp_path, run_name="causal", window=0, window_ramp=False)
    for result in (ramp, fixed, causal):
        assert len(result["losses"]) == 4 and all(math.isfinite(loss) for loss in result["losses"])
    # the step line N shows the width step N - 1 trained with
    assert logged_steps(ramp["run_dir"], "window") == {1: 128, 2: 256, 3: 384, 4: 512}
    assert logged_steps(fixed["run_dir"], "window") == {1: 512, 2: 512, 3: 512, 4: 512}
    assert logged_steps(causal["run_dir"], "window") == {}
    assert ramp["model"].window.item() == 512
    assert fixed["losses"] == causal["losses"]  # a window of the whole sequence is full causal attention
    assert ramp["losses"][0] != fixed["losses"][0]  # the ramp's narrow windows were used
    # the resolved training config is logged once, before the steps
    plans = [row for row in read_log(ramp["run_dir"]) if "micro_batch_size" in row]
    assert len(plans) == 1 and plans[0]["grad_accum_steps"] == "1" and plans[0]["val_steps"] == "1"


@pytest.mark.parametrize("script", BOTH)
def test_a_resumed_run_goes_on_with_the_same_windows(script, shakespeare, tmp_path):
    args = dict(TINY_30, **RAMP_6_STEPS[script], max_steps=6, ckpt_every=3)
    module = load_script(script)
    full = module.main(tiny_args(script, shakespeare, tmp_path, run_name="full", **args))
    full_widths = logged_steps(full["run_dir"], "window")
    assert full_widths == {1: 128, 2: 128, 3: 256, 4: 256, 5: 384, 6: 384}
    step3 = os.path.join(full["run_dir"], "checkpoints", "step_000003")
    resumed = module.main(tiny_args(script, shakespeare, tmp_path, resume=step3, **args))
    assert resumed["losses"] == full["losses"][3:]  # bit for bit: the widths of steps 3-5 are not the initial 512
    assert logged_steps(full["run_dir"], "window") == full_widths  # the resumed run's lines replaced 4-6


@pytest.mark.parametrize("script", BOTH)
def test_the_demo_preset_trains_on_a_cpu(script, shakespeare, tmp_path):
    module = load_script(script)
    cfg = module.parse_config(["--preset=demo"])
    assert not cfg.compile and cfg.kernel_warmup_steps == 0 and cfg.val_target == 0 and cfg.lr_decay_tokens == 0
    result = module.main(["--preset=demo", f"--data={shakespeare}", f"--out_dir={tmp_path}", "--device=cpu",
                          "--max_steps=3", "--val_tokens=1024", "--sample_every=0", "--ckpt_every=0"])
    assert len(result["losses"]) == 3 and all(math.isfinite(loss) for loss in result["losses"])
    assert [step for step, _ in result["val_losses"]] == [0, 3]
