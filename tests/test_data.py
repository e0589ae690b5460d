"""
Tests for the data pipeline: tokenizer.py and the data/*/prepare.py scripts, all offline.

GPT-2 BPE needs the GPT-2 ranks: the gpt2_ranks_file fixture (conftest.py) takes them from the
openai-whisper sdist on PyPI.
"""

import importlib.util
import json
import os
import pickle
import platform
import subprocess
import sys
import sysconfig
import zlib
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import tokenizer  # noqa: E402

EOT = 50256


def run_script(name, *args, env=None):
    """Run data/<name>/prepare.py as a subprocess; returns the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "data" / name / "prepare.py"), *map(str, args)],
                          capture_output=True, text=True, env=full_env, timeout=120)


def check_ok(result):
    assert result.returncode == 0, f"prepare.py failed:\n{result.stdout}\n{result.stderr}"
    return result


def load_script(name):
    """Import data/<name>/prepare.py as a module (its work happens only in main())."""
    spec = importlib.util.spec_from_file_location(f"prepare_{name}", REPO / "data" / name / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_bin(path):
    return np.fromfile(path, dtype=np.uint16)


# every HTTP(S) request goes to a closed local port: a download fails at once, network or not
CLOSED_PROXY = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
                "no_proxy": "", "NO_PROXY": ""}


def check_user_error(result, *fragments):
    """The repository's rule for a mistake the user can fix: exit status 2, one 'error:' line."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and all(f in lines[0] for f in fragments), lines[0]
    return lines[0]


