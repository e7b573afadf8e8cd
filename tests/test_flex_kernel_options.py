"""--flex_kernel_options (step 60, empty by default): KEY=N items that every FlexAttention call passes to its Triton
kernels as kernel_options (tiles, warps, stages; fwd_ or bwd_ for one direction). Empty, the calls pass none, as
the parent (step 59) does; set, each attention layer passes exactly that dict (the CPU's eager FlexAttention
ignores it, so the attention is the same); malformed items, tiles the 128-token block mask cannot hold, and the
setting without FlexAttention are refused before anything runs, naming the field."""
import pytest
import torch

from conftest import script_number, step_adding
from lever_helpers import build, lever_and_parent, train

lever, parent_step = lever_and_parent("flex_kernel_options")
LEVER_SCRIPT = step_adding("flex_kernel_options")
# two attending blocks on FlexAttention (its forward runs eagerly on the CPU), no value embeddings
FLEX = ["--n_layer=2", "--n_head=4", "--n_embd=32", "--block_size=256", "--attention=flex", "--window=128",
        "--long_window_layers=", "--attention_free_layers=", "--value_embeddings=0"]


def flex_calls(monkeypatch, *options):
    """The kernel_options of every flex_attention call when each block's attention runs on FlexAttention's block
    mask, and their outputs."""
    calls = []
    real = lever.flex_attention

    def recording(*args, **kwargs):
        calls.append(kwargs.get("kernel_options"))
        return real(*args, **kwargs)
    monkeypatch.setattr(lever, "flex_attention", recording)
    cfg = lever.parse_config(FLEX + list(options))
    torch.manual_seed(0)
    model = lever.GPT(cfg).eval()
    idx = torch.randint(0, 1000, (1, 256), generator=torch.Generator().manual_seed(1))
    block_mask = model.attention_mask(idx, flex=True)  # on a CPU the model itself takes the dense mask's path
    h = torch.randn(1, 256, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = torch.stack([block.attn(h, block_mask) for block in model.transformer.h])
    return calls, out


def test_empty_by_default_and_empty_is_the_parent():
    assert lever.Config().flex_kernel_options == "" and not hasattr(parent_step.Config, "flex_kernel_options")
    assert f"    {script_number(LEVER_SCRIPT)}  --flex_kernel_options" in lever.__doc__
    model, cfg = build(lever)
    parent, parent_cfg = build(parent_step)
    assert train(model, cfg, lever, 3) == train(parent, parent_cfg, parent_step, 3)


def test_every_attention_layer_passes_exactly_the_options(monkeypatch):
    calls, default = flex_calls(monkeypatch)
    assert calls == [None, None]  # empty: torch's own choice, as the parent
    options = "fwd_BLOCK_M=128,fwd_BLOCK_N=64,bwd_BLOCK_M1=32,bwd_BLOCK_N1=128,num_warps=8,bwd_num_stages=3"
    calls, tuned = flex_calls(monkeypatch, f"--flex_kernel_options={options}")
    wanted = {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 128, "num_warps": 8,
              "bwd_num_stages": 3}
    assert calls == [wanted, wanted]
    assert torch.equal(tuned, default)  # tiles change how the kernels run, never what they compute


@pytest.mark.parametrize("value, message", [
    ("BLOCK_Q=64", "'BLOCK_Q=64' is not KEY=N with KEY one of BLOCK_M, BLOCK_N"),
    ("fwd_BLOCK_M=abc", "'fwd_BLOCK_M=abc' is not KEY=N"),
    ("num_warps=4,num_warps=8", "'num_warps=8' is not KEY=N .* each once"),
    ("fwd_BLOCK_N", "'fwd_BLOCK_N' is not KEY=N"),
    ("BLOCK_M=96", "BLOCK_M=96 must be a power of 2 from 16 that divides the block mask's 128-token tiles"),
    ("bwd_BLOCK_N2=256", "bwd_BLOCK_N2=256 must be a power of 2 from 16"),
    ("BLOCK_N=8", "BLOCK_N=8 must be a power of 2 from 16"),
    ("fwd_num_warps=32", "fwd_num_warps=32 is out of range"),
    ("num_stages=0", "num_stages=0 is out of range"),
])
def test_bad_options_are_refused_naming_the_field(value, message):
    with pytest.raises(SystemExit, match=rf"--flex_kernel_options='{value}'.*{message}"):
        lever.parse_config([f"--flex_kernel_options={value}"])


def test_only_with_flexattention():
    with pytest.raises(SystemExit, match="--flex_kernel_options='num_warps=4' sets FlexAttention's kernels, but "
                                         "--attention=sdpa: use --attention=flex or drop it"):
        lever.parse_config(["--attention=sdpa", "--blockmask_from_kv_blocks=false", "--flex_kernel_options=num_warps=4"])
    assert lever.parse_config(["--flex_kernel_options=BLOCK_M=128,BLOCK_N=64"]).flex_kernel_options == \
        "BLOCK_M=128,BLOCK_N=64"
