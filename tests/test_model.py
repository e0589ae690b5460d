"""Tests of model.py on tiny GPTs, CPU only, fp32."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPT, GPTConfig, device_peak_flops, peak_flops_for_name  # noqa: E402
from sophia import sample_labels  # noqa: E402
from configurator import batch_plan  # noqa: E402
from optimizers import AdamWRecipe, MuonRecipe, SophiaGRecipe  # noqa: E402

TINY = dict(block_size=16, vocab_size=97, n_layer=2, n_head=2, n_embd=32)


def tiny_gpt(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


def random_tokens(b, t, vocab=TINY['vocab_size'], seed=1):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def test_shapes_and_loss_at_init():
    model = tiny_gpt()
    idx, targets = random_tokens(3, 16), random_tokens(3, 16, seed=2)
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, TINY['vocab_size'])
    # small init -> near-uniform predictions -> cross-entropy near ln(vocab)
    assert abs(loss.item() - math.log(TINY['vocab_size'])) < 0.1
    # ignore_index=-1: masked positions do not count towards the mean
    masked = targets.clone()
    masked[:, 8:] = -1
    _, loss_masked = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[:, :8].reshape(-1, logits.size(-1)), targets[:, :8].reshape(-1))
    torch.testing.assert_close(loss_masked, expected)


def test_forward_without_targets_and_all_logits():
    model = tiny_gpt()
    idx = random_tokens(2, 10)
    last, loss = model(idx)
    assert loss is None and last.shape == (2, 1, TINY['vocab_size'])
    full, loss = model(idx, all_logits=True)
    assert loss is None and full.shape == (2, 10, TINY['vocab_size'])
    torch.testing.assert_close(full[:, -1:], last)
    with_targets, _ = model(idx, random_tokens(2, 10, seed=3))
    torch.testing.assert_close(with_targets, full)


@pytest.mark.parametrize('vocab', [6, 97, 100])  # 2 chunks of 3, one chunk (a prime), 10 of 10
def test_sample_labels_follows_the_softmax(vocab):
    """The frequencies over many rows match softmax(logits) within 5 standard errors per entry;
    an entry 40 nats below the others is never drawn."""
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(vocab)) * 1.5
    logits[vocab // 2] = -40.0
    n = 200_000
    torch.manual_seed(0)
    draws = sample_labels(logits.expand(n, -1))
    assert draws.shape == (n,) and draws.dtype == torch.long
    counts = torch.bincount(draws, minlength=vocab).double()
    assert len(counts) == vocab
    p = torch.softmax(logits.double(), dim=0)
    assert counts[vocab // 2] == 0
    assert ((counts / n - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12).all(), (counts / n, p)
    # batch shapes are kept: (2, 3, V) -> (2, 3)
    assert sample_labels(logits.expand(2, 3, -1)).shape == (2, 3)

def test_sample_labels_upcasts_bf16():
    logits = torch.tensor([2.0, 0.5, 0.0, -1.0, 1.0, -40.0])
    torch.manual_seed(1)
    a = sample_labels(logits.bfloat16().expand(1000, -1))
    torch.manual_seed(1)
    b = sample_labels(logits.bfloat16().float().expand(1000, -1))
    assert torch.equal(a, b)


def test_sample_targets_is_the_loss_against_drawn_labels():
    model = tiny_gpt()
    idx = random_tokens(2, 10)
    logits = model(idx, all_logits=True)[0]
    torch.manual_seed(3)
    sampled_logits, loss = model(idx, sample_targets=True)
    torch.manual_seed(3)
    labels = sample_labels(logits)
    torch.testing.assert_close(sampled_logits, logits)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits.reshape(-1, TINY['vocab_size']),
                                                                       labels.reshape(-1)))
    loss.backward()  # a gradient flows through the logits, none through the draw
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_sequence_longer_than_block_size_is_refused():
    model = tiny_gpt()
    with pytest.raises(AssertionError, match="block size is only 16"):
        model(random_tokens(1, 17))


def test_weight_tying_and_init():
    model = tiny_gpt(n_layer=4)
    assert model.lm_head.weight is model.transformer.wte.weight
    sd = model.state_dict()
    assert sd['lm_head.weight'].data_ptr() == sd['transformer.wte.weight'].data_ptr()
    # residual projections get the 1/sqrt(2 * n_layer) scaled init, other matmuls 0.02
    c_proj_std = torch.cat([b.attn.c_proj.weight.flatten() for b in model.transformer.h]).std().item()
    assert abs(c_proj_std - 0.02 / math.sqrt(8)) < 0.002
    assert abs(model.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 0.002
    assert all(torch.all(b.attn.c_attn.bias == 0) for b in model.transformer.h)
    # nanoGPT checkpoint layout
    for key in ['transformer.wte.weight', 'transformer.wpe.weight', 'transformer.h.1.ln_1.weight',
                'transformer.h.1.attn.c_attn.weight', 'transformer.h.1.attn.c_proj.bias',
                'transformer.h.1.ln_2.bias', 'transformer.h.1.mlp.c_fc.weight',
                'transformer.h.1.mlp.c_proj.weight', 'transformer.ln_f.weight', 'lm_head.weight']:
        assert key in sd, key
    # without bias: no bias tensors at all
    assert not any(k.endswith('bias') for k in tiny_gpt(bias=False).state_dict())


def test_num_params():
    model = tiny_gpt()
    unique = {id(p): p.numel() for p in model.parameters()}
    assert model.get_num_params(non_embedding=False) == sum(unique.values())
    assert model.get_num_params() == sum(unique.values()) - 16 * 32  # minus wpe


def test_causality():
    model = tiny_gpt()
    idx = random_tokens(2, 12)
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % TINY['vocab_size']
    a, _ = model(idx, all_logits=True)
    b, _ = model(changed, all_logits=True)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert (a[:, 7:] - b[:, 7:]).abs().amax(dim=-1).min() > 0  # every later position sees the change


def test_inverse_layer_idx_scaling_changes_deep_layers_only():
    plain = tiny_gpt(n_layer=1)
    scaled = tiny_gpt(n_layer=1, scale_attn_by_inverse_layer_idx=True)
    idx = random_tokens(2, 8)
    # layer 0 is divided by 1: identical
    torch.testing.assert_close(plain(idx, all_logits=True)[0], scaled(idx, all_logits=True)[0])
    assert scaled.transformer.h[0].attn.scale == plain.transformer.h[0].attn.scale == 16 ** -0.5
    deep = tiny_gpt(n_layer=3, scale_attn_by_inverse_layer_idx=True)
    assert [b.attn.scale for b in deep.transformer.h] == [16 ** -0.5 / (i + 1) for i in range(3)]


GELUS = {  # GPT-2's tanh approximation and the exact erf form, written out
    'tanh': lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3))),
    'exact': lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2))),
}


@pytest.mark.parametrize('gelu', list(GELUS))
def test_mlp_applies_the_configured_gelu(gelu):
    mlp = tiny_gpt(gelu=gelu).transformer.h[0].mlp
    x = torch.randn(2, 8, TINY['n_embd']) * 3
    hidden = mlp.c_fc(x)
    torch.testing.assert_close(mlp(x), mlp.c_proj(GELUS[gelu](hidden)), rtol=1e-5, atol=1e-6)
    other = GELUS['exact' if gelu == 'tanh' else 'tanh']
    assert not torch.allclose(mlp(x), mlp.c_proj(other(hidden)), rtol=1e-5, atol=1e-6)


def test_dropout_only_in_training_mode():
    model = tiny_gpt(dropout=0.5)
    idx = random_tokens(2, 8)
    torch.testing.assert_close(model(idx)[0], model(idx)[0])  # eval: deterministic
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])


def test_crop_block_size():
    model = tiny_gpt()
    idx = random_tokens(2, 8)
    before, _ = model(idx, all_logits=True)
    model.crop_block_size(8)
    assert model.config.block_size == 8 and model.transformer.wpe.weight.shape == (8, 32)
    after, _ = model(idx, all_logits=True)
    torch.testing.assert_close(after, before)
    with pytest.raises(AssertionError, match="block size is only 8"):
        model(random_tokens(2, 9))
    with pytest.raises(ValueError, match="can only shrink"):
        model.crop_block_size(9)


def test_generate():
    model = tiny_gpt()
    idx = random_tokens(2, 5)
    # reproducible with a seeded generator, different with another seed
    out1 = model.generate(idx, 20, top_k=10, generator=torch.Generator().manual_seed(0))
    out2 = model.generate(idx, 20, top_k=10, generator=torch.Generator().manual_seed(0))
    out3 = model.generate(idx, 20, top_k=10, generator=torch.Generator().manual_seed(1))
    assert out1.shape == (2, 25) and torch.equal(out1[:, :5], idx)  # runs past block_size 16
    assert torch.equal(out1, out2) and not torch.equal(out1, out3)
    # top_k=1 is greedy decoding: compare with argmax over the last block_size tokens
    greedy = model.generate(idx, 15, top_k=1, generator=torch.Generator().manual_seed(3))
    expected = idx
    for _ in range(15):
        logits, _ = model(expected[:, -16:], all_logits=True)
        expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, expected)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(idx, 1, temperature=0.0)


def build_optimizer(recipe, model, device_type='cpu', **config):
    """The optimizer a recipe builds for `model`, with its defaults changed by `config`."""
    config = dict(recipe.defaults(), **config)
    return recipe(config, batch_plan(config, {}, world_size=1)).build(model, device_type)


def test_adamw_parameter_groups(capsys):
    model = tiny_gpt()
    model.transformer.h[1].mlp.c_fc.weight.requires_grad_(False)  # frozen tensors are left out
    opt = build_optimizer(AdamWRecipe, model, learning_rate=1e-3, weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults['fused']
    decay, nodecay = opt.param_groups
    assert decay['weight_decay'] == 0.1 and nodecay['weight_decay'] == 0.0
    assert all(p.dim() >= 2 for p in decay['params']) and all(p.dim() < 2 for p in nodecay['params'])
    grouped = [id(p) for g in opt.param_groups for p in g['params']]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(grouped) == len(set(grouped)) == len(trainable) and set(grouped) == trainable
    # wte/lm_head (tied, once), wpe, 2 x (c_attn, attn c_proj, mlp c_proj) + one c_fc
    assert len(decay['params']) == 2 + 2 * 3 + 1
    printed = capsys.readouterr().out
    n_decay = sum(p.numel() for p in decay['params'])
    assert f"num decayed parameter tensors: 9, with {n_decay:,} parameters" in printed
    # one real step works and touches only trainable tensors
    frozen = model.transformer.h[1].mlp.c_fc.weight.clone()
    model.train()
    model(random_tokens(2, 8), random_tokens(2, 8, seed=5))[1].backward()
    opt.step()
    assert torch.equal(model.transformer.h[1].mlp.c_fc.weight, frozen)
    # devices without a fused kernel get foreach
    opt = build_optimizer(AdamWRecipe, model, 'mps')
    assert opt.defaults['foreach'] and not opt.defaults['fused']


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = tiny_gpt()
    opt = build_optimizer(MuonRecipe, model, learning_rate=1e-3, weight_decay=0.1, muon_learning_rate=0.02)
    decay, nodecay, muon = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in muon['params']) == sorted(
        f'transformer.h.{i}.{layer}.weight' for i in range(2)
        for layer in ('attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj'))
    assert sorted(names[id(p)] for p in decay['params']) == ['transformer.wpe.weight', 'transformer.wte.weight']
    assert all(p.dim() == 1 for p in nodecay['params']) and nodecay['weight_decay'] == 0.0
    grouped = [id(p) for g in opt.param_groups for p in g['params']]
    assert len(grouped) == len(set(grouped)) == len(list(model.parameters()))
    assert opt.muon.param_groups == [muon] and opt.adamw.param_groups == [decay, nodecay]
    assert muon['lr_scale'] == pytest.approx(20) and 'lr_scale' not in decay
    assert isinstance(opt.muon, torch.optim.Muon) and opt.adamw.defaults['fused']


def test_sophiag_parameter_groups():
    from sophia import SophiaG
    model = tiny_gpt()
    opt = build_optimizer(SophiaGRecipe, model, learning_rate=6e-4, weight_decay=0.2, rho=0.05)
    assert isinstance(opt, SophiaG)
    assert [g['weight_decay'] for g in opt.param_groups] == [0.2, 0.0]
    assert all(g['rho'] == 0.05 and g['lr'] == 6e-4 for g in opt.param_groups)


def test_flops_and_mfu_hand_computed():
    model = tiny_gpt(n_layer=2, n_head=2, n_embd=8, block_size=4, vocab_size=10)
    # wte 10*8 = 80; per block: ln_1 16, c_attn 8*24+24 = 216, c_proj 64+8 = 72, ln_2 16,
    # c_fc 8*32+32 = 288, mlp c_proj 32*8+8 = 264 -> 872; two blocks 1744; ln_f 16 -> N = 1840
    assert model.get_num_params() == 1840
    # 6N + 12*L*H*Q*T = 11040 + 12*2*2*4*4 = 11808
    assert model.flops_per_token() == 11808
    # 3 sequences of 4 tokens in 0.5 s = 141,696 FLOP in 0.5 s = 283,392 FLOP/s, on a 1e6 FLOP/s device
    assert model.estimate_mfu(3, 0.5, 1e6) == pytest.approx(0.283392)
    assert model.estimate_mfu(3, 0.5, None) is None


@pytest.mark.parametrize("name, dtype, tf32, peak", [
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, False, 312e12),
    ("NVIDIA A100 80GB PCIe", torch.float16, False, 312e12),
    ("NVIDIA A100-SXM4-40GB", torch.float32, True, 156e12),
    ("NVIDIA A100-SXM4-40GB", torch.float32, False, 19.5e12),
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, False, 989e12),
    ("NVIDIA H100 80GB HBM3", 'bfloat16', False, 989e12),
    ("NVIDIA H100 SXM5 80GB", 'float32', True, 494.5e12),
    ("NVIDIA H100 PCIe", torch.bfloat16, False, 756e12),
    ("NVIDIA H100 PCIe", torch.float32, False, 51e12),
    ("NVIDIA H200", torch.bfloat16, False, 989e12),
    ("NVIDIA H100 NVL", torch.bfloat16, False, None),
    ("NVIDIA H200 NVL", torch.bfloat16, False, None),
    ("NVIDIA GeForce RTX 4090", torch.bfloat16, False, None),
    ("NVIDIA A100-SXM4-80GB", torch.float64, False, None),
])
def test_peak_flops_table(name, dtype, tf32, peak):
    assert peak_flops_for_name(name, dtype, tf32) == peak


def test_device_peak_flops_cpu_is_none():
    assert device_peak_flops('cpu', torch.bfloat16) is None
    assert device_peak_flops(torch.device('cpu'), 'float32') is None


def save_random_hf_gpt2(path, scale_attn_by_inverse_layer_idx):
    import transformers
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_positions=32, n_embd=32, n_layer=3, n_head=4, vocab_size=101,
                                     bos_token_id=100, eos_token_id=100,
                                     scale_attn_by_inverse_layer_idx=scale_attn_by_inverse_layer_idx)
    hf = transformers.GPT2LMHeadModel(config).eval()
    # randomise every tensor (biases and LayerNorms too) so that a wrong transpose or copy shows;
    # LayerNorm gains near 1 keep the attention logits large enough for their scaling to matter
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(1.0 if name.endswith(('ln_1.weight', 'ln_2.weight', 'ln_f.weight')) else 0.0, 0.2)
    hf.save_pretrained(path)
    return hf


@pytest.mark.parametrize("scale_attn_by_inverse_layer_idx", [False, True])
def test_from_pretrained_local_matches_hf(tmp_path, scale_attn_by_inverse_layer_idx):
    hf = save_random_hf_gpt2(tmp_path, scale_attn_by_inverse_layer_idx)
    model = GPT.from_pretrained(str(tmp_path)).eval()
    cfg = model.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size, cfg.bias) == (3, 4, 32, 32, 101, True)
    assert cfg.scale_attn_by_inverse_layer_idx == scale_attn_by_inverse_layer_idx
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = random_tokens(2, 32, vocab=101)
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = model(idx, all_logits=True)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    # the comparison is sensitive to the scaling: the other setting does not match
    for block in model.transformer.h[1:]:
        block.attn.scale = 8 ** -0.5 / (1 if scale_attn_by_inverse_layer_idx else 2)
    with torch.no_grad():
        assert (model(idx, all_logits=True)[0] - expected).abs().max() > 1e-3
    # dropout, and only dropout, can be overridden
    assert GPT.from_pretrained(str(tmp_path), dict(dropout=0.1)).config.dropout == 0.1
    with pytest.raises(ValueError, match="only 'dropout'"):
        GPT.from_pretrained(str(tmp_path), dict(n_layer=2))


def test_from_pretrained_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'gpt3'"):
        GPT.from_pretrained('gpt3')
    with pytest.raises(ValueError, match="unknown model"):
        GPT.from_pretrained(str(tmp_path / 'missing'))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_cpu_fp32():
    model = tiny_gpt()
    idx = random_tokens(2, 16)
    expected, _ = model(idx, all_logits=True)
    model.cuda()
    with torch.autocast('cuda', dtype=torch.bfloat16):
        logits, _ = model(idx.cuda(), all_logits=True)
    torch.testing.assert_close(logits.float().cpu(), expected, rtol=0, atol=0.05)
    peak = device_peak_flops('cuda', torch.bfloat16)
    assert peak is None or peak > 1e14


def test_activation_checkpointing_recomputes_each_block_with_the_same_gradients(monkeypatch):
    """A block with checkpointing runs its forward again in backward (one more call per block)
    and gives the same gradients, bit for bit; without grad it runs once."""
    from model import Block
    calls = []
    forward = Block._forward
    monkeypatch.setattr(Block, '_forward', lambda self, x: (calls.append(self), forward(self, x))[1])
    idx, targets = random_tokens(2, 10), random_tokens(2, 10, seed=3)
    grads = {}
    for checkpointing in (False, True):
        model = tiny_gpt()
        for block in model.transformer.h:
            block.checkpointing = checkpointing
        calls.clear()
        model(idx, targets)[1].backward()
        assert len(calls) == len(model.transformer.h) * (2 if checkpointing else 1)
        grads[checkpointing] = [p.grad.clone() for p in model.parameters()]
        calls.clear()
        with torch.no_grad():
            model(idx, targets)
        assert len(calls) == len(model.transformer.h)
    assert all(torch.equal(a, b) for a, b in zip(grads[False], grads[True]))