def offline_env(ranks_file, tmp_path):
    """Environment for a BPE prepare run: local ranks, a private HF cache, hub access off."""
    return {"GPT2_RANKS_FILE": ranks_file, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1"}


# ----------------------------------------------------------------------------- tokenizer.py

def test_gpt2_encoding_from_ranks_file(gpt2_ranks_file, monkeypatch):
    monkeypatch.setenv("GPT2_RANKS_FILE", gpt2_ranks_file)
    enc = tokenizer.gpt2_encoding()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.eot_token == EOT and enc.n_vocab == 50257
    # special tokens: literal text under encode_ordinary, one token only when allowed
    assert EOT not in enc.encode_ordinary("a<|endoftext|>b")
    encode, decode = tokenizer.encoder_decoder({"vocab_size": 50257, "tokenizer": "gpt2"})
    assert encode("<|endoftext|>") == [EOT]
    text = "Sophia's step:  θ ← θ − lr·clip(m / (ρ·h), 1)\n\n\tdone  "
    assert decode(encode(text)) == text


@pytest.mark.parametrize("contents, complaint", [
    ("IQ== 0\nnot-base64!! x\n", "malformed"),  # a line that does not parse
    ("IQ== 0\nIg== 1\nIw== 2\n", "50,256"),  # parses, but is not GPT-2's vocabulary
])
def test_malformed_ranks_file_is_one_clear_line(tmp_path, monkeypatch, contents, complaint):
    bad = tmp_path / "bad.tiktoken"
    bad.write_text(contents)
    monkeypatch.setenv("GPT2_RANKS_FILE", str(bad))
    with pytest.raises(ValueError) as info:
        tokenizer.gpt2_encoding()
    message = str(info.value)
    assert complaint in message and str(bad) in message and "\n" not in message
    # a prepare script turns it into a single "error:" line and a non-zero exit
    text = tmp_path / "input.txt"
    text.write_text("some text\n" * 10)
    result = run_script("shakespeare", "--input", text, "--out_dir", tmp_path / "out",
                        env={"GPT2_RANKS_FILE": str(bad)})
    assert check_user_error(result) == f"error: {message}"
    assert not (tmp_path / "out" / "train.bin").exists()


def test_char_encoder_decoder_and_meta(tmp_path):
    meta = {"vocab_size": 4, "stoi": {"\n": 0, "a": 1, "b": 2, "\ufffd": 3},
            "itos": {0: "\n", 1: "a", 2: "b", 3: "\ufffd"}}
    encode, decode = tokenizer.encoder_decoder(meta)
    assert encode("ab\nba") == [1, 2, 0, 2, 1] and decode([1, 2, 0, 2, 1]) == "ab\nba"
    with pytest.raises(ValueError, match="'cz'"):  # names the unknown characters
        encode("abcz")
    encode, decode = tokenizer.encoder_decoder({**meta, "placeholder": "\ufffd"})
    assert encode("abcz") == [1, 2, 3, 3]
    with pytest.raises(FileNotFoundError, match="run the prepare.py"):
        tokenizer.load_meta(tmp_path)
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    assert tokenizer.load_meta(tmp_path) == meta
    with pytest.raises(ValueError, match="neither"):
        tokenizer.encoder_decoder({"vocab_size": 10})


# ----------------------------------------------------------------------------- stdlib_char

EXCLUDED = {"test", "tests", "idle_test", "site-packages", "dist-packages"}


@pytest.fixture(scope="module")
def stdlib_run(tmp_path_factory):
    """One full run of data/stdlib_char/prepare.py on this interpreter's standard library."""
    out_dir = tmp_path_factory.mktemp("stdlib_char")
    result = check_ok(run_script("stdlib_char", "--out_dir", out_dir))
    with open(out_dir / "meta.pkl", "rb") as f:
        meta = pickle.load(f)
    return out_dir, meta, result.stdout


def test_stdlib_char_outputs(stdlib_run):
    out_dir, meta, stdout = stdlib_run
    train, val = read_bin(out_dir / "train.bin"), read_bin(out_dir / "val.bin")
    assert len(train) > 10 * len(val) > 0
    assert meta["vocab_size"] == len(meta["stoi"]) == len(meta["itos"]) <= 256
    assert max(train.max(), val.max()) < meta["vocab_size"]
    assert f"train has {len(train):,} tokens" in stdout and f"vocab size: {meta['vocab_size']}" in stdout
    # the corpus is this interpreter's stdlib, so its version and implementation say which corpus
    assert (meta["python_version"], meta["python_implementation"]) == (
        platform.python_version(), platform.python_implementation())
    assert meta["stdlib"] == sysconfig.get_paths()["stdlib"]
    assert f"the standard library of {platform.python_implementation()} {platform.python_version()}" in stdout
    # no file from a test folder or site-packages, and no file on both sides of the split
    files = meta["train_files"] + meta["val_files"]
    assert not any(EXCLUDED & set(name.split("/")[:-1]) for name in files)
    assert not set(meta["train_files"]) & set(meta["val_files"])
    assert meta["val_files"] == [f for f in files if zlib.crc32(f.encode()) % 20 == 0]
    # decode(encode) is the identity on the prepared text, and the text is the files themselves
    encode, decode = tokenizer.encoder_decoder(meta)
    val_text = decode(val.tolist())
    assert encode(val_text) == val.tolist()
    first = meta["val_files"][0]
    source = (Path(sysconfig.get_paths()["stdlib"]) / first).read_text(encoding="utf-8", errors="replace")
    expected = "".join(c if c in meta["stoi"] else meta["placeholder"] for c in source)
    assert val_text.startswith(f"# file: {first}\n{expected}")
    for name in meta["val_files"]:
        assert f"# file: {name}\n" in val_text


def test_stdlib_char_is_deterministic(stdlib_run, tmp_path):
    out_dir, _, _ = stdlib_run
    check_ok(run_script("stdlib_char", "--out_dir", tmp_path))
    for name in ("train.bin", "val.bin", "meta.pkl"):
        assert (tmp_path / name).read_bytes() == (out_dir / name).read_bytes(), name
    assert sorted(os.listdir(tmp_path)) == ["meta.pkl", "train.bin", "val.bin"]  # no temporary left


def test_stdlib_char_selection_rules(tmp_path, capsys):
    # a fake stdlib: which files count, which split each lands in, what happens to rare characters
    root = tmp_path / "lib"
    included = [f"mod{i}.py" for i in range(60)] + ["pkg/core.py", "pkg/testing.py", "tests.py", "idlelib/run.py"]
    excluded = ["test/test_x.py", "pkg/tests/t.py", "idlelib/idle_test/t.py", "unittest/test/t.py",
                "site-packages/thirdparty.py", "lib2to3/tests/data.py"]
    for name in included + excluded:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"x = {name!r}  # line\n" * 20)
    (root / "pkg" / "notes.txt").write_text("not python")
    (root / "mod0.py").write_text("x = 'é'\n" * 3)  # 'é' three times: rarer than --min_count 5
    prepare = load_script("stdlib_char")
    prepare.main(["--stdlib", str(root), "--out_dir", str(tmp_path / "out"), "--min_count", "5"])
    with open(tmp_path / "out" / "meta.pkl", "rb") as f:
        meta = pickle.load(f)
    assert sorted(meta["train_files"] + meta["val_files"]) == sorted(included)
    assert meta["val_files"] == sorted(f for f in included if zlib.crc32(f.encode()) % 20 == 0)
    assert meta["train_files"] == sorted(f for f in included if zlib.crc32(f.encode()) % 20 != 0)
    assert "é" not in meta["stoi"] and "\ufffd" in meta["stoi"]
    text = "".join(meta["itos"][i] for i in read_bin(tmp_path / "out" / "train.bin").tolist() +
                   read_bin(tmp_path / "out" / "val.bin").tolist())
    out = capsys.readouterr().out
    assert "x = '\ufffd'\n" in text and "rare" in out
    # a tree other than this interpreter's stdlib: no Python version it might not be
    assert (meta["stdlib"], meta["python_version"], meta["python_implementation"]) == (str(root), None, None)
    assert "no Python version recorded" in out
    # with --min_count 1 every character present is kept
    prepare.main(["--stdlib", str(root), "--out_dir", str(tmp_path / "out1"), "--min_count", "1"])
    with open(tmp_path / "out1" / "meta.pkl", "rb") as f:
        assert "é" in pickle.load(f)["stoi"]


