# GPT-2 medium (355M, 24 layers, 16 heads, 1024 wide) on OpenWebText with AdamW, the official baseline hyperparameters.
# Tokens per iteration: 480 sequences (total_bs) x 1024 block = 491,520, as the official runs. Each process
# runs gradient_accumulation_steps micro-batches of batch_size, derived here (0): 80 on 1 GPU, 10 on 8.
# With less GPU memory lower batch_size; the official README's lines also work as written, e.g.
# --nproc_per_node=10 --batch_size=8 --gradient_accumulation_steps=6 (nproc x batch x accumulation = 480).
# 100k iterations = 49.2B tokens. Prepare the data first: python data/openwebtext/prepare.py
# Expected: the Sophia paper's AdamW reaches about 2.70 after 100k iterations.
# $ torchrun --standalone --nproc_per_node=8 train_adam.py config/train_gpt2_medium_adam.py

out_dir = 'out-gpt2-medium-adam'
wandb_log = True
wandb_project = 'sophia'
wandb_run_name = 'gpt2-medium-adam'

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

learning_rate = 3e-4
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
min_lr = 6e-5

max_iters = 100000
lr_decay_iters = 100000
warmup_iters = 2000
eval_interval = 1000
eval_iters = 200
log_interval = 10
checkpoint_interval = 1000
