"""fineweb-npy.py: token shards from local files, offline; resume and atomic writes."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, load_script

EOT = 50256
SHARD_SIZE = 300


@pytest.fixture(scope="module")
def fw():
    return load_script("fineweb-npy.py")


@pytest.fixture(scope="module")
def enc(fw):
    return fw.gpt2_tokenizer.encoding()


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """`datasets` caches what it reads from local files: keep that in the test's tmp folder, not ~/.cache."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


def make_docs():
    """50 documents of varied size and script, incl. an empty one, a literal "<|endoftext|>" and one > 2 shards."""
    words = ["the", "café", "naïve", "Straße", "日本語のテキスト", "emoji 🙂🚀", "Ελληνικά", "русский", "mixed123"]
    docs = []
    for i in range(50):
        docs.append(" ".join(words[(i + j) % len(words)] for j in range(3 + (i * 7) % 40)) + f"\n\nend of doc {i}.")
    docs[5] = ""
    docs[11] = "a literal <|endoftext|> in the text is plain text, not a document boundary"
    docs[20] = "   \n\t  "
    docs[30] = " ".join(f"word{j} 世界" for j in range(300))  # about 900 tokens: spans more than two shards
    return docs


@pytest.fixture
def docs():
    return make_docs()


@pytest.fixture
def jsonl(tmp_path, docs):
    path = tmp_path / "docs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, "text": doc}, ensure_ascii=False) + "\n")
    return str(path)


def expected_stream(enc, docs):
    return np.concatenate([np.array([EOT] + enc.encode_ordinary(doc), dtype=np.uint16) for doc in docs])


def expected_shards(enc, docs, shard_size=SHARD_SIZE):
    """Shard k = tokens [k*size, (k+1)*size) of the stream, the last one shorter."""
    stream = expected_stream(enc, docs)
    return [stream[i:i + shard_size] for i in range(0, len(stream), shard_size)]


def shard_name(index):
    return f"edufineweb_{'val' if index == 0 else 'train'}_{index:06d}.npy"


def shard_files(out):
    """Every file the script left in `out` (temp files included), in shard order: the index ends the name."""
    return sorted(glob.glob(os.path.join(out, "edufineweb_*")), key=lambda p: os.path.basename(p).split("_")[2])


def read_bytes(out):
    return {os.path.basename(p): open(p, "rb").read() for p in shard_files(out)}


def run(fw, data_files, out, *extra):
    return fw.main(["--data-files", *([data_files] if isinstance(data_files, str) else data_files),
                    "--out", str(out), "--shard-size", str(SHARD_SIZE), "--workers", "1", *extra])


def check_shards(out, enc, docs):
    """Names, dtype and sizes, one EOT per document, exact token stream, and decoding back to the documents."""
    want = expected_shards(enc, docs)
    assert [os.path.basename(p) for p in shard_files(out)] == [shard_name(i) for i in range(len(want))]
    shards = [np.load(p) for p in shard_files(out)]
    assert all(s.dtype == np.uint16 and s.ndim == 1 for s in shards)
    assert [len(s) for s in shards[:-1]] == [SHARD_SIZE] * (len(shards) - 1) and 0 < len(shards[-1]) <= SHARD_SIZE
    tokens = np.concatenate(shards)
    assert len(tokens) == sum(len(enc.encode_ordinary(doc)) + 1 for doc in docs)
    assert np.count_nonzero(tokens == EOT) == len(docs) and tokens[0] == EOT
    pieces = np.split(tokens, np.flatnonzero(tokens == EOT))[1:]  # each piece: EOT + one document
    assert [enc.decode(piece[1:].tolist()) for piece in pieces] == docs
    assert all(np.array_equal(s, w) for s, w in zip(shards, want))


@pytest.mark.parametrize("workers", [1, 2])
def test_shards_from_jsonl(fw, enc, docs, jsonl, tmp_path, monkeypatch, workers):
    # workers=1 also checks the default --out, relative to the current folder
    monkeypatch.chdir(tmp_path)
    argv = ["--data-files", jsonl, "--shard-size", str(SHARD_SIZE), "--workers", str(workers)]
    out = os.path.join("data", "edu_fineweb10B") if workers == 1 else str(tmp_path / "out")
    result = fw.main(argv if workers == 1 else argv + ["--out", out])
    check_shards(str(tmp_path / out), enc, docs)
    assert result["num_shards"] == len(expected_shards(enc, docs)) == len(result["written"])