def test_stdlib_bpe_has_the_files_and_split_of_stdlib_char(gpt2_ranks_file, tmp_path, monkeypatch, capsys):
    # data/stdlib: the same fake tree as above, GPT-2 BPE per file, each file closed by EOT
    monkeypatch.setenv("GPT2_RANKS_FILE", gpt2_ranks_file)
    root = tmp_path / "lib"
    names = [f"mod{i}.py" for i in range(60)] + ["test/test_x.py", "pkg/core.py"]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"def f():\n    return {name!r}  # naïve\n" * 3)
    (root / "mod1.py").write_text("x = 1")  # no final newline: one is added before the next header
    load_script("stdlib_char").main(["--stdlib", str(root), "--out_dir", str(tmp_path / "char")])
    result = check_ok(run_script("stdlib", "--stdlib", root, "--out_dir", tmp_path / "bpe"))
    with open(tmp_path / "char" / "meta.pkl", "rb") as f:
        char_meta = pickle.load(f)
    with open(tmp_path / "bpe" / "meta.pkl", "rb") as f:
        meta = pickle.load(f)
    assert (meta["vocab_size"], meta["tokenizer"]) == (50257, "gpt2")
    assert (meta["train_files"], meta["val_files"]) == (char_meta["train_files"], char_meta["val_files"])
    enc = tokenizer.gpt2_encoding()
    for split in ("train", "val"):
        ids = read_bin(tmp_path / "bpe" / f"{split}.bin").tolist()
        files = meta[f"{split}_files"]
        assert ids.count(EOT) == len(files) and ids[-1] == EOT
        expected = []
        for name in files:
            source = (root / name).read_text()
            source += "" if source.endswith("\n") else "\n"
            expected += enc.encode_ordinary(f"# file: {name}\n{source}") + [EOT]
        assert ids == expected, split
        assert f"{split} has {len(ids):,} tokens" in result.stdout
    assert sorted(os.listdir(tmp_path / "bpe")) == ["meta.pkl", "train.bin", "val.bin"]
    assert (meta["python_version"], meta["python_implementation"]) == (None, None)
    # the same tree standing in for this interpreter's stdlib: its version is recorded and printed
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(root)})
    load_script("stdlib").main(["--out_dir", str(tmp_path / "own")])
    with open(tmp_path / "own" / "meta.pkl", "rb") as f:
        meta = pickle.load(f)
    assert (meta["stdlib"], meta["python_version"], meta["python_implementation"]) == (
        str(root), platform.python_version(), platform.python_implementation())
    assert f"{platform.python_implementation()} {platform.python_version()}" in capsys.readouterr().out


