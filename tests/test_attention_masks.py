"""Attention masks (from step 21): FlexAttention's block mask and SDPA's dense mask come from one mask function
and give the same attention; document masking keeps each document to itself."""
import pytest
import torch
import torch.nn.functional as F

from conftest import load_script, scripts_from

SMALL = ["--n_layer=2", "--n_head=4", "--n_embd=32", "--block_size=256", "--pos_emb=rotary"]


def tokens_with_documents(B=2, T=256, seed=0):
    """Random tokens where documents start (<|endoftext|>) at a few places, some inside a 128-token tile."""
    idx = torch.randint(0, 50000, (B, T), generator=torch.Generator().manual_seed(seed))
    idx[0, [p * T // 256 for p in (40, 130, 131, 200)]] = 50256
    idx[1, [1, T // 2]] = 50256
    return idx


def flex_and_dense(module, options, idx=None, n_kv_head=4):
    """One attention layer's output (B, T, C) under the options' mask: through FlexAttention's block mask (eager,
    forward only on a CPU) and through SDPA with the dense mask."""
    cfg = module.parse_config(SMALL + [f"--n_kv_head={n_kv_head}", *options])
    idx = tokens_with_documents() if idx is None else idx
    torch.manual_seed(0)
    model = module.GPT(cfg)
    attention = model.transformer.h[0].attn
    h = torch.randn(idx.size(0), idx.size(1), 32, generator=torch.Generator().manual_seed(1))
    block_mask = model.attention_mask(idx, flex=True)
    dense = model.attention_mask(idx, flex=False)
    assert isinstance(block_mask, module.BlockMask) and dense.dtype == torch.bool
    with torch.no_grad():
        return attention(h, block_mask), attention(h, dense), attention(h)  # the last: plain causal SDPA


@pytest.mark.parametrize("script", scripts_from(21))
@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_flex_matches_sdpa_with_the_dense_mask(script, n_kv_head):
    module = load_script(script)
    flex, dense, causal = flex_and_dense(module, ["--attention=flex"], n_kv_head=n_kv_head)
    assert torch.allclose(flex, dense, atol=1e-5) and torch.allclose(dense, causal, atol=1e-5)
    flex, dense, causal = flex_and_dense(module, ["--attention=flex", "--doc_masking=true"], n_kv_head=n_kv_head)
    assert torch.allclose(flex, dense, atol=1e-5)
    assert not torch.allclose(dense, causal, atol=1e-3)  # the documents changed the attention


@pytest.mark.parametrize("script", scripts_from(21))
def test_dense_mask_is_causal_within_documents(script):
    module = load_script(script)
    model = module.GPT(module.parse_config(SMALL + ["--doc_masking=true"]))
    idx = torch.tensor([[7, 50256, 8, 9, 50256, 10]])
    mask = model.attention_mask(idx, flex=False)[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0, 0],   # the tail of a document that began before the sequence
                    [0, 1, 0, 0, 0, 0],   # <|endoftext|> opens the next document, and belongs to it
                    [0, 1, 1, 0, 0, 0],
                    [0, 1, 1, 1, 0, 0],
                    [0, 0, 0, 0, 1, 0],
                    [0, 0, 0, 0, 1, 1]]
    assert module.GPT(module.parse_config(SMALL)).attention_mask(idx, flex=False) is None  # the parent's path


@pytest.mark.parametrize("script", scripts_from(21))
@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_a_document_never_sees_the_one_before(script, attention):
    """Changing the tokens of the first document leaves the model's outputs on the next one unchanged."""
    module = load_script(script)
    cfg = module.parse_config(SMALL + ["--block_size=32", f"--attention={attention}", "--doc_masking=true"])
    torch.manual_seed(0)
    model = module.GPT(cfg)
    idx = torch.randint(0, 50000, (1, 32), generator=torch.Generator().manual_seed(2))
    idx[0, 12] = 50256
    other = idx.clone()
    other[0, :12] = torch.randint(0, 50000, (12,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, other_logits = model(idx), model(other)
    assert torch.allclose(logits[0, 12:], other_logits[0, 12:], atol=1e-5)
    assert not torch.allclose(logits[0, :12], other_logits[0, :12], atol=1e-3)
    plain = module.GPT(module.parse_config(SMALL + ["--block_size=32", f"--attention={attention}"]))
    with torch.no_grad():
        assert not torch.allclose(plain(idx)[0, 12:], plain(other)[0, 12:], atol=1e-3)


@pytest.mark.parametrize("script", scripts_from(21))
def test_flex_trains_on_a_cpu_through_the_dense_mask(script):
    module = load_script(script)

    def losses(*options):
        cfg = module.parse_config(SMALL + ["--block_size=32", *options])
        torch.manual_seed(0)
        model = module.GPT(cfg)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        x = tokens_with_documents(T=33)
        result = []
        for _ in range(15):
            optimizer.zero_grad()
            loss = model(x[:, :-1], x[:, 1:].contiguous())
            loss.backward()
            optimizer.step()
            result.append(loss.item())
        return result

    sdpa, flex = losses(), losses("--attention=flex")
    assert flex == pytest.approx(sdpa, abs=1e-4)  # the same causal attention, by another path
    documents = losses("--attention=flex", "--doc_masking=true")
    assert documents[-1] < documents[0] - 2.0 and documents != pytest.approx(sdpa, abs=1e-3)


@pytest.mark.parametrize("script", scripts_from(21))
def test_unknown_attention_is_refused(script):
    with pytest.raises(SystemExit, match="--attention='flash' is not one of: sdpa, flex"):
        load_script(script).parse_config(["--attention=flash"])


@pytest.mark.parametrize("script", scripts_from(22))
@pytest.mark.parametrize("options", [["--window=100"], ["--window=100", "--doc_masking=true"], ["--window=1"],
                                     ["--window=128", "--window_unit=block"]])
def test_window_flex_matches_sdpa_with_the_dense_mask(script, options):
    module = load_script(script)
    flex, dense, causal = flex_and_dense(module, ["--attention=flex", *options], n_kv_head=2)
    assert torch.allclose(flex, dense, atol=1e-5)
    assert not torch.allclose(dense, causal, atol=1e-3)  # the window changed the attention


@pytest.mark.parametrize("script", scripts_from(22))
def test_window_keeps_the_latest_keys_within_the_document(script):
    module = load_script(script)
    model = module.GPT(module.parse_config(SMALL + ["--window=2", "--doc_masking=true"]))
    idx = torch.tensor([[7, 8, 9, 50256, 10, 11]])
    assert model.attention_mask(idx, flex=False)[0, 0].int().tolist() == [[1, 0, 0, 0, 0, 0],
                                                                           [1, 1, 0, 0, 0, 0],
                                                                           [0, 1, 1, 0, 0, 0],
                                                                           [0, 0, 0, 1, 0, 0],
                                                                           [0, 0, 0, 1, 1, 0],
                                                                           [0, 0, 0, 0, 1, 1]]


@pytest.mark.parametrize("script", scripts_from(22))
def test_a_window_of_whole_blocks(script):
    """window_unit=block: a query sees every earlier key of its own 128-token block and of the window / 128 - 1
    blocks before it (a width between two multiples of 128 counts the blocks that start within it)."""
    module = load_script(script)
    idx = torch.zeros(1, 512, dtype=torch.long)
    for window, blocks in ((128, 1), (256, 2), (200, 2), (129, 2)):
        options = ["--block_size=512", f"--window={window}", "--window_unit=block"]
        model = module.GPT(module.parse_config(SMALL + options))
        mask = model.attention_mask(idx, flex=False)[0, 0]
        for query in (0, 127, 128, 300, 511):
            first = max(0, (query // 128 - blocks + 1) * 128)
            assert mask[query].nonzero().flatten().tolist() == list(range(first, query + 1)), (window, query)
    tokens = module.GPT(module.parse_config(SMALL + ["--block_size=512", "--window=128"]))
    assert tokens.attention_mask(idx, flex=False)[0, 0, 300].sum() == 128  # the unit changes what is seen


@pytest.mark.parametrize("script", scripts_from(22))
def test_unknown_window_unit_is_refused(script):
    with pytest.raises(SystemExit, match="--window_unit='tile' is not one of: token, block"):
        load_script(script).parse_config(["--window_unit=tile"])


@pytest.mark.parametrize("script", scripts_from(22))
def test_the_window_changes_without_recompiling(script):
    """The width is a tensor the compiled graph reads: a Python int would be baked in and force a recompile."""
    module = load_script(script)
    torch.manual_seed(0)
    model = module.GPT(module.parse_config(SMALL + ["--block_size=32", "--window=4"]))
    torch.manual_seed(0)
    full = module.GPT(module.parse_config(SMALL + ["--block_size=32"]))
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting_backend)
    x = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        narrow = compiled(x)
        compiled_graphs = len(graphs)
        model.window.fill_(32)  # as wide as the sequence: full causal attention
        wide = compiled(x)
        assert len(graphs) == compiled_graphs
        assert torch.allclose(wide, full(x), atol=1e-5) and not torch.allclose(narrow, wide, atol=1e-3)
        model.window.fill_(4)
        assert torch.allclose(compiled(x), narrow, atol=1e-6)
    assert len(graphs) == compiled_graphs


PAD = 50300  # one of the vocabulary's padding rows: never a GPT-2 token


def padded_tokens():
    """tokens_with_documents() with left padding in the first sequence and right padding in the second."""
    idx = tokens_with_documents()
    idx[0, :37] = PAD
    idx[1, 200:] = PAD
    return idx


@pytest.mark.parametrize("script", scripts_from(24))
@pytest.mark.parametrize("options", [["--causal=false"], ["--causal=false", "--doc_masking=true", "--window=100"],
                                     [f"--pad_token={PAD}"], [f"--pad_token={PAD}", "--causal=false"]])
def test_padding_and_non_causal_flex_match_sdpa_with_the_dense_mask(script, options):
    module = load_script(script)
    flex, dense, causal = flex_and_dense(module, ["--attention=flex", *options], idx=padded_tokens(), n_kv_head=2)
    assert torch.allclose(flex, dense, atol=1e-5)
    assert not torch.allclose(dense, causal, atol=1e-3)


@pytest.mark.parametrize("script", scripts_from(24))
def test_padding_keys_are_seen_by_padding_queries_only(script):
    module = load_script(script)
    idx = torch.tensor([[PAD, PAD, 5, 6, PAD]])

    def rows(*options):
        model = module.GPT(module.parse_config(SMALL + [f"--pad_token={PAD}", *options]))
        return model.attention_mask(idx, flex=False)[0, 0].int().tolist()

    assert rows() == [[1, 0, 0, 0, 0],
                      [1, 1, 0, 0, 0],
                      [0, 0, 1, 0, 0],
                      [0, 0, 1, 1, 0],
                      [1, 1, 1, 1, 1]]
    assert rows("--causal=false") == [[1, 1, 1, 1, 1],
                                      [1, 1, 1, 1, 1],
                                      [0, 0, 1, 1, 0],
                                      [0, 0, 1, 1, 0],
                                      [1, 1, 1, 1, 1]]
    assert rows("--causal=false", "--window=2")[2] == [0, 0, 1, 1, 0]  # both sides, padding still hidden


@pytest.mark.parametrize("script", scripts_from(24))
def test_left_padding_changes_nothing_for_the_real_tokens(script):
    """With rotary positions (relative), a sequence behind 5 padding tokens gives the same outputs as alone, and
    its loss ignores targets that are padding."""
    module = load_script(script)

    def model(*options):
        torch.manual_seed(0)
        return module.GPT(module.parse_config(SMALL + ["--block_size=32", "--causal=false", *options]))

    masked, unmasked = model(f"--pad_token={PAD}"), model()
    idx = torch.randint(0, 50000, (1, 20), generator=torch.Generator().manual_seed(4))
    behind_padding = torch.cat([torch.full((1, 5), PAD), idx], dim=1)
    with torch.no_grad():
        alone = masked(idx)
        assert torch.allclose(masked(behind_padding)[:, 5:], alone, atol=1e-5)
        assert not torch.allclose(unmasked(behind_padding)[:, 5:], alone, atol=1e-3)
        targets = torch.roll(behind_padding, -1, dims=1)
        loss = masked(behind_padding, targets)
        real = F.cross_entropy(masked(behind_padding)[0, 4:-1], targets[0, 4:-1])  # padding: 0-3 and the last
        assert loss.item() == pytest.approx(real.item(), abs=1e-5)


@pytest.mark.parametrize("script", scripts_from(24))
def test_non_causal_attention_sees_later_tokens(script):
    module = load_script(script)
    idx = torch.randint(0, 50000, (1, 16), generator=torch.Generator().manual_seed(5))
    later_changed = idx.clone()
    later_changed[0, 10:] = 7
    for causal, first_changes in (("true", False), ("false", True)):
        torch.manual_seed(0)
        model = module.GPT(module.parse_config(SMALL + ["--block_size=32", f"--causal={causal}"]))
        with torch.no_grad():
            changed = not torch.allclose(model(idx)[0, 0], model(later_changed)[0, 0], atol=1e-5)
        assert changed == first_changes


@pytest.mark.parametrize("script", scripts_from(24))
def test_bad_pad_token_is_refused(script):
    with pytest.raises(SystemExit, match="--pad_token=60000 is not a token id below --vocab_size=50304"):
        load_script(script).parse_config(["--pad_token=60000"])
