"""
The corpus of data/stdlib_char (the Python standard library's own source code, no download),
tokenized with GPT-2 BPE instead of characters: real text for the GPT-2 configs where OpenWebText
is not at hand, e.g. to check a GPU setup or measure throughput before the long download. Writes
train.bin and val.bin (np.uint16 GPT-2 token ids, each file followed by <|endoftext|> = 50256) and
meta.pkl ({'vocab_size': 50257, 'tokenizer': 'gpt2', ...}, with the file lists, the Python
version and implementation the corpus came from, the dtype and each split's token count) into
--out_dir.

The files, their order, the "# file: ..." headers and the train/val split are exactly those of
data/stdlib_char/prepare.py. On CPython 3.11.7 (Linux): 734 files, 12.1 MB, train 5,425,673
tokens, val 241,252 tokens, in about 4 seconds on 2 cores; other Python versions give another
corpus. Offline: set GPT2_RANKS_FILE (see tokenizer.py).

    $ python data/stdlib/prepare.py
    $ python train_sophiag.py config/train_gpt2_small_sophiag.py --dataset=stdlib
"""

import argparse
import importlib.util
import os
import pickle
import sys
import sysconfig

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
# the tokenizer lives at the repository root, two folders up; this script runs standalone
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from tokenizer import GPT2_VOCAB_SIZE, gpt2_encoding  # noqa: E402


def char_prepare():
    """data/stdlib_char/prepare.py as a module: the file selection and split rules live there."""
    path = os.path.join(os.path.dirname(HERE), "stdlib_char", "prepare.py")
    spec = importlib.util.spec_from_file_location("stdlib_char_prepare", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fail(message):
    """A mistake the user can fix (a bad argument, no GPT-2 ranks offline): one line naming it,
    exit status 2, nothing written."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=HERE,
                        help="where train.bin, val.bin and meta.pkl go (default: this script's folder)")
    parser.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"],
                        help="root of the source tree to read (default: this interpreter's stdlib)")
    parser.add_argument("--num_threads", type=int, default=os.cpu_count() or 1,
                        help="tokenizer threads (default: every core)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.stdlib):
        fail(f"--stdlib {args.stdlib} is not a directory; pass the root of a Python source tree")
    if args.num_threads < 1:
        fail(f"--num_threads must be >= 1, got {args.num_threads}")
    try:
        enc = gpt2_encoding()
    except (ValueError, OSError, RuntimeError) as e:  # each names the cause and the fix
        fail(str(e))

    rules = char_prepare()
    files = rules.stdlib_files(args.stdlib)
    splits = {"train": [f for f in files if not rules.is_val_file(f)],
              "val": [f for f in files if rules.is_val_file(f)]}
    for split, names in splits.items():
        if not names:
            fail(f"no *.py file under {args.stdlib} falls into {split} (val takes files whose "
                 "crc32(relative path) % 20 == 0); point --stdlib at a larger tree")

    tokens = {}
    for split, names in splits.items():
        documents = []
        for name in names:  # the same text per file as the character-level corpus
            with open(os.path.join(args.stdlib, name), encoding="utf-8", errors="replace") as f:
                source = f.read()
            if source and not source.endswith("\n"):
                source += "\n"
            documents.append(f"# file: {name}\n{source}")
        ids = enc.encode_ordinary_batch(documents, num_threads=args.num_threads)
        tokens[split] = np.concatenate([np.array(d + [enc.eot_token], dtype=np.uint16) for d in ids])

    meta = {"vocab_size": GPT2_VOCAB_SIZE, "tokenizer": "gpt2", "train_files": splits["train"],
            "val_files": splits["val"], **rules.corpus_source(args.stdlib), "dtype": "uint16",
            **{f"{split}_tokens": len(ids) for split, ids in tokens.items()}}
    # temporary names first, renamed only when all three are written: an interrupted run leaves
    # neither a train.bin that looks complete nor bins that disagree with meta.pkl
    os.makedirs(args.out_dir, exist_ok=True)
    outputs = {}
    try:
        for split, ids in tokens.items():
            path = os.path.join(args.out_dir, f"{split}.bin")
            outputs[path + ".tmp"] = path
            ids.tofile(path + ".tmp")
        path = os.path.join(args.out_dir, "meta.pkl")
        outputs[path + ".tmp"] = path
        with open(path + ".tmp", "wb") as f:
            pickle.dump(meta, f)
    except BaseException:
        for tmp in outputs:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    for tmp, path in outputs.items():
        os.replace(tmp, path)

    print(f"{len(files):,} files ({len(splits['train']):,} train, {len(splits['val']):,} val) from "
          f"{rules.describe_source(meta)}")
    for split, ids in tokens.items():
        print(f"{split} has {len(ids):,} tokens")


if __name__ == "__main__":
    main()
