"""
Tiny Shakespeare with GPT-2 BPE: the 1.1 MB of Shakespeare plays from karpathy/char-rnn.
Downloads input.txt into --out_dir (or reads --input), then writes train.bin and val.bin
(np.uint16 GPT-2 token ids: the first 90% of the characters for train, the last 10% for val) and
meta.pkl ({'vocab_size': 50257, 'tokenizer': 'gpt2'}). Takes a few seconds once the text is there.
Expected result for the usual input.txt: train 301,966 tokens, val 36,059.
Offline: set GPT2_RANKS_FILE (see tokenizer.py) and pass --input.
"""

import argparse
import os
import pickle
import sys
import urllib.request

# the tokenizer lives at the repository root, two folders up; this script runs standalone
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np
from tqdm import tqdm

from tokenizer import GPT2_VOCAB_SIZE, gpt2_encoding

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def fail(message):
    """A mistake the user can fix (no network, a missing file): one line naming the cause and the
    fix, exit status 2, nothing overwritten."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def download(url, path):
    """Fetch url into path (via a temporary name, so a broken download is never mistaken for the text)."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(path + ".tmp", "wb") as f:
            f.write(response.read())
    except OSError as e:  # URLError, timeouts and refused connections are all OSErrors
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        fail(f"could not download {url} ({getattr(e, 'reason', e)}); "
             "pass --input path/to/input.txt to use a local copy")
    os.replace(path + ".tmp", path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="a local text file to use instead of downloading tinyshakespeare")
    parser.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)),
                        help="where input.txt, train.bin, val.bin and meta.pkl go (default: this script's folder)")
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    input_path = args.input or os.path.join(args.out_dir, "input.txt")
    if args.input is None and not os.path.exists(input_path):
        download(URL, input_path)
    if not os.path.isfile(input_path):
        fail(f"--input {input_path} does not exist; pass a text file, or leave --input out to download")
    try:
        enc = gpt2_encoding()
    except (ValueError, OSError, RuntimeError) as e:  # each names the cause and the fix
        fail(str(e))
    with open(input_path, encoding="utf-8") as f:
        data = f.read()
    print(f"length of dataset in characters: {len(data):,}")

    # split the characters first, then encode each part: the same 90/10 cut as the char-level set
    n = len(data)
    splits = {"train": data[: int(n * 0.9)], "val": data[int(n * 0.9) :]}

    # temporary names, renamed at the end: an interrupted run leaves no complete-looking bins
    outputs = {os.path.join(args.out_dir, name) + ".tmp": os.path.join(args.out_dir, name)
               for name in ("train.bin", "val.bin", "meta.pkl")}
    # the dtype and each split's token count: the trainer checks the token files against them
    meta = {"vocab_size": GPT2_VOCAB_SIZE, "tokenizer": "gpt2", "dtype": "uint16"}
    try:
        for split, text in tqdm(splits.items(), desc="encoding"):
            # encode_ordinary: a literal "<|endoftext|>" in the text is just text, never token 50256
            ids = np.array(enc.encode_ordinary(text), dtype=np.uint16)
            ids.tofile(os.path.join(args.out_dir, f"{split}.bin.tmp"))
            print(f"{split} has {len(ids):,} tokens")
            meta[f"{split}_tokens"] = len(ids)
        with open(os.path.join(args.out_dir, "meta.pkl.tmp"), "wb") as f:
            pickle.dump(meta, f)
    except BaseException:
        for tmp in outputs:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    for tmp, path in outputs.items():
        os.replace(tmp, path)


if __name__ == "__main__":
    main()
