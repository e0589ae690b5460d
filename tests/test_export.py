"""Tests of export_hf.py: checkpoints written as transformers GPT-2 folders and loaded back
offline, with the logits of this repository's model. The mapping is checked on small random
models over the settings grid; the real scripts run end to end on a character run and on a GPT-2
BPE run."""

import json
import os
import pickle
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT, check_ok, make_char_dataset, run_script, tiny_args

sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
import export_hf  # noqa: E402
import tokenizer  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from model import MODEL_KEYS  # noqa: E402

from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel, pipeline  # noqa: E402

TOLERANCE = 1e-5  # max relative error of the float32 logits
TINY = dict(n_layer=3, n_head=2, n_embd=32, block_size=16, bias=True, vocab_size=101, dropout=0.0,
            scale_attn_by_inverse_layer_idx=False, gelu='tanh')
OFFLINE = {'HF_HUB_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1'}


def random_gpt(seed=0, **args):
    """A GPT whose every tensor is random and large (weights and biases N(0, 0.2), LayerNorm gains
    near 1): a wrong transpose, bias, activation or attention scale then moves the logits far
    beyond the tolerance, where the training init (0.02, zero biases) could hide it."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**args)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith(('ln_1.weight', 'ln_2.weight', 'ln_f.weight')) else 0.0, 0.2)
    return model


def relative_error(theirs, ours):
    return ((theirs - ours).abs().max() / ours.abs().max()).item()


def tokens(vocab_size, length, seed=1):
    return torch.randint(0, vocab_size, (2, length), generator=torch.Generator().manual_seed(seed))


def compare(model, folder, length, **config_overrides):
    """Relative error of the logits of the transformers model in folder against model's."""
    hf = GPT2LMHeadModel.from_pretrained(folder, local_files_only=True, **config_overrides).eval()
    idx = tokens(model.config.vocab_size, length)
    with torch.no_grad():
        ours, _ = model(idx, all_logits=True)
        theirs = hf(idx).logits
    assert theirs.shape == ours.shape and theirs.dtype == torch.float32
    return relative_error(theirs, ours)


# ----------------------------------------------------------------------------- the mapping

def test_every_model_key_is_mapped():
    # a key added to the model (model.MODEL_KEYS) must be mapped in export_hf.py, or its
    # checkpoints are refused: this fails as a reminder
    assert set(MODEL_KEYS) == set(export_hf.EXPORTED_KEYS)


@pytest.mark.parametrize('gelu', ['tanh', 'exact'])
@pytest.mark.parametrize('scale_attn_by_inverse_layer_idx', [False, True])
@pytest.mark.parametrize('bias', [True, False])
def test_exported_logits_equal_the_model(tmp_path, bias, scale_attn_by_inverse_layer_idx, gelu):
    args = dict(TINY, bias=bias, scale_attn_by_inverse_layer_idx=scale_attn_by_inverse_layer_idx, gelu=gelu)
    model = random_gpt(**args)
    export_hf.hf_model(model, args).save_pretrained(tmp_path)
    assert compare(model, tmp_path, args['block_size']) <= TOLERANCE
    config = json.load(open(tmp_path / 'config.json'))
    assert config['activation_function'] == {'tanh': 'gelu_new', 'exact': 'gelu'}[gelu]
    assert config['scale_attn_by_inverse_layer_idx'] == scale_attn_by_inverse_layer_idx
    assert (config['n_positions'], config['vocab_size'], config['tie_word_embeddings']) == (16, 101, True)
    weights = load_file(tmp_path / 'model.safetensors')
    assert all(w.dtype == torch.float32 for w in weights.values())
    biases = [w for name, w in weights.items() if name.endswith('.bias')]
    assert len(biases) == 3 * 6 + 1  # per block ln_1, c_attn, attn c_proj, ln_2, c_fc, mlp c_proj; ln_f
    if not bias:
        assert all(torch.count_nonzero(b) == 0 for b in biases)


