"""
GPT-2 (OpenAI's paper and code, openai/gpt-2), as nanoGPT writes it: parameter names are nanoGPT's,
so its checkpoints load; from_pretrained() reads OpenAI's weights through Hugging Face transformers.
"""

import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn import functional as F

from sophia import sample_labels

class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # one matmul makes the queries, keys and values of every head: (C) -> (3C)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # mixes the heads' outputs back into the residual stream
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # 1/sqrt(head size); the medium and large Sophia runs also divide layer i's (0-based) logits
        # by i+1: deep layers' logits stay small, for stable mixed-precision training
        self.scale = (config.n_embd // config.n_head) ** -0.5
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1

    def forward(self, x):
        B, T, C = x.size() # batch, time, channels (n_embd)

        # split into q, k, v and give each head its own slice of the channels: heads become a batch dim
        q, k, v  = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) # (B, nh, T, hs)

        # causal self-attention; on GPU its flash or memory-efficient kernels skip the (T, T) matrix
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True, scale=self.scale) # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C) # heads concatenated back into C channels
        y = self.resid_dropout(self.c_proj(y))
        return y

class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc    = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2's tanh GELU ("gelu_new"; its weights need it), as the official runs; nanoGPT: erf
        self.gelu    = nn.GELU(approximate={'tanh': 'tanh', 'exact': 'none'}[config.gelu])
        self.c_proj  = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = self.c_fc(x)    # (B, T, 4 * n_embd)
        x = self.gelu(x)
        x = self.c_proj(x)  # (B, T, n_embd)
        x = self.dropout(x)
        return x

class Block(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        # activation_checkpointing: recompute activations in backward; the state dict is unchanged
        self.checkpointing = False

    def forward(self, x):
        if self.checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304 # 50257 BPE tokens rounded up to a multiple of 64: faster matmuls, unused rows
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True # biases in every Linear and LayerNorm as GPT-2 had; the official Sophia runs drop them
    scale_attn_by_inverse_layer_idx: bool = False # True: layer i's attention logits also scaled by 1/(i+1)
    gelu: str = 'tanh' # 'tanh': GPT-2's approximation (the official Sophia runs); 'exact': erf, as nanoGPT

# a checkpoint's model_args: GPTConfig's fields
MODEL_KEYS = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'dropout',
              'scale_attn_by_inverse_layer_idx', 'gelu')