def test_stdlib_bpe_without_ranks_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_RANKS_FILE", str(tmp_path / "missing.tiktoken"))
    result = run_script("stdlib", "--out_dir", tmp_path / "out")
    check_user_error(result, "error: GPT2_RANKS_FILE=", "cannot be read")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["stdlib", "shakespeare"])
def test_gpt2_ranks_unreachable_is_one_line_and_overwrites_nothing(tmp_path, name):
    # no GPT2_RANKS_FILE, no tiktoken cache, and the download refused: what an offline machine sees
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for file in ("train.bin", "val.bin", "meta.pkl"):
        (out_dir / file).write_bytes(b"an earlier run's " + file.encode())
    text = tmp_path / "input.txt"
    text.write_text(SAMPLE_TEXT)
    args = ["--out_dir", out_dir] + (["--input", text] if name == "shakespeare" else [])
    result = run_script(name, *args, env={"GPT2_RANKS_FILE": "", "TIKTOKEN_CACHE_DIR": "", **CLOSED_PROXY})
    check_user_error(result, "could not load tiktoken's gpt2 encoding", "GPT2_RANKS_FILE")
    for file in ("train.bin", "val.bin", "meta.pkl"):
        assert (out_dir / file).read_bytes() == b"an earlier run's " + file.encode()
    assert sorted(os.listdir(out_dir)) == ["meta.pkl", "train.bin", "val.bin"]