def test_the_comparison_tells_the_settings_apart(tmp_path):
    # the tolerance above is meaningful: the other GELU, or the other attention scaling, on the
    # same weights is far outside it
    args = dict(TINY, gelu='tanh', scale_attn_by_inverse_layer_idx=True)
    model = random_gpt(**args)
    export_hf.hf_model(model, args).save_pretrained(tmp_path)
    assert compare(model, tmp_path, 16) <= TOLERANCE
    assert compare(model, tmp_path, 16, activation_function='gelu') > 10 * TOLERANCE  # 3e-4 here
    assert compare(model, tmp_path, 16, scale_attn_by_inverse_layer_idx=False) > 100 * TOLERANCE


def test_padded_vocabulary_and_cropped_block(tmp_path):
    # GPT-2 BPE runs have 50,304 logits (50,257 padded); a run from GPT-2's weights with a smaller
    # block_size crops the position embeddings: the checkpoint holds the cropped table
    args = dict(TINY, block_size=32, vocab_size=50304, bias=False)
    model = random_gpt(**args)
    model.crop_block_size(12)
    state = dict(model=model.state_dict(), model_args=dict(args, block_size=12), config=dict(dataset='x'))
    loaded, loaded_args = export_hf.load_gpt(state)
    export_hf.hf_model(loaded, loaded_args, eos_token_id=50256).save_pretrained(tmp_path)
    assert compare(model, tmp_path, 12) <= TOLERANCE
    config = json.load(open(tmp_path / 'config.json'))
    assert (config['n_positions'], config['vocab_size']) == (12, 50304)
    assert config['eos_token_id'] == config['bos_token_id'] == 50256


def test_old_checkpoint_without_gelu_key_exports_tanh():
    args = dict(TINY)
    del args['gelu']
    assert export_hf.check_model_args(args)['gelu'] == 'tanh'


# ----------------------------------------------------------------------------- the tokenizer

def test_gpt2_tokenizer_encodes_like_ours(gpt2_ranks_file, tmp_path, monkeypatch):
    monkeypatch.setenv('GPT2_RANKS_FILE', gpt2_ranks_file)
    encoding = tokenizer.gpt2_encoding()
    export_hf.write_gpt2_tokenizer(str(tmp_path), encoding, model_max_length=64)
    assert {'vocab.json', 'merges.txt', 'tokenizer.json', 'tokenizer_config.json'} <= set(os.listdir(tmp_path))
    merges = open(tmp_path / 'merges.txt', encoding='utf-8').read().splitlines()
    assert merges[:3] == ['#version: 0.2', 'Ġ t', 'Ġ a'] and len(merges) == 1 + 50000
    hf = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert len(hf) == 50257 and hf.eos_token_id == hf.bos_token_id == 50256 and hf.model_max_length == 64
    assert hf('Hello world')['input_ids'] == [15496, 995]
    source = ''.join(open(os.path.join(ROOT, name), encoding='utf-8').read()
                     for name in sorted(os.listdir(ROOT)) if name.endswith('.py'))
    texts = [
        source,  # code: indentation, operators, docstrings
        "  leading spaces, trailing spaces   \n\n\n\t\ttabs\r\nCRLF \u00a0no-break space",
        "naïve café déjà vu, Ελληνικά, русский, 日本語のテキスト, 한국어, عربي, emoji 🎉👍🏽👨‍👩‍👧",
        "3.14159 1,000,000 2024-11-23 0x1F 1e-5 ½ ² ٣ 123456789012345678901234567890",
        "it's I'm we've they'll she'd don't IT'S Shouldn't",
        ''.join(chr(i) for i in range(1, 256)),  # every byte-level character, controls included
        "before<|endoftext|>after <|endoftext|> <|endoftext|><|endoftext|>",
    ]
    for text in texts:
        # the text '<|endoftext|>' becomes the special id, as tokenizer.encoder_decoder encodes it
        expected = encoding.encode(text, allowed_special={'<|endoftext|>'})
        ids = hf(text)['input_ids']
        assert ids == expected, text[:80]
        assert hf.decode(ids) == text
    assert hf('a<|endoftext|>b')['input_ids'] == [64, 50256, 65]  # no id added on its own


# ----------------------------------------------------------------------------- refusals

