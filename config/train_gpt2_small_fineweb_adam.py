# GPT-2 small (124M) on FineWeb-Edu with AdamW, at the settings of llm.c's GPT-2 124M reproduction
# (github.com/karpathy/llm.c discussion #481, "Reproducing GPT-2 (124M) in llm.c in 90 minutes for
# $20"; its command is scripts/run_gpt2_124M.sh): -d 524288 tokens per step, -l 6e-4 peak lr,
# -u 700 warmup steps, -q 0.0 (cosine decay to zero at the last step), -c 0.1 weight decay, AdamW
# betas 0.9/0.95 and gradient clip 1.0 (llm.c's fixed values), 18,865 steps; GPT-2's own model:
# biases, tanh GELU, no attention scaling by layer, dropout 0, vocabulary padded to 50,304.
# Tokens per iteration: 512 sequences (total_bs) x 1024 block = 524,288. Each process runs
# gradient_accumulation_steps micro-batches of batch_size, derived here (0): 32 of 16 on 1 GPU,
# 4 on each of 8 (llm.c: 8 GPUs x 64 sequences, no accumulation); with less GPU memory lower
# batch_size to 8 or 4. 18,865 iterations x 524,288 = 9.89B tokens: llm.c's one pass over its
# FineWeb 10B train shards, about 90 minutes on 8 A100s there.
# Target (llm.c #481, on FineWeb with its first 100M tokens as val): val loss about 3.28 (3.2847 as
# modded-nanogpt quotes that run) and HellaSwag 29.9% acc_norm, against OpenAI's GPT-2 124M at
# 29.4% (29.55% as build-nanogpt scores it, which hellaswag.py follows). FineWeb-Edu's loss is not
# FineWeb's: on this val split OpenAI's GPT-2 124M scores 3.2924 and HellaSwag 29.45%
# (build-nanogpt), the numbers to beat here; for llm.c's own data, prepare.py --corpus=fineweb and
# train with --dataset=fineweb. No run of this size has been made with this repository yet. Left
# different from llm.c: sequences are drawn at random offsets of train.bin, not read once in order.
# $ python data/fineweb/prepare.py
# $ torchrun --standalone --nproc_per_node=8 train_adam.py config/train_gpt2_small_fineweb_adam.py
# $ python hellaswag.py --out_dir=out-gpt2-small-fineweb-adam --device=cuda --dtype=bfloat16

out_dir = 'out-gpt2-small-fineweb-adam'
wandb_log = True
wandb_project = 'sophia'
wandb_run_name = 'gpt2-small-fineweb-adam'

dataset = 'fineweb_edu'
total_bs = 512
batch_size = 16
gradient_accumulation_steps = 0
block_size = 1024

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = True
scale_attn_by_inverse_layer_idx = False

learning_rate = 6e-4
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
min_lr = 0.0  # llm.c's -q 0.0: the cosine ends at zero

max_iters = 18865
lr_decay_iters = 18865
warmup_iters = 700
eval_interval = 250  # llm.c's -v 250
eval_iters = 80  # 80 x 16 x 1024 = 1.3M val tokens per process, llm.c's 20 batches of 64 x 1024
hellaswag = True  # llm.c's -h 1: HellaSwag's 10,042 items at every evaluation, split over the processes
log_interval = 10
checkpoint_interval = 1000
