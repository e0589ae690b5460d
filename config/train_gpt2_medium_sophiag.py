# GPT-2 medium (355M, 24 layers, 16 heads, 1024 wide) on OpenWebText with Sophia-G, the official hyperparameters.
# Tokens per iteration: 480 sequences (total_bs) x 1024 block = 491,520, as the official runs. Each process
# runs gradient_accumulation_steps micro-batches of batch_size, derived here (0): 80 on 1 GPU, 10 on 8.
# With less GPU memory lower batch_size; the official README's lines also work as written, e.g.
# --nproc_per_node=10 --batch_size=8 --gradient_accumulation_steps=6 (nproc x batch x accumulation = 480).
# 100k iterations = 49.2B tokens. Prepare the data first: python data/openwebtext/prepare.py
# Expected: the Sophia paper reports a val loss of about 2.66 (AdamW 2.70) after 100k iterations.
# $ torchrun --standalone --nproc_per_node=8 train_sophiag.py config/train_gpt2_medium_sophiag.py

out_dir = 'out-gpt2-medium-sophiag'
wandb_log = True
wandb_project = 'sophia'
wandb_run_name = 'gpt2-medium-sophiag'

dataset = 'openwebtext'
total_bs = 480
batch_size = 6
gradient_accumulation_steps = 0
block_size = 1024

n_layer = 24
n_head = 16
n_embd = 1024
dropout = 0.0
bias = False
scale_attn_by_inverse_layer_idx = True

learning_rate = 7e-4
weight_decay = 0.2
beta1 = 0.965
beta2 = 0.99
rho = 0.08
hess_interval = 10
grad_clip = 1.0
min_lr = 1e-5

max_iters = 100000
lr_decay_iters = 100000
warmup_iters = 2000
eval_interval = 1000
eval_iters = 200
log_interval = 10
checkpoint_interval = 1000
