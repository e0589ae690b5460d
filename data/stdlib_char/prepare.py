"""
Character-level corpus that needs no download: the Python standard library's own source code, read
from the interpreter that runs this script. Writes train.bin and val.bin (np.uint16 character ids)
and meta.pkl (vocab_size, stoi, itos, the placeholder character, the file lists, the Python
version and implementation the corpus came from, the dtype and each split's token count) into
--out_dir. Takes about a second. On CPython 3.11.7 (Linux): 734 files, 12.1 MB, a vocabulary of
100 characters, train 11,597,338 tokens (695 files), val 540,521 tokens (39 files). Other Python
versions give another corpus, so other counts and other losses: compare runs only on corpora from
the same version.

The rules, chosen so two runs on the same interpreter give identical bytes:
- every *.py file under sysconfig's stdlib directory, except any file below a folder named
  test, tests or idle_test (CPython's test suites: test/, unittest/test/, lib2to3/tests/,
  idlelib/idle_test/, tkinter/test/, ...) or site-packages/dist-packages (third-party code);
- each split holds its files in order of their relative path, each behind a header line
  "# file: json/decoder.py" so a sample shows where one module ends and the next begins;
- a file goes to val when crc32 of its relative path is divisible by 20 (about 5% of the files):
  a file stays on its side of the split when other files are added or removed in another Python;
- read as UTF-8 with universal newlines (undecodable bytes become U+FFFD); a character seen fewer
  than --min_count times in the whole corpus (a few hundred of 12 million characters: accented
  names, Greek letters, box drawing) is replaced by the placeholder U+FFFD, because an embedding
  seen that rarely never trains, and it keeps the vocabulary at about 100.
"""

import argparse
import os
import pickle
import platform
import sys
import sysconfig
import zlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

EXCLUDED_FOLDERS = {"test", "tests", "idle_test", "site-packages", "dist-packages"}
PLACEHOLDER = "\ufffd"  # the Unicode replacement character, also what undecodable bytes become


def stdlib_files(root):
    """Relative paths (posix strings) of the stdlib's *.py files outside excluded folders, sorted."""
    paths = (p.relative_to(root) for p in Path(root).rglob("*.py"))
    return sorted(p.as_posix() for p in paths if not EXCLUDED_FOLDERS & set(p.parts[:-1]))


def is_val_file(rel_path):
    return zlib.crc32(rel_path.encode("utf-8")) % 20 == 0


def corpus_source(root):
    """Where the corpus came from, for meta.pkl: the tree read, and the Python version and
    implementation whose standard library it is. The version is known only for this interpreter's
    own stdlib; a --stdlib tree from elsewhere records None rather than a version it may not be."""
    own = os.path.realpath(root) == os.path.realpath(sysconfig.get_paths()["stdlib"])
    return {"stdlib": os.path.abspath(root),
            "python_version": platform.python_version() if own else None,
            "python_implementation": platform.python_implementation() if own else None}


def describe_source(source):
    if source["python_version"] is None:
        return f"{source['stdlib']} (not this interpreter's standard library: no Python version recorded)"
    return f"the standard library of {source['python_implementation']} {source['python_version']} ({source['stdlib']})"


def fail(message):
    """A mistake the user can fix: one line naming it, exit status 2, nothing written."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)),
                        help="where train.bin, val.bin and meta.pkl go (default: this script's folder)")
    parser.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"],
                        help="root of the source tree to read (default: this interpreter's stdlib)")
    parser.add_argument("--min_count", type=int, default=100,
                        help="characters seen fewer times than this become the placeholder U+FFFD")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.stdlib):
        fail(f"--stdlib {args.stdlib} is not a directory; pass the root of a Python source tree")
    if args.min_count < 1:
        fail(f"--min_count must be >= 1, got {args.min_count}")

    files = stdlib_files(args.stdlib)
    splits = {"train": [f for f in files if not is_val_file(f)], "val": [f for f in files if is_val_file(f)]}
    for split, names in splits.items():
        if not names:
            fail(f"no *.py file under {args.stdlib} falls into {split} (val takes files whose "
                 "crc32(relative path) % 20 == 0); point --stdlib at a larger tree")

    # read every file once, in order; the text of a split is its files, each behind its header line
    texts = {split: [] for split in splits}
    with tqdm(total=len(files), desc="reading", unit="file") as bar:
        for split, names in splits.items():
            for name in names:
                with open(os.path.join(args.stdlib, name), encoding="utf-8", errors="replace") as f:
                    source = f.read()
                if source and not source.endswith("\n"):
                    source += "\n"  # so the next header starts on its own line
                texts[split].append(f"# file: {name}\n{source}")
                bar.update()
    # code points as a numpy array: counting and mapping 12M characters then takes milliseconds
    codepoints = {split: np.frombuffer("".join(parts).encode("utf-32-le"), dtype=np.uint32)
                  for split, parts in texts.items()}

    # the vocabulary: every character seen at least min_count times, plus the placeholder
    counts = np.bincount(np.concatenate(list(codepoints.values())))
    frequent = np.flatnonzero(counts >= args.min_count)
    chars = sorted(set(map(chr, frequent)) | {PLACEHOLDER})
    vocab_size = len(chars)
    assert vocab_size < 2**16, "ids must fit in uint16"
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    # lookup table from code point to id: the placeholder's id for every rare character
    table = np.full(len(counts), stoi[PLACEHOLDER], dtype=np.uint16)
    table[frequent] = [stoi[chr(c)] for c in frequent]
    replaced = int(counts[(counts > 0) & (counts < args.min_count)].sum())

    meta = {
        "vocab_size": vocab_size,
        "tokenizer": "char",
        "itos": itos,
        "stoi": stoi,
        "placeholder": PLACEHOLDER,
        "min_count": args.min_count,
        **corpus_source(args.stdlib),  # the corpus, its size and the losses depend on the version
        "train_files": splits["train"],
        "val_files": splits["val"],
        "dtype": "uint16",
        **{f"{split}_tokens": len(ids) for split, ids in codepoints.items()},
    }
    # write everything under temporary names and rename only at the end: an interrupted run never
    # leaves a train.bin that looks complete, nor bins that disagree with meta.pkl
    os.makedirs(args.out_dir, exist_ok=True)
    outputs = {}
    try:
        for split, ids in codepoints.items():
            path = os.path.join(args.out_dir, f"{split}.bin")
            outputs[path + ".tmp"] = path
            table[ids].tofile(path + ".tmp")
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
          f"{describe_source(meta)}")
    print(f"vocab size: {vocab_size:,} ({replaced:,} rare characters replaced by U+FFFD)")
    print(f"train has {len(codepoints['train']):,} tokens")
    print(f"val has {len(codepoints['val']):,} tokens")


if __name__ == "__main__":
    main()