def test_shards_from_parquet_with_text_field(fw, enc, docs, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = str(tmp_path / "docs.parquet")
    pq.write_table(pa.table({"id": list(range(len(docs))), "content": docs}), path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="--text-field"):  # the default "text" is not a column here
        run(fw, path, out)
    run(fw, path, out, "--text-field", "content")
    check_shards(str(out), enc, docs)


def test_default_source_is_fineweb_edu_sample_10bt(fw, enc, tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"text": ["hello world", "second doc"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    fw.main(["--out", str(tmp_path / "a"), "--workers", "1"])
    fw.main(["--out", str(tmp_path / "b"), "--workers", "1", "--dataset", "me/data", "--subset", "s", "--split", "v"])
    assert calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train"), ("me/data", "s", "v")]
    assert [os.path.basename(p) for p in shard_files(tmp_path / "a")] == ["edufineweb_val_000000.npy"]
    assert np.array_equal(np.load(shard_files(tmp_path / "a")[0]), expected_stream(enc, ["hello world", "second doc"]))
    assert fw.parse_args([]).shard_size == 100_000_000
    assert fw.parse_args([]).workers == max(1, (os.cpu_count() or 1) // 2)


def spy_on_writes(fw, monkeypatch):
    written = []
    real_write_shard = fw.write_shard

    def write_shard(path, tokens):
        written.append(os.path.basename(path))
        real_write_shard(path, tokens)

    monkeypatch.setattr(fw, "write_shard", write_shard)
    return written


def test_resume_rewrites_only_missing_shards(fw, enc, docs, jsonl, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run(fw, jsonl, out)
    before = read_bytes(out)
    names = sorted(before)
    n = len(names)
    assert n >= 6

    # a gap (shard 1), the last two shards gone, and a temp file left by a run killed mid-write
    missing = [shard_name(1), shard_name(n - 2), shard_name(n - 1)]
    for name in missing:
        os.remove(out / name)
    leftover = out / (shard_name(n - 2) + ".tmp-12345")
    leftover.write_bytes(b"half a shard")
    mtimes = {name: os.stat(out / name).st_mtime_ns for name in names if name not in missing}
    written = spy_on_writes(fw, monkeypatch)
    result = run(fw, jsonl, out)
    assert sorted(written) == sorted(missing)
    # the sidecar says where shard 1 starts, so shard 0 is not even re-read; 2..n-3 are passed over and checked
    assert [os.path.basename(p) for p in result["skipped"]] == [shard_name(i) for i in range(2, n - 2)]
    assert read_bytes(out) == before
    assert {name: os.stat(out / name).st_mtime_ns for name in mtimes} == mtimes
    assert not leftover.exists()

    # without the progress sidecar it counts tokens from the start of the stream to find the boundaries
    os.remove(out / ".progress.json")
    os.remove(out / shard_name(n - 1))
    written.clear()
    run(fw, jsonl, out, "--workers", "2")
    assert written == [shard_name(n - 1)]
    assert read_bytes(out) == before

    # complete and nothing missing: no work, not even loading the data
    monkeypatch.setattr(fw, "load_documents", lambda args: pytest.fail("loaded the data"))
    assert run(fw, jsonl, out)["written"] == []


def test_interrupted_write_leaves_no_partial_shard(fw, enc, docs, jsonl, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_save = np.save
    saves = []

    def save_then_crash(file, array, *args, **kwargs):
        saves.append(file.name)
        if len(saves) == 3:  # shard 2: half the bytes reach the temp file, then the run dies
            file.write(b"\x93NUMPY partial")
            assert ".tmp-" in file.name and os.path.exists(file.name)
            raise KeyboardInterrupt
        real_save(file, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run(fw, jsonl, out)
    monkeypatch.setattr(np, "save", real_save)
    assert [os.path.basename(p) for p in shard_files(out)] == [shard_name(0), shard_name(1)]
    assert saves[2] == str(out / shard_name(2)) + f".tmp-{os.getpid()}"  # never the final name

    written = spy_on_writes(fw, monkeypatch)
    run(fw, jsonl, out)
    assert written[0] == shard_name(2) and shard_name(0) not in written and shard_name(1) not in written
    check_shards(str(out), enc, docs)


def test_max_shards_then_continue(fw, enc, docs, jsonl, tmp_path, monkeypatch):
    out = tmp_path / "out"
    result = run(fw, jsonl, out, "--max-shards", "2")
    assert [os.path.basename(p) for p in shard_files(out)] == [shard_name(0), shard_name(1)]
    assert result["num_shards"] is None
    written = spy_on_writes(fw, monkeypatch)
    assert run(fw, jsonl, out, "--max-shards", "2")["written"] == []
    run(fw, jsonl, out)
    assert shard_name(0) not in written and shard_name(1) not in written
    check_shards(str(out), enc, docs)


def test_refuses_an_out_folder_made_differently(fw, enc, docs, jsonl, tmp_path):
    out = tmp_path / "out"
    run(fw, jsonl, out, "--max-shards", "2")
    with pytest.raises(SystemExit, match="--shard-size"):
        fw.main(["--data-files", jsonl, "--out", str(out), "--shard-size", "200", "--workers", "1"])
    # other data and no sidecar to tell: the existing shards are compared with the new stream
    os.remove(out / ".progress.json")
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"text": d.upper()}) + "\n" for d in docs))
    with pytest.raises(SystemExit, match="differs"):
        run(fw, str(other), out)


@pytest.mark.parametrize("argv, flag", [
    (["--data-files", "missing.jsonl"], "--data-files"),
    (["--data-files", "{tmp}/docs.txt"], "--data-files"),
    (["--shard-size", "0"], "--shard-size"),
    (["--workers", "0"], "--workers"),
    (["--max-shards", "0"], "--max-shards"),
])
def test_bad_input_names_the_flag(fw, tmp_path, capsys, argv, flag):
    (tmp_path / "docs.txt").write_text("not a known format")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit):
        fw.main(argv + ["--out", str(tmp_path / "out")])
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # failed before doing anything


@pytest.mark.parametrize("case", ["empty jsonl", "blank jsonl", "no text field", "only empty texts"])
def test_data_without_text_is_a_one_line_error_before_writing(fw, tmp_path, case):
    path = tmp_path / "docs.jsonl"
    path.write_text({"empty jsonl": "", "blank jsonl": "\n  \n", "no text field": '{"id": 1}\n{"id": 2}\n',
                     "only empty texts": '{"text": ""}\n{"text": "  "}\n'}[case])
    result = subprocess.run([sys.executable, os.path.join(REPO, "fineweb-npy.py"), "--data-files", str(path),
                             "--out", str(tmp_path / "out"), "--workers", "1"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120,
                            env={**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    message = result.stderr.strip().splitlines()[-1]  # (datasets may draw a progress bar before it)
    assert {"empty jsonl": "holds no documents", "blank jsonl": "holds no documents",
            "no text field": "--text-field: no column 'text'",
            "only empty texts": "holds no text"}[case] in message
    assert not (tmp_path / "out").exists()


def test_no_network_is_a_one_line_error_before_writing(fw, tmp_path, monkeypatch):
    import datasets

    def offline(path, name=None, split=None, **kwargs):  # what load_dataset raises with no network
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SystemExit) as exit_info:
        fw.main(["--out", str(tmp_path / "out"), "--workers", "1"])
    message = str(exit_info.value.code)
    assert "\n" not in message and "HuggingFaceFW/fineweb-edu" in message and "ConnectionError" in message
    assert "--data-files" in message  # the fix: tokenize local files
    assert not (tmp_path / "out").exists()


def test_tiktoken_cache_flag_is_used(fw, enc, jsonl, docs, tmp_path):
    with pytest.raises(SystemExit, match="--tiktoken-cache"):  # a folder without the BPE files: an error
        run(fw, jsonl, tmp_path / "out", "--tiktoken-cache", str(tmp_path))
    assert not (tmp_path / "out").exists()
    shared = os.environ.get("TIKTOKEN_CACHE_DIR", "")
    if not fw.gpt2_tokenizer.cache_files(shared or str(tmp_path)):
        pytest.skip("no tiktoken cache for the GPT-2 files")
    run(fw, jsonl, tmp_path / "out", "--tiktoken-cache", shared, "--workers", "2")
    check_shards(str(tmp_path / "out"), enc, docs)


def test_importing_does_nothing(tmp_path):
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('fw', {os.path.join(REPO, 'fineweb-npy.py')!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "assert 'datasets' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and os.listdir(tmp_path) == []
