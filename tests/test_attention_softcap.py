"""The attention soft-cap (from step 23): each backend stays within its stated distance of cap * tanh(s / cap), and
FlexAttention's score_mod and the spelled-out SDPA path apply the same cap under every mask."""
import pytest
import torch
import torch.nn.functional as F

from conftest import load_script, scripts_from
from test_attention_masks import SMALL, tokens_with_documents

BOUNDS = {"exact": 1e-6, "clamp": 0.2385, "rational": 1e-4}  # the largest distance from the exact cap, x cap


@pytest.mark.parametrize("script", scripts_from(23))
@pytest.mark.parametrize("backend", list(BOUNDS))
def test_each_backend_is_within_its_bound_of_tanh(script, backend):
    module = load_script(script)
    cap = 3.0
    scores = torch.linspace(-40, 40, 100001, dtype=torch.float64).float()
    exact = cap * torch.tanh(scores.double() / cap)
    error = (module.soft_cap(scores, cap, backend).double() - exact).abs().max().item()
    assert error <= BOUNDS[backend] * cap
    if backend != "exact":  # each stand-in is a stand-in, not tanh itself
        assert error > BOUNDS[backend] * cap / 10
    assert module.soft_cap(scores, cap, backend).abs().max() <= cap


def outputs(module, options, cap_options):
    """(flex with the cap as score_mod, SDPA path with the cap, uncapped SDPA) of one attention layer whose scores
    are made large, so the cap bites."""
    cfg = module.parse_config(SMALL + ["--n_kv_head=2", *options, *cap_options])
    torch.manual_seed(0)
    model = module.GPT(cfg)
    attention = model.transformer.h[0].attn
    with torch.no_grad():
        attention.c_attn.weight.mul_(20)
    idx = tokens_with_documents()
    h = torch.randn(2, 256, 32, generator=torch.Generator().manual_seed(1))
    dense = model.attention_mask(idx, flex=False)
    with torch.no_grad():
        capped_flex = attention(h, model.attention_mask(idx, flex=True))
        capped_dense = attention(h, dense)
        attention.attn_softcap = 0.0
        uncapped = attention(h, dense)
    return capped_flex, capped_dense, uncapped


@pytest.mark.parametrize("script", scripts_from(23))
@pytest.mark.parametrize("backend", list(BOUNDS))
@pytest.mark.parametrize("options", [[], ["--window=100", "--doc_masking=true"]])
def test_flex_and_sdpa_apply_the_same_cap(script, backend, options):
    module = load_script(script)
    capped_flex, capped_dense, uncapped = outputs(module, options, ["--attn_softcap=2",
                                                                     f"--attn_softcap_backend={backend}"])
    assert torch.allclose(capped_flex, capped_dense, atol=1e-5)
    assert not torch.allclose(capped_dense, uncapped, atol=1e-2)  # the cap changed the attention


@pytest.mark.parametrize("script", scripts_from(23))
def test_the_sdpa_path_is_attention_with_capped_scores(script):
    module = load_script(script)
    q, k, v = (torch.randn(2, 4, 16, 8, generator=torch.Generator().manual_seed(i)) * 3 for i in range(3))
    causal = torch.ones(16, 16, dtype=torch.bool).tril()
    assert torch.allclose(module.capped_attention(q, k, v, causal, 1e9, "exact"),  # a cap too high to bite
                          F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-4)
    scores = 1.5 * torch.tanh((q @ k.transpose(-2, -1)) / 8 ** 0.5 / 1.5)
    expected = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
    assert torch.allclose(module.capped_attention(q, k, v, causal, 1.5, "exact"), expected, atol=1e-5)


@pytest.mark.parametrize("script", scripts_from(23))
def test_a_capped_model_trains(script):
    module = load_script(script)
    cfg = module.parse_config(SMALL + ["--block_size=32", "--attn_softcap=5", "--attn_softcap_backend=rational"])
    torch.manual_seed(0)
    model = module.GPT(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = tokens_with_documents(T=33)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = model(x[:, :-1], x[:, 1:].contiguous())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 2.0
    assert model.transformer.h[0].attn.c_attn.weight.grad is not None


@pytest.mark.parametrize("script", scripts_from(23))
def test_bad_caps_are_refused(script):
    module = load_script(script)
    with pytest.raises(SystemExit, match="--attn_softcap=-1.0 must be >= 0"):
        module.parse_config(["--attn_softcap=-1"])
    with pytest.raises(SystemExit, match="--attn_softcap_backend='ptx' is not one of"):
        module.parse_config(["--attn_softcap_backend=ptx"])
