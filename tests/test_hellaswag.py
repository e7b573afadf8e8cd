"""HellaSwag (from step 07): acc_norm-style scoring, one-shot contexts, examples sharded over ranks."""
import json

import pytest
import torch

from conftest import load_script, logged_steps, scripts_from, tiny_args

ENDINGS = {"gold": "alpha alpha alpha", "wrong": ["beta beta", "gamma gamma gamma gamma", "delta"]}


def write_hellaswag(path, n=7):
    """n examples in the official format; the correct ending (always the alpha one) moves between positions."""
    with open(path, "w") as f:
        for i in range(n):
            endings = list(ENDINGS["wrong"])
            endings.insert(i % 4, ENDINGS["gold"])
            f.write(json.dumps({"ind": i, "ctx": f"Example {i}: the man picks up the", "endings": endings,
                                "label": i % 4, "activity_label": "test", "split": "val"}) + "\n")
    return str(path)


class Prefers(torch.nn.Module):
    """A stand-in model that always predicts one token (the first token of ' word') with high confidence."""

    def __init__(self, token):
        super().__init__()
        self.token = token

    def forward(self, idx, targets=None):
        logits = torch.zeros(idx.size(0), idx.size(1), 50304)
        logits[..., self.token] = 10.0
        return logits


def score(module, path, preferred_word, mode="standard", rank=0, world_size=1):
    cfg = module.parse_config([f"--hellaswag_path={path}", f"--hellaswag_mode={mode}", "--block_size=64"])
    token = module.gpt2_encoding().encode_ordinary(" " + preferred_word)[0]
    return module.evaluate_hellaswag(Prefers(token), module.load_hellaswag(path), cfg, rank, world_size,
                                     torch.device("cpu"), torch.autocast("cpu", enabled=False))


@pytest.mark.parametrize("script", scripts_from(7))
@pytest.mark.parametrize("mode", ["standard", "one-shot"])
def test_a_model_preferring_the_labelled_ending_scores_100_and_another_0(script, mode, tmp_path):
    module = load_script(script)
    path = write_hellaswag(tmp_path / "hellaswag_val.jsonl")
    assert score(module, path, "alpha", mode) == (7, 7)
    assert score(module, path, "beta", mode) == (0, 7)


@pytest.mark.parametrize("script", scripts_from(7))
def test_one_shot_puts_a_solved_example_first(script, tmp_path):
    module = load_script(script)
    examples = module.load_hellaswag(write_hellaswag(tmp_path / "h.jsonl"))
    encoding = module.gpt2_encoding()
    rows = module.hellaswag_rows(examples[3], encoding, shot=examples[2])
    text = encoding.decode(rows[1][0])
    assert text.startswith("Example 2: the man picks up the alpha alpha alpha\n\nExample 3:")
    standard = module.hellaswag_rows(examples[3], encoding)
    assert encoding.decode(standard[0][0]) == "Example 3: the man picks up the beta beta"
    assert standard[0][1] == len(encoding.encode_ordinary(" beta beta"))


@pytest.mark.parametrize("script", scripts_from(7))
def test_examples_sharded_over_ranks_add_up_to_one_rank(script, tmp_path, monkeypatch):
    module = load_script(script)
    path = write_hellaswag(tmp_path / "h.jsonl")
    monkeypatch.setattr(module.dist, "all_reduce", lambda tensor: None)  # each rank returns its own share
    shares = [score(module, path, "alpha", rank=r, world_size=3) for r in range(3)]
    assert [total for _, total in shares] == [3, 2, 2]
    assert tuple(map(sum, zip(*shares))) == (7, 7)


@pytest.mark.parametrize("script", scripts_from(7))
def test_runs_during_training_and_bad_files_fail_clearly(script, shakespeare, tmp_path):
    module = load_script(script)
    path = write_hellaswag(tmp_path / "h.jsonl", n=5)
    result = module.main(tiny_args(script, shakespeare, tmp_path, run_name="r", max_steps=4, hellaswag_every=2,
                                   hellaswag_path=path, hellaswag_mode="one-shot", hellaswag_examples=4))
    assert sorted(logged_steps(result["run_dir"], "hellaswag_total").items()) == [(0, 4), (2, 4), (4, 4)]
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"ctx": "x", "endings": ["a", "b"], "label": 0}) + "\n")
    with pytest.raises(SystemExit, match="line 1: expected the official format"):
        module.load_hellaswag(str(broken))
    with pytest.raises(SystemExit, match="is missing and could not be downloaded"):  # offline: no network in tests
        module.load_hellaswag(str(tmp_path / "absent.jsonl"))
    with pytest.raises(SystemExit, match="--hellaswag_mode='two-shot'"):
        module.parse_config(["--hellaswag_mode=two-shot"])
