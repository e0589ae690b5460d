"""Fixtures shared by the test files.

GPT-2 BPE needs the GPT-2 ranks; tiktoken would download them from a blob store, so the tests take
them from the openai-whisper sdist on PyPI instead (whisper/assets/gpt2.tiktoken), cached in
~/.cache/sophia-gpt2-test, or from $GPT2_RANKS_FILE when that is set.
"""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

WHISPER_SDIST = "openai-whisper==20250625"


@pytest.fixture(scope="session")
def gpt2_ranks_file():
    """Path of a GPT-2 ranks file in tiktoken format, downloaded with pip once and cached."""
    if os.environ.get("GPT2_RANKS_FILE"):
        path = os.environ["GPT2_RANKS_FILE"]
        if not os.path.isfile(path):
            pytest.fail(f"GPT2_RANKS_FILE={path} does not exist; unset it to let the tests download it")
        return path
    cache = Path.home() / ".cache" / "sophia-gpt2-test"
    ranks = cache / "gpt2.tiktoken"
    if not ranks.exists():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", WHISPER_SDIST,
               "-d", str(cache)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.fail(f"`{' '.join(cmd)}` failed (the GPT-2 tests need PyPI, or GPT2_RANKS_FILE set "
                        f"to a local gpt2.tiktoken):\n{result.stdout[-1500:]}\n{result.stderr[-1500:]}")
        sdist = next(cache.glob("openai*whisper-20250625.tar.gz"))
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
            contents = tar.extractfile(member).read()
        # write, then rename: a parallel test session never reads half a file
        tmp = ranks.with_name(f"gpt2.tiktoken.{os.getpid()}.tmp")
        tmp.write_bytes(contents)
        os.replace(tmp, ranks)
    return str(ranks)
