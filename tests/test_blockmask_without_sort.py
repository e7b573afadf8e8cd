"""--blockmask_without_sort (step 68, on): the block mask's tile lists (per query tile its key tiles, per key tile its
query tiles) made by a running count and a scatter instead of argsort, whose compiled form was a Triton sort kernel
that took up to 38 s to build. The lists are the argsort's, entry for entry, for every mask the model builds; the
compiled graph holds no sort; FlexAttention computes the same with either mask; off, the step is its parent."""
import pytest
import torch

from lever_helpers import REAL_COMPILE, build, lever_and_parent, train

lever, parent_step = lever_and_parent("blockmask_without_sort")
SMALL = dict(n_layer=1, n_head=2, n_embd=32, block_size=512, attention="flex", blockmask_from_kv_blocks=True,
             compile=False)
LISTS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
         "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")
MASKS = [dict(window=0), dict(window=100), dict(window=384, window_unit="block"), dict(doc_masking=True),
         dict(doc_masking=True, window=250), dict(doc_masking=True, window=384, window_unit="block"),
         dict(causal=False, window=200)]


def tokens(B=3, T=512):
    idx = torch.randint(0, 50000, (B, T), generator=torch.Generator().manual_seed(0))
    idx[0, [40, 127, 128, 290]] = 50256  # documents starting inside tiles and on a tile's edges
    idx[1, [0, T // 2 + 1]] = 50256
    return idx


def block_masks(options, T=512):
    """The block mask of a small model with the switch off (argsort, the parent's) and on, for the same tokens."""
    idx = tokens(T=T)
    masks = []
    for without_sort in (False, True):
        model, _ = build(lever, blockmask_without_sort=without_sort, **SMALL, **options)
        masks.append(model.attention_mask(idx, flex=True))
    return masks


def test_on_by_default_and_off_is_the_parent():
    assert lever.Config().blockmask_without_sort is True and not hasattr(parent_step.Config, "blockmask_without_sort")
    model, cfg = build(lever, blockmask_without_sort=False)
    parent, parent_cfg = build(parent_step)
    assert train(model, cfg, lever, 3) == train(parent, parent_cfg, parent_step, 3)
    idx = tokens()
    off, _ = build(lever, blockmask_without_sort=False, **SMALL, window=100)
    parent, _ = build(parent_step, **SMALL, window=100)
    for name in LISTS:
        assert torch.equal(getattr(off.attention_mask(idx, flex=True), name),
                           getattr(parent.attention_mask(idx, flex=True), name)), name


@pytest.mark.parametrize("options", MASKS, ids=lambda o: " ".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("T", [512, 300])  # 300: a last tile cut short
def test_the_lists_are_the_argsorts_entry_for_entry(options, T):
    with_sort, without_sort = block_masks(options, T)
    assert without_sort.seq_lengths == with_sort.seq_lengths and without_sort.BLOCK_SIZE == with_sort.BLOCK_SIZE
    assert without_sort.mask_mod is not None
    for name in LISTS:
        mine, theirs = getattr(without_sort, name), getattr(with_sort, name)
        assert mine.dtype == theirs.dtype == torch.int32 and mine.is_contiguous(), name
        assert torch.equal(mine, theirs), name


def test_listed_first_is_a_stable_descending_argsort():
    generator = torch.Generator().manual_seed(1)
    grid = torch.rand(2, 1, 9, 11, generator=generator) < 0.4
    grid[0, 0, 0] = True  # a row all set
    grid[0, 0, 1] = False  # a row with none
    for tiles in (grid, grid.transpose(-2, -1)):  # the transposed grid (the backward's lists) is not contiguous
        count, indices = lever.listed_first(tiles)
        assert torch.equal(count, tiles.int().sum(dim=-1, dtype=torch.int32))
        assert torch.equal(indices, tiles.int().argsort(dim=-1, descending=True, stable=True).int())


@pytest.mark.parametrize("without_sort", [False, True])
def test_the_compiled_mask_holds_no_sort_only_when_on(without_sort):
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm
    model, _ = build(lever, blockmask_without_sort=without_sort, **SMALL, doc_masking=True, window=250)
    idx = tokens()
    compiled = REAL_COMPILE(lambda idx: model.attention_mask(idx, flex=True), backend=recording, fullgraph=True)
    mask = compiled(idx)
    targets = [str(node.target) for gm in graphs for node in gm.graph.nodes if node.op in ("call_function",
                                                                                          "call_method")]
    assert any("scatter" in t for t in targets) == without_sort
    assert any("sort" in t for t in targets) == (not without_sort)  # argsort: the parent's path
    assert torch.equal(mask.kv_indices, model.attention_mask(idx, flex=True).kv_indices)


def test_flex_attention_computes_the_same_with_either_mask():
    with_sort, without_sort = block_masks(dict(doc_masking=True, window=250))
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 3 * 512, 16, generator=generator) for _ in range(3))  # 3 sequences packed in one
    assert torch.equal(lever.flex_attention(q, k, v, block_mask=without_sort),
                       lever.flex_attention(q, k, v, block_mask=with_sort))
