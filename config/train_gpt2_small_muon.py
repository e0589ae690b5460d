# GPT-2 small (124M, 12 layers, 12 heads, 768 wide) on OpenWebText with Muon on the transformer blocks'
# weight matrices and AdamW on the embeddings (tied with the output layer), norms and biases.
# Tokens per iteration: 480 sequences (total_bs) x 1024 block = 491,520, as the official Sophia and
# AdamW runs, so the three curves are comparable step for step. Each process runs
# gradient_accumulation_steps micro-batches of batch_size, derived here (0): 40 on 1 GPU, 5 on 8.
# Hyperparameters: AdamW's official ones for both parts (lr 6e-4, weight decay 0.1, betas 0.9/0.95,
# min_lr 3e-5), which muon_adjust_lr_fn='match_rms_adamw' carries over to Muon (PyTorch's Muon
# documentation; Moonshot, arXiv 2502.16982); momentum 0.95, Nesterov, 5 Newton-Schulz steps as
# modded-nanogpt's records. No run of this config has been made with this repository yet.
# Expected from the literature: Muon needs ~1.35-1.5x fewer tokens than AdamW to the same loss at 124M.
# Prepare the data first: python data/openwebtext/prepare.py. DDP only (--data_parallel=ddp).
# $ torchrun --standalone --nproc_per_node=8 train_muon.py config/train_gpt2_small_muon.py

out_dir = 'out-gpt2-small-muon'
wandb_log = True
wandb_project = 'sophia'
wandb_run_name = 'gpt2-small-muon'

dataset = 'openwebtext'
total_bs = 480
batch_size = 12
gradient_accumulation_steps = 0
block_size = 1024

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False
scale_attn_by_inverse_layer_idx = True

learning_rate = 6e-4
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
min_lr = 3e-5
muon_momentum = 0.95
muon_nesterov = True
muon_ns_steps = 5
muon_adjust_lr_fn = 'match_rms_adamw'

max_iters = 100000
lr_decay_iters = 100000
warmup_iters = 2000
eval_interval = 1000
eval_iters = 200
log_interval = 10
checkpoint_interval = 1000