def save_run(out_dir, dataset, **model_args):
    """A checkpoint as the trainer writes one (the keys export_hf reads), of a tiny random GPT."""
    args = dict(TINY, vocab_size=20, **model_args)
    model = random_gpt(**args)
    state = dict(format_version=checkpoint.FORMAT_VERSION, model=model.state_dict(), model_args=args,
                 config=dict(dataset=dataset), iter_num=3)
    os.makedirs(out_dir, exist_ok=True)
    return checkpoint.save_checkpoint(out_dir, state, 3, keep_last=3, is_best=False)


@pytest.fixture
def char_data(tmp_path):
    folder = tmp_path / 'chars'
    folder.mkdir()
    with open(folder / 'meta.pkl', 'wb') as f:
        chars = 'abcdefghijklmnopqrst'
        pickle.dump({'vocab_size': 20, 'stoi': {c: i for i, c in enumerate(chars)}, 'itos': dict(enumerate(chars))}, f)
    return str(folder)


def refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_hf.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    return lines[0]


def test_refusals_are_one_line_and_write_nothing(tmp_path, char_data, capsys):
    out, hf = str(tmp_path / 'out'), str(tmp_path / 'hf')
    assert 'no checkpoint in' in refused([out, hf], capsys)
    assert 'expected OUT_DIR and HF_DIR' in refused([out], capsys)
    assert "'overwrit' is not a config key" in refused([out, hf, '--overwrit=True'], capsys)
    save_run(out, char_data)
    assert "which='first'" in refused([out, hf, '--which=first'], capsys)
    assert "tokenizer='bpe'" in refused([out, hf, '--tokenizer=bpe'], capsys)
    assert 'has no best.pt' in refused([out, hf, '--which=best'], capsys)
    assert 'does not exist' in refused([out, hf, '--checkpoint=ckpt-00000099.pt'], capsys)
    assert 'fewer than GPT-2 BPE' in refused([out, hf, '--tokenizer=gpt2'], capsys)
    assert 'holds OUT_DIR' in refused([out, str(tmp_path), '--overwrite=True'], capsys)
    assert not os.path.exists(hf)
    # an existing folder is kept: refused without --overwrite, and --overwrite replaces only an export
    os.makedirs(hf)
    with open(os.path.join(hf, 'notes.txt'), 'w') as f:
        f.write('mine')
    assert 'already holds files' in refused([out, hf], capsys)
    assert 'not an earlier export' in refused([out, hf, '--overwrite=True'], capsys)
    assert os.listdir(hf) == ['notes.txt']
    assert 'is a file' in refused([out, os.path.join(hf, 'notes.txt')], capsys)


@pytest.mark.parametrize('model_args, complaint', [
    (dict(rotary=True), "rotary=True, which export_hf.py does not know"),  # a future model key
    (dict(gelu='swiglu'), "gelu='swiglu' has no transformers activation"),
    (dict(n_head=3), "not divisible by n_head=3"),
])
def test_refuses_what_gpt2_cannot_hold(tmp_path, char_data, capsys, model_args, complaint):
    out = str(tmp_path / 'out')
    path = save_run(out, char_data)
    state = checkpoint.load_checkpoint(path)
    state['model_args'].update(model_args)
    os.remove(path)
    checkpoint.save_checkpoint(out, state, 4, keep_last=3, is_best=False)
    assert complaint in refused([out, str(tmp_path / 'hf')], capsys)
    assert not os.path.exists(tmp_path / 'hf')


