# Quick start with Muon: the same small character-level GPT on the Python standard library's own
# source code (data/stdlib_char) as config/train_stdlib_char_adam.py, with Muon on the blocks'
# matrices and AdamW on the embeddings, norms and biases, on a CPU in a few minutes.
# Tokens per iteration: 32 batch * 128 block * 1 accumulation = 4,096.
# $ python data/stdlib_char/prepare.py && python train_muon.py config/train_stdlib_char_muon.py

out_dir = 'out-stdlib-char-muon'
wandb_run_name = 'stdlib-char-muon'
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

# muon_adjust_lr_fn='match_rms_adamw' (the default): both parts take AdamW's learning rate
learning_rate = 4e-3  # AdamW's, near the best of study.py's sweep (README)
weight_decay = 0.1
min_lr = 4e-4
max_iters = 1000
lr_decay_iters = 1000
warmup_iters = 100

eval_interval = 200
eval_iters = 20
log_interval = 50
checkpoint_interval = 500
