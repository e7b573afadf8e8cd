"""Sampling (from step 05): temperature, top-k, a seeded generator, samples that lengthen with training."""
import re

import pytest
import torch

from conftest import load_script, scripts_from, tiny_args


def read_samples(run_dir):
    """[(step, text)] from a run's log: a `step:N/M sample:i` line, then the text as it reads, each line behind
    '  | '."""
    samples = []
    with open(f"{run_dir}/log.txt", encoding="utf-8") as f:
        for line in f.read().split("\n"):
            if line.startswith("  | "):
                samples[-1][1].append(line[4:])
            elif re.fullmatch(r"step:\d+/\d+ sample:\d+", line):
                samples.append((int(line.split("/")[0][len("step:"):]), []))
    return [(step, "\n".join(lines)) for step, lines in samples]


class FixedLogits(torch.nn.Module):
    """A stand-in model: the same next-token logits at every position, whatever the input."""

    def __init__(self, logits, block_size=8):
        super().__init__()
        self.logits = logits
        self.cfg = type("Cfg", (), {"block_size": block_size})

    def forward(self, idx, targets=None):
        return self.logits.expand(idx.size(0), idx.size(1), -1)


def draw(module, temperature, top_k, seed=0, n=100):
    logits = torch.zeros(50304)
    logits[:5] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    logits[50257:] = 100.0  # padding rows of the vocabulary: must never be sampled
    generator = torch.Generator().manual_seed(seed)
    out = module.generate(FixedLogits(logits), torch.zeros(n, 1, dtype=torch.long), 3, temperature, top_k, generator)
    return out[:, 1:]


@pytest.mark.parametrize("script", scripts_from(5))
def test_top_k_temperature_and_seed(script):
    module = load_script(script)
    assert set(draw(module, 1.0, 3).unique().tolist()) == {0, 1, 2}  # only the 3 most likely tokens
    assert draw(module, 1.0, 0).max() < 50257  # never a padding token
    assert len(draw(module, 1.0, 0).unique()) > 5  # without top-k the tail is reachable
    assert (draw(module, 0.0, 0) == 0).all()  # temperature 0: the most likely token, always
    assert (draw(module, 1.0, 1) == 0).all()  # top-1 is greedy too
    hot, cold = draw(module, 5.0, 5), draw(module, 0.2, 5)
    assert (hot == 0).float().mean() < 0.5 < (cold == 0).float().mean()  # temperature flattens or sharpens
    assert torch.equal(draw(module, 1.0, 5, seed=1), draw(module, 1.0, 5, seed=1))  # seeded: reproducible
    assert not torch.equal(draw(module, 1.0, 5, seed=1), draw(module, 1.0, 5, seed=2))


@pytest.mark.parametrize("script", scripts_from(5))
def test_sample_length_grows_by_the_schedule(script):
    module = load_script(script)
    cfg = module.parse_config(["--max_steps=100", "--sample_min_tokens=10", "--sample_max_tokens=60"])
    assert [module.sample_length(s, cfg) for s in (0, 10, 50, 99, 100)] == [10, 15, 35, 59, 60]


@pytest.mark.parametrize("script", scripts_from(5))
def test_samples_in_the_log_deterministic_for_a_seed(script, shakespeare, tmp_path):
    module = load_script(script)
    args = dict(max_steps=4, sample_every=2, sample_prompts="ROMEO:|JULIET:", sample_count=2,
                sample_min_tokens=4, sample_max_tokens=12)

    def samples(run_name, **extra):
        run_dir = module.main(tiny_args(script, shakespeare, tmp_path, run_name=run_name, **{**args, **extra}))["run_dir"]
        return read_samples(run_dir)

    first = samples("a")
    assert [step for step, _ in first] == [0] * 4 + [2] * 4 + [4] * 4
    assert [text.split(":")[0] for _, text in first[:4]] == ["ROMEO", "ROMEO", "JULIET", "JULIET"]
    encoding = module.gpt2_encoding()
    lengths = {step: len(encoding.encode(text)) for step, text in first}  # re-encoded: about 2 + 4, 8, 12 tokens
    assert lengths[0] < lengths[4]
    assert samples("b") == first
    assert samples("c", seed=7) != first
    assert samples("off", sample_every=0) == []


@pytest.mark.parametrize("script", scripts_from(5))
def test_an_empty_prompt_is_a_config_error(script):
    module = load_script(script)
    for prompts in ("a||b", "|a", "a|", " "):
        with pytest.raises(SystemExit, match="--sample_prompts=.* holds an empty prompt"):
            module.parse_config([f"--sample_prompts={prompts}"])
    assert module.parse_config(["--sample_prompts=", "--sample_every=0"]).sample_every == 0  # not sampling: fine
