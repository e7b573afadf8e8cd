"""Step 27's feature (--blockmask_from_kv_blocks): FlexAttention's block mask built from each query's key range
lists exactly the tiles that create_block_mask finds by evaluating the mask function at every pair.

Eager flex_attention (the only one on a CPU) evaluates mask_mod at every pair and ignores which tiles the block
mask lists, so comparing its output with SDPA's could not catch a wrong tile: these tests compare the tiles
themselves, and the mask they imply (full tiles: every pair; partial ones: mask_mod; the rest: none)."""
import pytest
import torch

from conftest import load_script, scripts_from, tiny_args

SMALL = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=512", "--pos_emb=rotary", "--attention=flex"]
BLOCK = 128


@pytest.fixture
def module(script):
    return load_script(script)


def tokens_with_documents(B=3, T=512, seed=0):
    """Random tokens with documents starting (<|endoftext|>) inside tiles, on a tile's first and last position,
    at position 0, and one sequence that is a single document."""
    idx = torch.randint(0, 50000, (B, T), generator=torch.Generator().manual_seed(seed))
    idx[0, [p for p in (40, 127, 128, 130, 131, 300, 383) if p < T]] = 50256
    idx[1, [0, T // 2 + 1]] = 50256
    return idx


def tile_flags(num_blocks, indices):
    """(B, H, query tiles, key tiles) booleans from a BlockMask's counts and ordered indices."""
    listed = torch.arange(indices.size(-1)) < num_blocks[..., None]
    return torch.zeros(indices.shape, dtype=torch.bool).scatter(-1, indices.long(), listed)


def implied_mask(block_mask, T):
    """The (B, 1, T, T) pairs a BlockMask allows: all of a full tile, mask_mod's verdict in a partial one."""
    def spread(flags):
        return flags.repeat_interleave(BLOCK, dim=-2).repeat_interleave(BLOCK, dim=-1)[..., :T, :T]
    partial = spread(tile_flags(block_mask.kv_num_blocks, block_mask.kv_indices))
    full = spread(tile_flags(block_mask.full_kv_num_blocks, block_mask.full_kv_indices))
    positions = torch.arange(T)
    b = torch.arange(partial.size(0)).view(-1, 1, 1, 1)
    inside = block_mask.mask_mod(b, 0, positions.view(1, 1, -1, 1), positions.view(1, 1, 1, -1))
    assert not (partial & full).any()  # a tile is partial or full, never both
    return full | (partial & inside)


def both_block_masks(module, options, idx):
    """The model's block mask by create_block_mask (the parent's path) and from kv-block indices, and its dense
    mask for SDPA; the three come from one mask function."""
    torch.manual_seed(0)
    model = module.GPT(module.parse_config(SMALL + options))
    fast = module.GPT(module.parse_config(SMALL + options + ["--blockmask_from_kv_blocks=true"]))
    return (model.attention_mask(idx, flex=True), fast.attention_mask(idx, flex=True),
            model.attention_mask(idx, flex=False))


MASKS = [[], ["--window=1"], ["--window=5"], ["--window=100"], ["--window=128"], ["--window=200"], ["--window=384"],
         ["--doc_masking=true"], ["--doc_masking=true", "--window=1"], ["--doc_masking=true", "--window=100"],
         ["--doc_masking=true", "--window=250"], ["--causal=false"], ["--causal=false", "--window=100"],
         ["--causal=false", "--doc_masking=true"], ["--causal=false", "--doc_masking=true", "--window=200"],
         ["--window_unit=block", "--window=128"], ["--window_unit=block", "--window=200"],
         ["--window_unit=block", "--window=384"], ["--window_unit=block", "--window=384", "--doc_masking=true"],
         ["--window_unit=block", "--window=256", "--causal=false"]]


@pytest.mark.parametrize("script", scripts_from(27))
@pytest.mark.parametrize("options", MASKS, ids=lambda o: " ".join(o) or "causal")
@pytest.mark.parametrize("T", [512, 300])  # 300: a last tile cut short (samples grow a token at a time)
def test_kv_blocks_allow_what_create_block_mask_allows(script, module, options, T):
    idx = tokens_with_documents(T=T)
    reference, fast, dense = both_block_masks(module, options, idx)
    assert isinstance(fast, module.BlockMask) and fast.mask_mod is not None
    if "--doc_masking=true" in options and T % BLOCK == 0:  # documents: the B sequences packed into one
        packed_length = idx.numel()
        assert fast.seq_lengths == (packed_length, packed_length)
        # each sequence's own mask on the diagonal, nothing across sequences
        assert torch.equal(implied_mask(fast, packed_length)[0, 0], torch.block_diag(*dense[:, 0]))
        reference = module.create_block_mask(fast.mask_mod, None, None, packed_length, packed_length,
                                             device="cpu", BLOCK_SIZE=BLOCK)
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
            assert torch.equal(getattr(fast, name), getattr(reference, name)), name
        return
    assert fast.seq_lengths == reference.seq_lengths == (T, T) and fast.BLOCK_SIZE == (BLOCK, BLOCK)
    assert torch.equal(implied_mask(fast, T), implied_mask(reference, T))
    assert torch.equal(implied_mask(fast, T), dense.expand_as(implied_mask(fast, T)))  # what SDPA gets on a CPU
    # The same tiles, full and partial alike, in the same order (so the same kernels' work)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(fast, name), getattr(reference, name)), name


@pytest.mark.parametrize("script", scripts_from(27))
def test_tiles_of_a_window_narrower_than_a_tile(script, module):
    """Causal, window 100, 4 tiles: the diagonal tiles and those just before are partial, none is full, the rest
    is skipped. Without the window every tile below the diagonal is full."""
    idx = tokens_with_documents()[:1]
    _, fast, _ = both_block_masks(module, ["--window=100"], idx)
    assert tile_flags(fast.kv_num_blocks, fast.kv_indices)[0, 0].int().tolist() == [[1, 0, 0, 0],
                                                                                     [1, 1, 0, 0],
                                                                                     [0, 1, 1, 0],
                                                                                     [0, 0, 1, 1]]
    assert fast.full_kv_num_blocks.sum() == 0
    _, fast, _ = both_block_masks(module, [], idx)
    assert tile_flags(fast.full_kv_num_blocks, fast.full_kv_indices)[0, 0].int().tolist() == [[0, 0, 0, 0],
                                                                                               [1, 0, 0, 0],
                                                                                               [1, 1, 0, 0],
                                                                                               [1, 1, 1, 0]]
    assert fast.kv_num_blocks.tolist() == [[[1, 1, 1, 1]]]  # the diagonal only


@pytest.mark.parametrize("script", scripts_from(27))
def test_documents_give_each_sequence_its_tiles(script, module):
    """With documents the micro-batch is one sequence of B*T tokens (record #28's layout): each sequence's tiles lie
    on the diagonal, no tile crosses from one sequence to another, and a document boundary on a tile edge makes the
    tiles before it skipped for the queries after it."""
    idx = torch.randint(0, 50000, (2, 512), generator=torch.Generator().manual_seed(1))
    idx[0, 256] = 50256  # sequence 0: documents 0-255 and 256-511; sequence 1: one document
    _, fast, _ = both_block_masks(module, ["--doc_masking=true"], idx)
    full = tile_flags(fast.full_kv_num_blocks, fast.full_kv_indices)[0, 0].int().tolist()
    assert full == [[0, 0, 0, 0, 0, 0, 0, 0],
                    [1, 0, 0, 0, 0, 0, 0, 0],
                    [0, 0, 0, 0, 0, 0, 0, 0],
                    [0, 0, 1, 0, 0, 0, 0, 0],
                    [0, 0, 0, 0, 0, 0, 0, 0],
                    [0, 0, 0, 0, 1, 0, 0, 0],
                    [0, 0, 0, 0, 1, 1, 0, 0],
                    [0, 0, 0, 0, 1, 1, 1, 0]]
    assert tile_flags(fast.kv_num_blocks, fast.kv_indices)[0, 0].int().tolist() == torch.eye(8).int().tolist()


@pytest.mark.parametrize("script", scripts_from(27))
@pytest.mark.parametrize("options", [[], ["--window=100"], ["--window_unit=block", "--window=256"],
                                     ["--causal=false", "--window=200"]], ids=lambda o: " ".join(o) or "causal")
def test_packed_documents_attend_as_each_sequence_alone(script, module, options):
    """The attention over the packed micro-batch (eager flex, forward) gives each sequence what SDPA gives it with
    the per-sequence dense mask; a sequence whose length is not a whole number of tiles keeps its own mask."""
    for T in (512, 300):
        idx = tokens_with_documents(T=T)
        cfg = module.parse_config(SMALL + options + ["--doc_masking=true", "--blockmask_from_kv_blocks=true"])
        torch.manual_seed(0)
        model = module.GPT(cfg)
        block_mask, dense = model.attention_mask(idx, flex=True), model.attention_mask(idx, flex=False)
        assert block_mask.seq_lengths == ((idx.numel(),) * 2 if T % BLOCK == 0 else (T, T))
        h = torch.randn(idx.size(0), T, 32, generator=torch.Generator().manual_seed(1))
        attention = model.transformer.h[0].attn
        with torch.no_grad():
            torch.testing.assert_close(attention(h, block_mask), attention(h, dense), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("script", scripts_from(27))
def test_the_window_changes_without_recompiling(script, module):
    """The width stays a tensor in the tile arithmetic: a new width changes the tiles, and compiles nothing new."""
    model = module.GPT(module.parse_config(SMALL + ["--window=100", "--doc_masking=true",
                                                    "--blockmask_from_kv_blocks=true"]))
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    def tiles(idx):
        block_mask = model.attention_mask(idx, flex=True)
        return block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks

    torch._dynamo.reset()
    compiled = torch.compile(tiles, backend=counting_backend, fullgraph=True)
    idx = tokens_with_documents()
    narrow = compiled(idx)
    model.window.fill_(300)
    wide = compiled(idx)
    assert len(graphs) == 1
    assert not torch.equal(narrow[2], wide[2])  # with 300, some tiles are full
    reference = module.GPT(module.parse_config(SMALL + ["--window=300", "--doc_masking=true",
                                                        "--blockmask_from_kv_blocks=true"]))
    assert torch.equal(wide[2], reference.attention_mask(idx, flex=True).full_kv_num_blocks)


@pytest.mark.parametrize("script", scripts_from(27))
def test_default_is_the_parents_model(script, module):
    parent = load_script(26)  # the step before the feature
    assert module.Config().blockmask_from_kv_blocks is False
    added = {f.name for f in module.dataclasses.fields(module.Config)} - {
        f.name for f in parent.dataclasses.fields(parent.Config)}
    assert "blockmask_from_kv_blocks" in added
    x = torch.randint(0, 50257, (2, 16))
    for options in ([], ["--attention=flex", "--window=8", "--doc_masking=true"]):
        models = []
        for step in (parent, module):
            torch.manual_seed(0)
            models.append(step.GPT(step.parse_config(["--n_layer=2", "--n_head=4", "--n_embd=32",
                                                          "--block_size=16", *options])))
        assert list(models[0].state_dict()) == list(models[1].state_dict())
        with torch.no_grad():
            assert torch.equal(models[0](x), models[1](x))
    default = module.GPT(module.parse_config(SMALL))
    assert type(default.attention_mask(tokens_with_documents(), flex=True)) is module.BlockMask


@pytest.mark.parametrize("script", scripts_from(27))
def test_trains_on_a_cpu_with_the_switch_on(script, module, shakespeare, tmp_path):
    """On a CPU training takes the dense-mask SDPA path: the switch changes nothing there, and breaks nothing."""
    def losses(folder, *switch):
        options = dict(attention="flex", doc_masking="true", window=20, max_steps=8, learning_rate=1e-2)
        args = tiny_args(script, shakespeare, tmp_path / folder, **options) + list(switch)
        return module.main(args)["losses"]

    on = losses("on", "--blockmask_from_kv_blocks=true")
    assert on == pytest.approx(losses("off"), abs=1e-6) and on[-1] < on[0] - 1.0


@pytest.mark.parametrize("options, message", [
    (["--blockmask_from_kv_blocks=true"], "--blockmask_from_kv_blocks builds FlexAttention's block mask: use it "
                                          "with --attention=flex"),
    (["--attention=flex", "--blockmask_from_kv_blocks=true", "--pad_token=50300"],
     "--blockmask_from_kv_blocks does not cover --pad_token=50300 .* set --pad_token=-1 or "
     "--blockmask_from_kv_blocks=false"),
])
@pytest.mark.parametrize("script", scripts_from(27))
def test_uncovered_settings_are_refused(script, module, options, message):
    with pytest.raises(SystemExit, match=message):
        module.parse_config(options)


@pytest.mark.parametrize("script", scripts_from(27))
def test_a_window_of_whole_blocks_lists_whole_tiles(script, module):
    """window_unit=block, window 384 (3 tiles), causal: the diagonal tile is partial (causal inside it), the two
    before it are full, and no tile is cut by the window, as in the original lineage's training mask."""
    idx = torch.zeros(1, 512, dtype=torch.long)
    _, fast, _ = both_block_masks(module, ["--window_unit=block", "--window=384"], idx)
    partial = tile_flags(fast.kv_num_blocks, fast.kv_indices)[0, 0].int().tolist()
    full = tile_flags(fast.full_kv_num_blocks, fast.full_kv_indices)[0, 0].int().tolist()
    assert partial == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert full == [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0]]
