"""
Tokenizers for the datasets under data/: GPT-2 BPE (tiktoken) and character-level.

Every prepare script writes a meta.pkl next to its train.bin/val.bin; `load_meta` reads it and
`encoder_decoder` turns it into (encode, decode) functions, so sample.py never has to know which
dataset a checkpoint was trained on.

GPT-2 BPE offline: tiktoken.get_encoding("gpt2") downloads the ranks on first use. On a machine
without access to openaipublic.blob.core.windows.net, point the environment variable
GPT2_RANKS_FILE at a local copy of the GPT-2 ranks in tiktoken's format (one "<base64 token> <rank>"
per line, 50,256 lines). One ships inside the openai-whisper sdist on PyPI:

    pip download --no-deps --no-binary :all: openai-whisper==20250625 -d /tmp/whisper
    tar xzf /tmp/whisper/openai_whisper-20250625.tar.gz --strip-components=1 \
        -C /tmp/whisper openai_whisper-20250625/whisper/assets/gpt2.tiktoken
    export GPT2_RANKS_FILE=/tmp/whisper/whisper/assets/gpt2.tiktoken

With GPT-2's split pattern and <|endoftext|> = 50256 it encodes exactly like tiktoken's "gpt2".
"""

import hashlib
import os
import pickle

import tiktoken
import tiktoken.load

# GPT-2's pre-tokenization regex, as published in openai/gpt-2 encoder.py: contractions, runs of
# letters, runs of digits, runs of other symbols (each optionally led by one space), whitespace
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT_TOKEN = 50256  # <|endoftext|>, the one special token; it follows the 50,256 BPE ranks
GPT2_VOCAB_SIZE = 50257

_gpt2_cache = {}  # building the encoding parses 50k ranks: do it once per process and file


def gpt2_encoding():
    """The tiktoken GPT-2 encoding: from $GPT2_RANKS_FILE when set, else tiktoken's download."""
    ranks_file = os.environ.get("GPT2_RANKS_FILE")
    key = ranks_file or "gpt2"
    if key not in _gpt2_cache:
        _gpt2_cache[key] = _encoding_from_ranks_file(ranks_file) if ranks_file else _download_gpt2()
    return _gpt2_cache[key]


def _download_gpt2():
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises whatever its HTTP client raises; give one line
        raise RuntimeError(
            f"could not load tiktoken's gpt2 encoding ({type(e).__name__}: {e}); when offline, set "
            "GPT2_RANKS_FILE to a local gpt2.tiktoken (see tokenizer.py's docstring)"
        ) from e


def _encoding_from_ranks_file(path):
    hint = "point GPT2_RANKS_FILE at whisper/assets/gpt2.tiktoken from the openai-whisper sdist"
    try:
        with open(path, "rb") as f:
            contents = f.read()
    except OSError as e:
        raise FileNotFoundError(f"GPT2_RANKS_FILE={path} cannot be read ({e.strerror}); {hint}") from None
    # tiktoken caches what it reads under a key made from the path alone; passing the file's own
    # hash makes it re-read the file whenever its contents change, instead of serving a stale copy
    try:
        ranks = tiktoken.load.load_tiktoken_bpe(path, expected_hash=hashlib.sha256(contents).hexdigest())
    except ValueError as e:
        raise ValueError(f"GPT2_RANKS_FILE={path} is malformed ({e}); {hint}") from None
    if sorted(ranks.values()) != list(range(GPT2_EOT_TOKEN)):
        raise ValueError(
            f"GPT2_RANKS_FILE={path} holds {len(ranks)} distinct tokens, not the 50,256 ranks "
            f"0..50255 of GPT-2; {hint}"
        )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_SPLIT_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": GPT2_EOT_TOKEN},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


def load_meta(data_dir):
    """The meta dict that data/<name>/prepare.py wrote: vocab_size, and stoi/itos or 'tokenizer'."""
    path = os.path.join(data_dir, "meta.pkl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no meta.pkl in {data_dir}: run the prepare.py of that dataset first")
    with open(path, "rb") as f:
        return pickle.load(f)


def encoder_decoder(meta):
    """(encode, decode) for a meta dict: encode(str) -> list[int], decode(list[int]) -> str."""
    if meta.get("tokenizer") == "gpt2":
        enc = gpt2_encoding()
        # a prompt may spell out <|endoftext|> on purpose to start a fresh document
        return (lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})), enc.decode
    if "stoi" in meta:
        stoi, itos = meta["stoi"], meta["itos"]
        placeholder = meta.get("placeholder")  # stands in for characters outside the vocabulary

        def encode(s):
            if placeholder is not None:
                return [stoi.get(c, stoi[placeholder]) for c in s]
            unknown = sorted(set(s) - stoi.keys())
            if unknown:
                raise ValueError(f"characters {''.join(unknown)!r} are not in this dataset's vocabulary")
            return [stoi[c] for c in s]

        return encode, lambda ids: "".join(itos[i] for i in ids)
    raise ValueError(f"meta.pkl has neither 'stoi' nor tokenizer='gpt2' (keys: {sorted(meta)}); rerun prepare.py")