@pytest.mark.parametrize("name, args, complaint", [
    ("stdlib_char", ["--stdlib", "{tmp}/no-such-lib"], "is not a directory"),
    ("stdlib_char", ["--min_count", "0"], "--min_count must be >= 1"),
    ("stdlib_char", ["--stdlib", "{tmp}/tiny-lib"], "falls into val"),
    ("stdlib", ["--stdlib", "{tmp}/no-such-lib"], "is not a directory"),
    ("stdlib", ["--num_threads", "0"], "--num_threads must be >= 1"),
    ("shakespeare_char", ["--input", "{tmp}/missing.txt"], "--input"),
    ("shakespeare", ["--input", "{tmp}/missing.txt"], "--input"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, name, args, complaint):
    (tmp_path / "tiny-lib").mkdir()
    (tmp_path / "tiny-lib" / "mod1.py").write_text("x = 1\n")  # one file, on the train side
    result = run_script(name, *[a.format(tmp=tmp_path) for a in args], "--out_dir", tmp_path / "out")
    check_user_error(result, complaint)
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


# ----------------------------------------------------------------------------- python_code

def read_meta(out_dir):
    with open(Path(out_dir) / "meta.pkl", "rb") as f:
        return pickle.load(f)


def expected_tokens(enc, texts, names, header):
    """What a split's .bin must hold: each file's text (behind its header line for Python
    files, closed by a newline), then EOT, in the order of `names`."""
    ids = []
    for name in names:
        text = texts[name]
        if header:
            text = f"# file: {name}\n{text}" + ("" if text.endswith("\n") else "\n")
        ids += enc.encode_ordinary(text) + [EOT]
    return ids


def make_python_roots(tmp_path):
    """Two import roots, the second nested in the first, with one file for every rule.
    Returns (roots, {name: text} of the files that must be kept)."""
    lib = tmp_path / "lib"
    kept = {f"mod{i}.py": f"def f{i}():\n    return {i}  # naïve\n" for i in range(40)}  # mod20.py goes to val
    kept.update({"pkg/core.py": "import os\n\nROOT = os.getcwd()\n", "pkg/nofinalnewline.py": "x = 1",
                 "edge_line.py": "#" * 1000 + "\n", "copy_b.py": kept["mod3.py"], "extra.py": "y = 2\n"})
    files = {name: text for name, text in kept.items() if name != "extra.py"}
    files.update({"test/test_x.py": "t = 1\n", "pkg/tests/t.py": "t = 2\n", "idlelib/idle_test/t.py": "t = 3\n",
                  "site-packages/third.py": "t = 4\n", "dist-packages/d.py": "t = 5\n", "notes.txt": "not python\n",
                  "empty.py": "  \n\n", "huge.py": "x = 1\n" * 170_000, "longline.py": "s = '" + "a" * 1000 + "'\n",
                  "plugins/extra.py": kept["extra.py"], "plugins/mod1.py": "shadowed = True\n"})
    for name, text in files.items():
        (lib / name).parent.mkdir(parents=True, exist_ok=True)
        (lib / name).write_text(text)
    (lib / "bad.py").write_bytes(b"s = '\xff'\n")  # not UTF-8
    del kept["mod3.py"]  # the same bytes as copy_b.py, which comes first by name
    return [lib, lib / "plugins"], kept


def test_python_code_rules_split_and_tokens(gpt2_ranks_file, tmp_path, monkeypatch):
    roots, kept = make_python_roots(tmp_path)
    result = check_ok(run_script("python_code", "--roots", *roots, "--out_dir", tmp_path / "out", "--num_proc", 2,
                                 env={"GPT2_RANKS_FILE": gpt2_ranks_file}))
    meta = read_meta(tmp_path / "out")
    assert sorted(meta["train_files"] + meta["val_files"]) == sorted(kept)
    assert meta["val_files"] == ["mod20.py"]
    assert meta["train_files"] == sorted(name for name in kept if zlib.crc32(name.encode()) % 20)
    assert meta["skipped"] == {"not UTF-8": 1, "empty": 1, "over 1,000,000 bytes": 1,
                               "a line over 1,000 characters": 1, "same bytes as an earlier file": 1,
                               "shadowed by an earlier folder": 1}
    assert (meta["source"], meta["vocab_size"], meta["files"]) == ("python", 50257, len(kept))
    monkeypatch.setenv("GPT2_RANKS_FILE", gpt2_ranks_file)
    enc = tokenizer.gpt2_encoding()
    for split in ("train", "val"):
        ids = read_bin(tmp_path / "out" / f"{split}.bin").tolist()
        assert ids == expected_tokens(enc, kept, meta[f"{split}_files"], header=True), split
        assert meta[f"{split}_tokens"] == len(ids) and f"{split} has {len(ids):,} tokens" in result.stdout
    assert sorted(os.listdir(tmp_path / "out")) == ["meta.pkl", "train.bin", "val.bin"]


def test_python_code_is_deterministic(gpt2_ranks_file, tmp_path):
    # one process or two, the same bytes and fingerprint; a changed file changes the fingerprint
    roots, _ = make_python_roots(tmp_path)
    env = {"GPT2_RANKS_FILE": gpt2_ranks_file}
    for out, processes in (("one", 1), ("two", 2)):
        check_ok(run_script("python_code", "--roots", *roots, "--out_dir", tmp_path / out, "--num_proc", processes, env=env))
    for name in ("train.bin", "val.bin", "meta.pkl"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    (roots[0] / "mod5.py").write_text("changed = True\n")
    check_ok(run_script("python_code", "--roots", *roots, "--out_dir", tmp_path / "changed", env=env))
    fingerprint = read_meta(tmp_path / "one")["fingerprint"]
    assert len(fingerprint) == 64 and read_meta(tmp_path / "changed")["fingerprint"] != fingerprint


def test_python_code_on_a_folder_of_text_files(gpt2_ranks_file, tmp_path, monkeypatch):
    texts = {"a.txt": "Hello world\n", "sub/b.md": "naïve café — “quoted”", "doc0.txt": "held out\n" * 20}
    folder = tmp_path / "texts"
    for name, text in {**texts, ".hidden.txt": "hidden\n", ".git/config": "[core]\n", "dup.txt": texts["a.txt"],
                       "empty.txt": ""}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    (folder / "image.dat").write_bytes(b"\x89PNG\xff\xfe")
    check_ok(run_script("python_code", "--input_dir", folder, "--out_dir", tmp_path / "out",
                        env={"GPT2_RANKS_FILE": gpt2_ranks_file}))
    meta = read_meta(tmp_path / "out")
    assert (meta["train_files"], meta["val_files"]) == (["a.txt", "sub/b.md"], ["doc0.txt"])
    assert meta["skipped"] == {"empty": 1, "not UTF-8": 1, "same bytes as an earlier file": 1}
    assert meta["source"] == "text" and meta["roots"] == [str(folder)]
    monkeypatch.setenv("GPT2_RANKS_FILE", gpt2_ranks_file)
    enc = tokenizer.gpt2_encoding()
    for split in ("train", "val"):  # the text as it is: no header line
        ids = read_bin(tmp_path / "out" / f"{split}.bin").tolist()
        assert ids == expected_tokens(enc, texts, meta[f"{split}_files"], header=False), split


def test_python_code_interpreter_roots():
    roots = load_script("python_code").interpreter_roots()
    assert roots[0] == os.path.realpath(sysconfig.get_paths()["stdlib"])
    assert any(os.path.basename(root) in ("site-packages", "dist-packages") for root in roots)
    # a virtual environment may live inside the checkout (CI's .venv); the checkout itself is no root
    assert all(os.path.isdir(root) for root in roots)
    assert os.path.realpath(REPO) not in roots


def test_python_code_interrupted_leaves_nothing(gpt2_ranks_file, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_RANKS_FILE", gpt2_ranks_file)
    roots, _ = make_python_roots(tmp_path)
    prepare = load_script("python_code")
    monkeypatch.setitem(sys.modules, prepare.__name__, prepare)  # the workers' function is found by its module
    real_tqdm = prepare.tqdm

    def interrupted_tqdm(iterable, **kwargs):  # Ctrl-C after three files were written
        for i, item in enumerate(real_tqdm(iterable, **kwargs)):
            if i == 3:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(prepare, "tqdm", interrupted_tqdm)
    with pytest.raises(KeyboardInterrupt):
        prepare.main(["--roots", *map(str, roots), "--out_dir", str(tmp_path / "out"), "--num_proc", "1"])
    assert os.listdir(tmp_path / "out") == []


def test_python_code_mistakes_are_one_line(gpt2_ranks_file, tmp_path):
    roots, _ = make_python_roots(tmp_path)
    (tmp_path / "few").mkdir()
    (tmp_path / "few" / "a.txt").write_text("only train\n")
    env = {"GPT2_RANKS_FILE": gpt2_ranks_file}
    for args, message in [(["--input_dir", tmp_path / "missing"], "is not a directory"),
                          (["--roots", roots[0], tmp_path / "missing"], "is not a directory"),
                          (["--input_dir", roots[0], "--roots", roots[0]], "exclude each other"),
                          (["--num_proc", "0"], "--num_proc must be >= 1"),
                          (["--input_dir", tmp_path / "few"], "falls into val"),
                          (["--no_such_option"], "unrecognized arguments")]:
        result = run_script("python_code", *args, "--out_dir", tmp_path / "out", env=env)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, (args, result.stderr)
        assert lines[0].startswith("error: ") and message in lines[0], args
        assert not (tmp_path / "out" / "train.bin").exists()


# ----------------------------------------------------------------------------- openwebtext

def make_documents(count=300):
    rng = np.random.default_rng(0)
    words = "the of and to a in is that it was for on are with as his they be at one have this".split()
    docs = [" ".join(rng.choice(words, size=rng.integers(1, 80))) for _ in range(count)]
    # the cases a real web corpus has: the literal EOT string, non-ASCII, whitespace runs, empty text
    docs[:5] = ["Hello world", "text with <|endoftext|> inside", "naïve café — “quoted” 😀", "  \n\n\t ", ""]
    return docs


def expected_split_tokens(docs, test_size, enc):
    """What train.bin/val.bin must hold: the nanoGPT split of the documents, each encoded + EOT."""
    import datasets
    dataset = datasets.Dataset.from_dict({"text": docs})
    split = dataset.train_test_split(test_size=test_size, seed=2357, shuffle=True)
    return {name: [t for doc in split[key]["text"] for t in enc.encode_ordinary(doc) + [EOT]]
            for name, key in (("train", "train"), ("val", "test"))}


def test_openwebtext_prepare_on_local_jsonl(gpt2_ranks_file, tmp_path, monkeypatch):
    docs = make_documents()
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d, "url": "x"}) + "\n" for d in docs))
    out_dir = tmp_path / "out"
    result = check_ok(run_script("openwebtext", "--files", data, "--out_dir", out_dir, "--num_proc", 2,
                                 "--test_size", 0.1, env=offline_env(gpt2_ranks_file, tmp_path)))
    monkeypatch.setenv("GPT2_RANKS_FILE", gpt2_ranks_file)
    enc = tokenizer.gpt2_encoding()
    expected = expected_split_tokens(docs, 0.1, enc)
    train, val = read_bin(out_dir / "train.bin"), read_bin(out_dir / "val.bin")
    # exact contents: the seeded split, document order kept, one EOT after every document
    assert val.tolist() == expected["val"] and train.tolist() == expected["train"]
    assert len(train) + len(val) == sum(len(enc.encode_ordinary(d)) + 1 for d in docs)
    assert (train == EOT).sum() + (val == EOT).sum() == len(docs)
    assert (val == EOT).sum() == 30  # train_test_split rounds test_size * 300 documents up
    assert f"val has {len(val):,} tokens" in result.stdout
    with open(out_dir / "meta.pkl", "rb") as f:
        assert pickle.load(f) == {"vocab_size": 50257, "tokenizer": "gpt2", "dtype": "uint16",
                                  "train_tokens": len(train), "val_tokens": len(val)}
    assert sorted(os.listdir(out_dir)) == ["meta.pkl", "train.bin", "val.bin"]


