"""Token files checked against the record every data/*/prepare.py writes into meta.pkl: the dtype
and each split's token count. The token files of another dtype, of another dataset or cut short
are refused in one line (tests/test_faults.py, bad inputs); a dataset prepared before the record
existed trains, with one warning."""

import os
import pickle
import subprocess
import sys

import numpy as np

from helpers import ROOT, call_main, make_char_dataset, tiny_args

def prepare(name, *args, env=None):
    script = os.path.join(ROOT, 'data', name, 'prepare.py')
    result = subprocess.run([sys.executable, script, *map(str, args)], capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, **(env or {})))
    assert result.returncode == 0, result.stderr[-3000:]

def fake_stdlib(folder):
    """60 small modules, enough for the val split (every file whose name hashes to 0 mod 20)."""
    os.makedirs(folder)
    for i in range(60):
        with open(os.path.join(folder, f'mod{i}.py'), 'w') as f:
            f.write(f"x = {i}  # module {i}\n" * 10)
    return folder

def test_every_prepare_script_records_dtype_and_token_counts(tmp_path, gpt2_ranks_file):
    """Each of the scripts that run offline, on a small corpus: meta.pkl says uint16 and each
    split's token count, which is the length of its token file."""
    root, text = fake_stdlib(str(tmp_path / 'lib')), tmp_path / 'input.txt'
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50)
    ranks = {'GPT2_RANKS_FILE': gpt2_ranks_file}
    runs = {'stdlib_char': (['--stdlib', root], None), 'stdlib': (['--stdlib', root], ranks),
            'shakespeare_char': (['--input', text], None),
            'python_code': (['--roots', root, '--num_proc', 1], ranks)}
    for name, (args, env) in runs.items():
        out = tmp_path / name
        prepare(name, *args, '--out_dir', out, env=env)
        with open(out / 'meta.pkl', 'rb') as f:
            meta = pickle.load(f)
        assert meta['dtype'] == 'uint16', name
        for split in ('train', 'val'):
            tokens = np.fromfile(out / f'{split}.bin', dtype=np.uint16)
            assert meta[f'{split}_tokens'] == len(tokens) > 0, (name, split)

def test_a_dataset_prepared_before_the_record_trains_with_one_warning(tmp_path, capsys):
    data = make_char_dataset(str(tmp_path / 'old'))
    with open(os.path.join(data, 'meta.pkl'), 'rb') as f:
        meta = pickle.load(f)
    with open(os.path.join(data, 'meta.pkl'), 'wb') as f:
        pickle.dump({key: meta[key] for key in ('vocab_size', 'stoi', 'itos')}, f)
    status, stdout, err = call_main(capsys, tiny_args(data, str(tmp_path / 'out'), max_iters=2))
    assert status == 0 and err == ''
    warnings = [line for line in stdout.splitlines() if line.startswith('warning')]
    assert warnings == [f"warning: {data}/meta.pkl records no dtype or token counts (prepared "
                        f"before they were): the token files are read as uint16 unchecked; prepare "
                        f"the token files in {data} to record them"]
