# A tiny LLaMA that trains in a few minutes on a laptop CPU on the bundled King James Bible, byte-tokenized (vocab 257).
# python train.py configs/tiny.py     # the first run prepares data/kjv_byte from assets/kjv (about a second)

# model shape (~0.86M parameters with the byte vocab)
dim = 128
n_layers = 4
n_heads = 4
ffn_dim = 344

lr = 3e-3
adam_lr = 0.02
max_steps = 300
warmup_steps = 30

seq_len = 128
total_batch_size = 16
batch_size = 8  # 2 micro-steps on 1 process, 1 each on 2 (torchrun --nproc_per_node=2)

eval_every = 50
eval_tokens = 32768
log_every = 10
ckpt_every = 100

data_dir = "data/kjv_byte"  # the bundled sample (assets/kjv/SOURCE.md), prepared on first use
out_dir = "out/tiny"
dtype = "float32"
compile = False