def test_openwebtext_interrupted_write_leaves_no_train_bin(gpt2_ranks_file, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_RANKS_FILE", gpt2_ranks_file)
    prepare = load_script("openwebtext")
    real_tqdm = prepare.tqdm
    out_dir = tmp_path / "out"
    files_mid_write = []

    def interrupted_tqdm(iterable, desc="", **kwargs):
        # Ctrl-C after the second shard of train.bin has been copied into the memmap
        for i, item in enumerate(real_tqdm(iterable, desc=desc, **kwargs)):
            if "train" in desc and i == 2:
                files_mid_write.extend(os.listdir(out_dir))
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(prepare, "tqdm", interrupted_tqdm)
    # .txt input: one document per file
    for i, doc in enumerate(make_documents(40)):
        (tmp_path / f"doc{i:02d}.txt").write_text(doc)
    files = sorted(str(p) for p in tmp_path.glob("doc*.txt"))
    args = ["--files", *files, "--out_dir", str(out_dir), "--num_proc", "1",
            "--cache_dir", str(tmp_path / "hf"), "--test_size", "0.1"]
    with pytest.raises(KeyboardInterrupt):
        prepare.main(args)
    # even a kill -9 at that moment would have left no train.bin: the tokens went to a temporary
    assert "train.bin" not in files_mid_write and "train.bin.tmp" in files_mid_write
    # and the interrupted run cleaned up after itself
    assert not [p for p in os.listdir(out_dir) if p.startswith("train.bin")]
    # the same run uninterrupted writes everything, one document per file
    monkeypatch.setattr(prepare, "tqdm", real_tqdm)
    prepare.main(args)
    train, val = read_bin(out_dir / "train.bin"), read_bin(out_dir / "val.bin")
    assert (train == EOT).sum() == 36 and (val == EOT).sum() == 4


def test_openwebtext_hub_fallbacks(gpt2_ranks_file, tmp_path, monkeypatch, capsys):
    # the hub is out of reach here: stand in for datasets.load_dataset and check what the script
    # asks of it when the hub copy is script-based (datasets >= 4 refuses it) or unreachable
    import datasets
    monkeypatch.setenv("GPT2_RANKS_FILE", gpt2_ranks_file)
    prepare = load_script("openwebtext")
    calls = []

    def script_based_hub(path, **kwargs):
        calls.append(kwargs)
        if kwargs.get("revision") != "refs/convert/parquet":
            raise RuntimeError("Dataset scripts are no longer supported, but found openwebtext.py")
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": make_documents(20)})})

    monkeypatch.setattr(datasets, "load_dataset", script_based_hub)
    prepare.main(["--out_dir", str(tmp_path / "out"), "--num_proc", "1"])
    assert [c.get("revision") for c in calls] == [None, "refs/convert/parquet"]
    assert all(c["cache_dir"] is None for c in calls)  # the Hugging Face default cache, not ours
    out = capsys.readouterr().out
    assert "Parquet export" in out and "warning: OpenWebText has 8,013,769 documents" in out
    # the default test_size 0.0005 still holds out one whole document
    assert (read_bin(tmp_path / "out" / "val.bin") == EOT).sum() == 1
    assert (read_bin(tmp_path / "out" / "train.bin") == EOT).sum() == 19

    def unreachable_hub(path, **kwargs):
        raise ConnectionError("Couldn't reach 'openwebtext' on the Hub (ConnectError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable_hub)
    with pytest.raises(SystemExit) as info:
        prepare.main(["--out_dir", str(tmp_path / "out2"), "--num_proc", "1"])
    assert str(info.value).startswith("error: could not load openwebtext") and "--files" in str(info.value)


def test_openwebtext_bad_arguments_are_one_line(tmp_path):
    prepare = load_script("openwebtext")
    (tmp_path / "a.csv").write_text("text\nhello\n")
    for args, message in [(["--files", str(tmp_path / "missing.jsonl")], "no such file"),
                          (["--files", str(tmp_path / "a.csv")], "must be all"),
                          (["--num_proc", "0"], "--num_proc must be >= 1")]:
        with pytest.raises(SystemExit) as info:
            prepare.main(args + ["--out_dir", str(tmp_path / "out")])
        assert str(info.value).startswith("error:") and message in str(info.value), args


# ----------------------------------------------------------------------------- shakespeare

SAMPLE_TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
               "First Citizen:\nYou are all resolved rather to die than to famish?\n\n") * 40


def test_shakespeare_char_on_local_input(tmp_path):
    text_file = tmp_path / "input.txt"
    text_file.write_text(SAMPLE_TEXT)
    result = check_ok(run_script("shakespeare_char", "--input", text_file, "--out_dir", tmp_path / "out"))
    meta = tokenizer.load_meta(tmp_path / "out")
    assert meta["vocab_size"] == len(set(SAMPLE_TEXT))
    assert "".join(meta["itos"][i] for i in range(meta["vocab_size"])) == "".join(sorted(set(SAMPLE_TEXT)))
    _, decode = tokenizer.encoder_decoder(meta)
    cut = int(len(SAMPLE_TEXT) * 0.9)
    assert decode(read_bin(tmp_path / "out" / "train.bin").tolist()) == SAMPLE_TEXT[:cut]
    assert decode(read_bin(tmp_path / "out" / "val.bin").tolist()) == SAMPLE_TEXT[cut:]
    assert f"train has {cut:,} tokens" in result.stdout


def test_shakespeare_bpe_on_local_input(gpt2_ranks_file, tmp_path, monkeypatch):
    text_file = tmp_path / "input.txt"
    text_file.write_text(SAMPLE_TEXT)
    check_ok(run_script("shakespeare", "--input", text_file, "--out_dir", tmp_path / "out",
                        env={"GPT2_RANKS_FILE": gpt2_ranks_file}))
    monkeypatch.setenv("GPT2_RANKS_FILE", gpt2_ranks_file)
    enc = tokenizer.gpt2_encoding()
    cut = int(len(SAMPLE_TEXT) * 0.9)
    assert read_bin(tmp_path / "out" / "train.bin").tolist() == enc.encode_ordinary(SAMPLE_TEXT[:cut])
    assert read_bin(tmp_path / "out" / "val.bin").tolist() == enc.encode_ordinary(SAMPLE_TEXT[cut:])
    assert tokenizer.load_meta(tmp_path / "out") == {
        "vocab_size": 50257, "tokenizer": "gpt2", "dtype": "uint16",
        "train_tokens": len(enc.encode_ordinary(SAMPLE_TEXT[:cut])), "val_tokens": len(enc.encode_ordinary(SAMPLE_TEXT[cut:]))}


@pytest.mark.parametrize("name", ["shakespeare_char", "shakespeare"])
def test_shakespeare_download_failure_is_one_line(tmp_path, name):
    result = run_script(name, "--out_dir", tmp_path, env=CLOSED_PROXY)
    check_user_error(result, "error: could not download", "--input")
    assert os.listdir(tmp_path) == []  # no partial input.txt to be mistaken for the text later


@pytest.mark.parametrize("name", ["stdlib_char", "stdlib", "python_code", "openwebtext", "shakespeare_char",
                                  "shakespeare"])
def test_prepare_help(name):
    result = check_ok(run_script(name, "--help"))
    assert "--out_dir" in result.stdout and "writes" in result.stdout.lower()
