# Quick start: a small character-level GPT on the Python standard library's own source code
# (data/stdlib_char, prepared offline in seconds), with Sophia-G, on a CPU in a few minutes.
# Tokens per iteration: 32 batch * 128 block * 1 accumulation = 4,096.
# $ python data/stdlib_char/prepare.py && python train_sophiag.py config/train_stdlib_char_sophiag.py

out_dir = 'out-stdlib-char-sophiag'
wandb_run_name = 'stdlib-char-sophiag'
dataset = 'stdlib_char'
device = 'cpu'
dtype = 'float32'
compile = False

batch_size = 32
block_size = 128
gradient_accumulation_steps = 1

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

# study.py found Sophia-G's best learning rate on this corpus far below AdamW's (README)
learning_rate = 3e-4
weight_decay = 0.2
rho = 0.05
hess_interval = 10
min_lr = 3e-5
max_iters = 1000
lr_decay_iters = 1000
warmup_iters = 100

eval_interval = 200
eval_iters = 20
log_interval = 50
checkpoint_interval = 500
