"""
A corpus big enough for GPU-scale runs that needs no download: every Python source file the
running interpreter can import (its standard library and its site-packages), in GPT-2 BPE. Or,
with --input_dir, every text file in a folder of your own. Writes train.bin and val.bin (np.uint16
GPT-2 token ids, each file's tokens followed by <|endoftext|> = 50256) and meta.pkl (vocab_size,
tokenizer, dtype, the interpreter, the folders read, the file lists, token counts, what was
skipped and why, and a fingerprint of the text) into --out_dir.

This is Python code, not web text: a model trained on it learns to write Python, and its losses
are not comparable with OpenWebText's. How much there is depends on what is installed: with
CPython 3.11.7 and requirements.txt installed (torch, transformers, datasets, wandb, matplotlib
and what they pull in; most from transformers 53 MB, torch 45 MB, sympy 16 MB, the stdlib 12 MB)
it read 11,944 files and kept 11,530: train 83,971,279 tokens, val 4,276,160, in 22 s on 2
cores. The fingerprint says whether two preparations read the same text.

The rules, chosen so two runs on the same installation give identical bytes:
- the folders read are the standard library (sysconfig's stdlib) and the site-packages folders
  that `site` reports (the user's own if it is enabled), in that order. Not PYTHONPATH, the
  working directory or folders added by .pth files: what this reads does not depend on where it
  is started, and this repository's own files are never part of it;
- every *.py file in them, except below a folder named test, tests or idle_test (test suites:
  fixtures, data tables and deliberately broken files more than code, as data/stdlib leaves them
  out), site-packages or dist-packages inside the stdlib (another environment's packages), or a
  folder that is itself one of the folders read (read once, as itself);
- a file is named by its path relative to the folder it is in, as import names it
  ("json/decoder.py", "torch/nn/modules/linear.py"); a name already found in an earlier folder
  is skipped, as import would find the earlier one;
- skipped: a file that is not valid UTF-8, empty, larger than 1 MB or with a line longer than
  1,000 characters. The last two are how huge or generated files are recognized: serialized
  protobuf descriptors, unicode and lexer tables, minified data. Files marked "generated" but
  written as ordinary code (transformers' modeling files made from its modular files,
  matplotlib's pyplot) are code a person reads, and stay;
- files with the same bytes as a file earlier in name order are skipped (deduplicated by content);
- files are taken in order of their names, each preceded by a header line "# file: <name>" (as
  data/stdlib), and a file goes to val when crc32 of its name is divisible by 20 (about 5%): a
  file stays on its side of the split when other packages are installed or removed.

With --input_dir: every file below that folder whose name does not start with a dot, in order of
its relative path, as it is (no header), with the same split, UTF-8 and empty-file rules and the
same deduplication; no size or line-length limit, since you chose the files.

Tokenizing runs in --num_proc processes. Offline: set GPT2_RANKS_FILE (see tokenizer.py).

    $ python data/python_code/prepare.py
    $ python data/python_code/prepare.py --input_dir=~/my_texts --out_dir=data/my_texts
    $ python train_sophiag.py config/train_gpt2_small_sophiag.py --dataset=python_code
"""

import argparse
import hashlib
import multiprocessing
import os
import pickle
import platform
import site
import sys
import sysconfig
import time
import zlib

import numpy as np
from tqdm import tqdm

# the tokenizer lives at the repository root, two folders up; this script runs standalone
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tokenizer import GPT2_EOT_TOKEN, GPT2_VOCAB_SIZE, gpt2_encoding  # noqa: E402

EXCLUDED_FOLDERS = {"test", "tests", "idle_test", "site-packages", "dist-packages"}
MAX_FILE_BYTES = 1_000_000  # larger Python files are data tables, not code
MAX_LINE_CHARS = 1_000  # a longer line is a serialized blob or minified data