class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config

        self.transformer = nn.ModuleDict(dict(
            wte = nn.Embedding(config.vocab_size, config.n_embd),
            wpe = nn.Embedding(config.block_size, config.n_embd),
            drop = nn.Dropout(config.dropout),
            h = nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f = nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying as GPT-2: one tensor embeds and unembeds, trains as well (Press & Wolf, 2017)
        self.transformer.wte.weight = self.lm_head.weight

        # N(0, 0.02) for every matmul weight and embedding, zero biases, as GPT-2
        self.apply(self._init_weights)
        # GPT-2 scales the init of the 2 * n_layer residual projections, else the stream's variance
        # grows with their number
        for pn, p in self.named_parameters():
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02/math.sqrt(2 * config.n_layer))

    def get_num_params(self, non_embedding=True):
        """Parameter count. non_embedding leaves out the position embeddings, which do no matmul
        work; the token embedding stays in, since as the tied output layer it does."""
        n_params = sum(p.numel() for p in self.parameters()) # parameters() yields tied tensors once
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, *, all_logits=False, sample_targets=False):
        """ (logits, loss). targets (b, t) give the mean cross-entropy loss; sample_targets=True
        draws them from the model's softmax (Sophia-G's Hessian pass, sophia.sample_labels);
        all_logits=True: every position's logits, no loss; else the last one's (generation). """
        b, t = idx.size()
        assert t <= self.config.block_size, \
            f"Cannot forward sequence of length {t}, block size is only {self.config.block_size}"
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device) # shape (t)

        tok_emb = self.transformer.wte(idx) # token embeddings of shape (b, t, n_embd)
        pos_emb = self.transformer.wpe(pos) # position embeddings of shape (t, n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)

        if targets is not None or all_logits or sample_targets:
            # training, and the Hessian pass, which samples labels at every position
            logits = self.lm_head(x) # (b, t, vocab_size)
        else:
            # generation needs only the next token's logits: skip the (T-1) * vocab_size others
            logits = self.lm_head(x[:, [-1], :]) # (b, 1, vocab_size): the list [-1] keeps the time dim
        loss = None
        if sample_targets:
            targets = sample_labels(logits)
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def crop_block_size(self, block_size):
        # keeps the first block_size position embeddings (a clone: the rest is freed), e.g. to train
        # GPT-2 on shorter sequences; call it before building the optimizer, which would not see wpe
        if block_size > self.config.block_size:
            raise ValueError(f"crop_block_size: {block_size} is larger than the model's block_size "
                             f"{self.config.block_size}; the block size can only shrink")
        self.config.block_size = block_size
        self.transformer.wpe.num_embeddings = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight.detach()[:block_size].clone())

    @classmethod
    def from_pretrained(cls, model_type, override_args=None):
        """A GPT-2 checkpoint from Hugging Face: a hub name or a local save_pretrained directory."""
        override_args = override_args or {}
        if set(override_args) - {'dropout'}:
            raise ValueError(f"from_pretrained: only 'dropout' can be overridden, got {sorted(override_args)}")
        if model_type not in {'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl'} and not os.path.isdir(model_type):
            raise ValueError(f"unknown model {model_type!r}: use gpt2, gpt2-medium, gpt2-large, gpt2-xl "
                             f"or the path of a local Hugging Face GPT-2 directory")
        from transformers import GPT2LMHeadModel # here, so that training from scratch does not need it
        from transformers.utils import logging as hf_logging
        print(f"loading weights from pretrained gpt: {model_type}")
        hf_logging.disable_progress_bar() # its bar on stderr would stand beside an error's one line
        model_hf = GPT2LMHeadModel.from_pretrained(model_type)
        hf = model_hf.config
        # refuse the GPT-2 variants this module does not implement rather than load them silently wrong
        if (hf.activation_function not in ('gelu_new', 'gelu_pytorch_tanh') or not hf.scale_attn_weights
                or hf.n_inner not in (None, 4 * hf.n_embd) or hf.layer_norm_epsilon != 1e-5):
            raise ValueError(f"{model_type}: unsupported GPT-2 variant (needs tanh GELU, n_inner 4*n_embd, "
                             f"scaled attention and layer_norm_epsilon 1e-5)")
        # the architecture comes from the checkpoint's own config; GPT-2 has biases everywhere
        config = GPTConfig(block_size=hf.n_positions, vocab_size=hf.vocab_size, n_layer=hf.n_layer,
                           n_head=hf.n_head, n_embd=hf.n_embd, bias=True,
                           dropout=override_args.get('dropout', 0.0), gelu='tanh',
                           scale_attn_by_inverse_layer_idx=hf.scale_attn_by_inverse_layer_idx)
        model = cls(config)
        sd = model.state_dict()

        # every tensor must have a counterpart of the same name and shape; older transformers also
        # store the causal mask as attn.bias / attn.masked_bias buffers, which are no parameters
        sd_hf = {k: v for k, v in model_hf.state_dict().items() if not k.endswith(('.attn.bias', '.attn.masked_bias'))}
        sd_hf.setdefault('lm_head.weight', sd_hf['transformer.wte.weight']) # tied, saved once
        assert sd_hf.keys() == sd.keys(), f"mismatched keys: {sorted(sd_hf.keys() ^ sd.keys())}"
        # transformers keeps GPT-2's projections in its Conv1D layout, (in, out); nn.Linear is (out, in)
        transposed = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
        with torch.no_grad():
            for k, w in sd_hf.items():
                w = w.t() if k.endswith(transposed) else w
                assert w.shape == sd[k].shape, f"{k}: checkpoint {tuple(w.shape)} vs model {tuple(sd[k].shape)}"
                sd[k].copy_(w)
        return model

    def flops_per_token(self):
        """ FLOPs of one forward + backward pass per token, at sequence length block_size """
        # PaLM (arXiv 2204.02311), appendix B: 6N for the matmuls with the weights (2 forward, 4 backward), 12*L*H*Q*T for attention
        N = self.get_num_params()
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd//cfg.n_head, cfg.block_size
        return 6*N + 12*L*H*Q*T

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops):
        """ model flops utilization: achieved FLOP/s / peak_flops, for fwdbwd_per_iter block_size
        sequences forwarded and backwarded in dt seconds; None where peak_flops is None. """
        if peak_flops is None:
            return None
        flops_per_iter = self.flops_per_token() * self.config.block_size * fwdbwd_per_iter
        return flops_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Extend idx (b, t) by max_new_tokens sampled tokens, each conditioned on at most the last
        block_size. Call model.eval() first (dropout); a torch.Generator makes it reproducible."""
        if temperature <= 0:
            raise ValueError(f"generate: temperature must be > 0, got {temperature} (use top_k=1 for greedy)")
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :] / temperature # (b, vocab_size); < 1 sharpens, > 1 flattens
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float('Inf')
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator) # (b, 1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

# Dense peak FLOP/s (NVIDIA datasheets, no 2:4 sparsity) by a fragment of the device name, in
# order: (bf16/fp16, tf32, fp32 without tensor cores); fp32 runs at the tf32 rate only where TF32
# is on (the wrong one misstates MFU 8-15x). H100/H200 NVL: none, datasheets give 835 or 989 bf16.
PEAK_FLOPS = [
    ('a100',          (312e12, 156e12, 19.5e12)),
    ('h100 pcie',     (756e12, 378e12, 51e12)),
    ('h100 nvl',      None),
    ('h100 80gb hbm3', (989e12, 494.5e12, 67e12)), # the SXM module's name
    ('h100 sxm',      (989e12, 494.5e12, 67e12)),
    ('h200 nvl',      None),
    ('h200',          (989e12, 494.5e12, 67e12)), # same compute as the H100 SXM, more memory
]

def peak_flops_for_name(device_name, dtype, tf32):
    """ peak FLOP/s of the CUDA device called device_name computing in dtype, or None if unknown """
    fp32 = 1 if tf32 else 2 # dtype: a torch.dtype, or as the training configs name it
    column = {torch.bfloat16: 0, torch.float16: 0, torch.float32: fp32,
              'bfloat16': 0, 'float16': 0, 'float32': fp32}.get(dtype)
    for fragment, peaks in PEAK_FLOPS:
        if fragment in device_name.lower():
            return None if peaks is None or column is None else peaks[column]
    return None # unknown devices get no MFU rather than a guessed (e.g. A100) peak

def device_peak_flops(device, dtype):
    """ peak FLOP/s for MFU on this device and training dtype; None on CPU or unknown devices """
    device = torch.device(device)
    if device.type != 'cuda':
        return None
    tf32 = torch.backends.cuda.matmul.fp32_precision == 'tf32'
    return peak_flops_for_name(torch.cuda.get_device_name(device), dtype, tf32)
