# GPT-2 small (124M, 12 layers, 12 heads, 768 wide) on OpenWebText with AdamW, the official baseline hyperparameters.
# Tokens per iteration: 480 sequences (total_bs) x 1024 block = 491,520, as the official runs. Each process
# runs gradient_accumulation_steps micro-batches of batch_size, derived here (0): 40 on 1 GPU, 5 on 8.
# With less GPU memory lower batch_size; the official README's lines also work as written, e.g.
# --nproc_per_node=10 --batch_size=8 --gradient_accumulation_steps=6 (nproc x batch x accumulation = 480).
# 100k iterations = 49.2B tokens. Prepare the data first: python data/openwebtext/prepare.py
# Expected: the Sophia paper's AdamW reaches about 2.93 after 100k iterations; a tuned AdamW has been reported at 2.87.
# $ torchrun --standalone --nproc_per_node=8 train_adam.py config/train_gpt2_small_adam.py

out_dir = 'out-gpt2-small-adam'
wandb_log = True
wandb_project = 'sophia'
wandb_run_name = 'gpt2-small-adam'

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

max_iters = 100000
lr_decay_iters = 100000
warmup_iters = 2000
eval_interval = 1000
eval_iters = 200
log_interval = 10
checkpoint_interval = 1000