def test_refuses_untied_embeddings_damage_and_a_missing_dataset(tmp_path, char_data, capsys):
    out, hf = str(tmp_path / 'out'), str(tmp_path / 'hf')
    path = save_run(out, char_data)
    state = checkpoint.load_checkpoint(path)
    state['model']['lm_head.weight'] = state['model']['lm_head.weight'] + 1
    checkpoint.save_checkpoint(out, state, 5, keep_last=3, is_best=False)
    assert 'untied embeddings' in refused([out, hf], capsys)
    # a damaged newest checkpoint is skipped with a warning; with every one damaged, refused
    for name in ('ckpt-00000003.pt', 'ckpt-00000005.pt'):
        with open(os.path.join(out, name), 'r+b') as f:
            f.seek(100)
            f.write(b'\xff\xff')
    assert 'no usable checkpoint' in refused([out, hf], capsys)
    assert 'is damaged' in refused([out, hf, '--checkpoint=ckpt-00000005.pt'], capsys)
    # the dataset decides the tokenizer; without it the user must say which
    out2 = str(tmp_path / 'out2')
    save_run(out2, str(tmp_path / 'gone'))
    assert '--tokenizer=gpt2 or --tokenizer=none' in refused([out2, hf], capsys)
    # a meta.pkl that names no tokenizer this script knows
    unknown_meta = tmp_path / 'unknown_meta'
    unknown_meta.mkdir()
    with open(unknown_meta / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': 20, 'tokenizer': 'sentencepiece'}, f)
    out3 = str(tmp_path / 'out3')
    save_run(out3, str(unknown_meta))
    assert 'names neither GPT-2 BPE nor characters' in refused([out3, hf], capsys)
    assert not os.path.exists(hf)


def test_a_failed_export_leaves_nothing(tmp_path, char_data, capsys, monkeypatch):
    # a mapping bug caught by the export's own check: exit 1, no HF_DIR, no temporary folder
    out, hf = str(tmp_path / 'out'), str(tmp_path / 'hf')
    save_run(out, char_data)
    mapped = export_hf.hf_model
    def wrong_mapping(model, args, eos_token_id=None):
        result = mapped(model, args, eos_token_id)
        with torch.no_grad():
            result.transformer.h[0].mlp.c_fc.weight.mul_(1.01)
        return result
    monkeypatch.setattr(export_hf, 'hf_model', wrong_mapping)
    with pytest.raises(SystemExit) as exit_info:
        export_hf.main([out, hf, '--tokenizer=none'])
    assert exit_info.value.code == 1
    assert "logits differ from the checkpoint's" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ['chars', 'out']


def test_hf_dir_is_never_half_written(tmp_path, char_data, monkeypatch):
    # the new export is written elsewhere and renamed into place: while it is being written, HF_DIR
    # still holds the earlier export, byte for byte (a kill at that moment leaves that one)
    out, hf = str(tmp_path / 'out'), str(tmp_path / 'hf')
    save_run(out, char_data)
    export_hf.main([out, hf, '--tokenizer=none'])
    def contents():
        return {name: open(os.path.join(hf, name), 'rb').read() for name in sorted(os.listdir(hf))}
    earlier = contents()
    seen = []
    write = export_hf.write_export
    def watched(folder, *args, **kwargs):
        result = write(folder, *args, **kwargs)
        seen.append((os.path.realpath(folder) != os.path.realpath(hf), contents() == earlier))
        return result
    monkeypatch.setattr(export_hf, 'write_export', watched)
    state = checkpoint.load_checkpoint(os.path.join(out, 'ckpt-00000003.pt'))
    state['model'] = random_gpt(seed=1, **state['model_args']).state_dict()
    checkpoint.save_checkpoint(out, state, 4, keep_last=3, is_best=False)
    export_hf.main([out, hf, '--tokenizer=none', '--overwrite=True'])
    assert seen == [(True, True)]
    assert contents()['model.safetensors'] != earlier['model.safetensors']  # the newer one is in place
    assert sorted(os.listdir(tmp_path)) == ['chars', 'hf', 'out']  # and nothing else is left


def test_help(capsys):
    export_hf.main(['--help'])
    assert 'usage: python export_hf.py OUT_DIR HF_DIR' in capsys.readouterr().out


# ----------------------------------------------------------------------------- end to end

def model_of(path):
    state = checkpoint.load_checkpoint(path)
    model = GPT(GPTConfig(**dict(state['model_args'], dropout=0.0)))
    model.load_state_dict(state['model'])
    return model.eval()


def test_character_run_end_to_end(tmp_path):
    data = make_char_dataset(str(tmp_path / 'chars'))
    out, hf = str(tmp_path / 'out'), str(tmp_path / 'hf')
    check_ok(run_script('train_sophiag.py', tiny_args(data, out, max_iters=6, eval_interval=3,
                                                      checkpoint_interval=3, lr_decay_iters=6)))
    result = check_ok(run_script('export_hf.py', [out, hf], env=OFFLINE))
    assert 'ckpt-00000006.pt' in result.stdout
    assert 'no tokenizer written' in result.stdout and os.path.join(data, 'meta.pkl') in result.stdout
    assert sorted(os.listdir(hf)) == ['config.json', 'generation_config.json', 'model.safetensors']
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(os.path.join(hf, 'model.safetensors')).st_mode & 0o777 == 0o666 & ~umask  # not 0600
    model = model_of(os.path.join(out, 'ckpt-00000006.pt'))
    assert compare(model, hf, 32) <= TOLERANCE
    assert json.load(open(os.path.join(hf, 'config.json')))['eos_token_id'] is None  # no GPT-2 BPE ids
    # an earlier checkpoint, replacing the export
    result = check_ok(run_script('export_hf.py', [out, hf, '--checkpoint=ckpt-00000003.pt', '--overwrite=True'],
                                 env=OFFLINE))
    earlier = model_of(os.path.join(out, 'ckpt-00000003.pt'))
    assert compare(earlier, hf, 32) <= TOLERANCE and compare(model, hf, 32) > 100 * TOLERANCE
    assert sorted(os.listdir(tmp_path)) == ['chars', 'hf', 'out']  # no temporary folders left


def test_gpt2_bpe_run_end_to_end(gpt2_ranks_file, tmp_path, monkeypatch):
    # a BPE dataset as data/stdlib writes one, minus meta.pkl: the trainer then takes GPT-2 BPE
    # and pads the vocabulary to 50,304
    monkeypatch.setenv('GPT2_RANKS_FILE', gpt2_ranks_file)
    encoding = tokenizer.gpt2_encoding()
    text = ''.join(open(os.path.join(ROOT, name), encoding='utf-8').read()
                   for name in sorted(os.listdir(ROOT)) if name.endswith('.py'))
    ids = np.array(encoding.encode_ordinary(text), dtype=np.uint16)
    data = tmp_path / 'bpe'
    data.mkdir()
    ids[:len(ids) * 9 // 10].tofile(data / 'train.bin')
    ids[len(ids) * 9 // 10:].tofile(data / 'val.bin')
    out, hf = str(tmp_path / 'out'), str(tmp_path / 'hf')
    check_ok(run_script('train_adam.py', tiny_args(str(data), out, sophia=False, max_iters=4, eval_interval=4,
                                                   checkpoint_interval=4, lr_decay_iters=4, bias=True,
                                                   scale_attn_by_inverse_layer_idx=True, gelu='exact')))
    result = check_ok(run_script('export_hf.py', [out, hf], env=dict(OFFLINE, GPT2_RANKS_FILE=gpt2_ranks_file)))
    assert 'ids 50257..50303 are unused padding' in result.stdout
    assert {'model.safetensors', 'config.json', 'tokenizer.json', 'vocab.json', 'merges.txt'} <= set(os.listdir(hf))
    model = model_of(os.path.join(out, 'ckpt-00000004.pt'))
    assert model.config.vocab_size == 50304
    assert compare(model, hf, 32) <= TOLERANCE
    # what lm-evaluation-harness and pipelines call: the Auto classes, from the folder alone
    auto_tokenizer = AutoTokenizer.from_pretrained(hf, local_files_only=True)
    sample = "def export(state):\n    return {'model': state}  # <|endoftext|> café"
    assert auto_tokenizer(sample)['input_ids'] == encoding.encode(sample, allowed_special={'<|endoftext|>'})
    auto_model = AutoModelForCausalLM.from_pretrained(hf, local_files_only=True).eval()
    prompt = auto_tokenizer('def ', return_tensors='pt')['input_ids']
    generated = auto_model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=50256)
    expected = model.generate(prompt, 5, top_k=1)
    assert torch.equal(generated, expected)
    generate = pipeline('text-generation', model=hf)  # as the README shows
    assert generate('def ', max_new_tokens=5, do_sample=False)[0]['generated_text'] == \
        auto_tokenizer.decode(expected[0])