def fail(message):
    """A mistake the user can fix: one line, exit status 2, nothing written."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's usage + message, as one line
        fail(message)


def interpreter_roots():
    """The folders this interpreter imports installed code from, in import order."""
    roots = [sysconfig.get_paths()["stdlib"]] + site.getsitepackages()
    if site.ENABLE_USER_SITE:
        roots.append(site.getusersitepackages())
    unique = []
    for root in roots:
        root = os.path.realpath(root)
        if os.path.isdir(root) and root not in unique:
            unique.append(root)
    return unique


def python_files(roots):
    """(name, path) of the *.py files below `roots` under the rules above, sorted by name, and
    the number of names skipped because an earlier root holds the same name."""
    found, shadowed = {}, 0
    real_roots = {os.path.realpath(root) for root in roots}
    for root in roots:
        for folder, subfolders, files in os.walk(root):
            subfolders[:] = sorted(d for d in subfolders if d not in EXCLUDED_FOLDERS
                                   and os.path.realpath(os.path.join(folder, d)) not in real_roots)
            for file in sorted(files):
                if not file.endswith(".py"):
                    continue
                path = os.path.join(folder, file)
                name = os.path.relpath(path, root).replace(os.sep, "/")
                if name in found:
                    shadowed += 1
                else:
                    found[name] = path
    return sorted(found.items()), shadowed


def text_files(input_dir):
    """(name, path) of every file below input_dir whose name does not start with a dot, sorted."""
    found = []
    for folder, subfolders, files in os.walk(input_dir):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        for file in files:
            if not file.startswith("."):
                path = os.path.join(folder, file)
                found.append((os.path.relpath(path, input_dir).replace(os.sep, "/"), path))
    return sorted(found)


def is_val_file(name):
    return zlib.crc32(name.encode("utf-8")) % 20 == 0


def encode_file(job):
    """In a worker: read one file, apply the rules, encode it. Returns (skip reason or None,
    sha256 of the file's bytes, sha256 of the document's text, token ids as uint16)."""
    name, path, python = job
    with open(path, "rb") as f:
        data = f.read()
    content_hash = hashlib.sha256(data).digest()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8", content_hash, None, None
    if not text.strip():
        return "empty", content_hash, None, None
    if python:
        if len(data) > MAX_FILE_BYTES:
            return f"over {MAX_FILE_BYTES:,} bytes", content_hash, None, None
        if max(map(len, text.splitlines())) > MAX_LINE_CHARS:
            return f"a line over {MAX_LINE_CHARS:,} characters", content_hash, None, None
        text = f"# file: {name}\n{text}" + ("" if text.endswith("\n") else "\n")
    tokens = gpt2_encoding().encode_ordinary(text)
    tokens.append(GPT2_EOT_TOKEN)  # <|endoftext|> closes every file
    return None, content_hash, hashlib.sha256(text.encode("utf-8")).digest(), np.array(tokens, dtype=np.uint16)


def main(argv=None):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)),
                        help="where train.bin, val.bin and meta.pkl go (default: this script's folder)")
    parser.add_argument("--input_dir", default=None,
                        help="read every text file in this folder instead of the interpreter's Python files")
    parser.add_argument("--roots", nargs="+", default=None, metavar="DIR",
                        help="read the Python files of these folders, in this order, instead of the "
                             "interpreter's (e.g. another environment's site-packages)")
    parser.add_argument("--num_proc", type=int, default=os.cpu_count() or 1,
                        help="tokenizer processes (default: every core)")
    args = parser.parse_args(argv)
    if args.input_dir is not None and args.roots is not None:
        fail("--input_dir and --roots exclude each other: one reads text files, the other Python files")
    for folder in [args.input_dir] if args.input_dir is not None else args.roots or []:
        if not os.path.isdir(folder):
            fail(f"{folder} is not a directory")
    if args.num_proc < 1:
        fail(f"--num_proc must be >= 1, got {args.num_proc}")
    try:
        gpt2_encoding()  # here, not in the workers: a missing ranks file is one line, before any work
    except (ValueError, OSError, RuntimeError) as e:
        fail(str(e))

    started = time.time()
    python = args.input_dir is None
    if python:
        roots = [os.path.abspath(root) for root in args.roots] if args.roots else interpreter_roots()
        files, shadowed = python_files(roots)
        skipped = {"shadowed by an earlier folder": shadowed} if shadowed else {}
    else:
        roots = [os.path.abspath(args.input_dir)]
        files, skipped = text_files(args.input_dir), {}
    for split, count in (("train", sum(not is_val_file(name) for name, _ in files)),
                         ("val", sum(is_val_file(name) for name, _ in files))):
        if not count:
            fail(f"no {'*.py ' if python else ''}file in {', '.join(roots)} falls into {split} (val takes "
                 f"the files whose crc32(name) % 20 == 0); give it more files")

    # each file's tokens go straight to its split's temporary file, in name order; the three
    # outputs are renamed into place only when all are complete, so an interrupted run never
    # leaves a train.bin that looks whole, nor bins that disagree with meta.pkl
    os.makedirs(args.out_dir, exist_ok=True)
    paths = {split: os.path.join(args.out_dir, f"{split}.bin") for split in ("train", "val")}
    paths["meta"] = os.path.join(args.out_dir, "meta.pkl")
    kept = {"train": [], "val": []}
    tokens = {"train": 0, "val": 0}
    document_hashes = {"train": [], "val": []}
    seen = set()
    outputs = {split: open(paths[split] + ".tmp", "wb") for split in ("train", "val")}
    try:
        jobs = [(name, path, python) for name, path in files]
        with multiprocessing.Pool(args.num_proc) as pool:
            results = pool.imap(encode_file, jobs, chunksize=16)
            for (name, _, _), (reason, content_hash, text_hash, ids) in tqdm(
                    zip(jobs, results), total=len(jobs), desc="tokenizing", unit="file"):
                if reason is None and content_hash in seen:
                    reason = "same bytes as an earlier file"
                seen.add(content_hash)
                if reason is not None:
                    skipped[reason] = skipped.get(reason, 0) + 1
                    continue
                split = "val" if is_val_file(name) else "train"
                ids.tofile(outputs[split])
                kept[split].append(name)
                tokens[split] += len(ids)
                document_hashes[split].append(text_hash)
        for split, f in outputs.items():
            f.close()
            if not kept[split]:
                fail(f"every file of {split} in {', '.join(roots)} was skipped ("
                     f"{', '.join(f'{reason}: {count}' for reason, count in sorted(skipped.items()))}); "
                     f"give it more files")
        # the text's identity: every document of train, then of val, in order
        fingerprint = hashlib.sha256(b"".join(document_hashes["train"] + [b"val"] + document_hashes["val"])).hexdigest()
        meta = {"vocab_size": GPT2_VOCAB_SIZE, "tokenizer": "gpt2", "dtype": "uint16",
                "source": "python" if python else "text", "roots": roots,
                "interpreter": f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
                "files": len(kept["train"]) + len(kept["val"]),
                "train_files": kept["train"], "val_files": kept["val"],
                "train_tokens": tokens["train"], "val_tokens": tokens["val"],
                "skipped": dict(sorted(skipped.items())), "fingerprint": fingerprint}
        with open(paths["meta"] + ".tmp", "wb") as f:
            pickle.dump(meta, f)
    except BaseException:
        for f in outputs.values():
            f.close()
        for path in paths.values():
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")
        raise
    for path in paths.values():
        os.replace(path + ".tmp", path)

    print(f"{meta['files']:,} files ({len(kept['train']):,} train, {len(kept['val']):,} val) from "
          f"{', '.join(roots)}")
    for reason, count in meta["skipped"].items():
        print(f"skipped {count:,}: {reason}")
    for split in ("train", "val"):
        print(f"{split} has {tokens[split]:,} tokens")
    print(f"fingerprint {fingerprint[:16]} ({meta['interpreter']}), {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
