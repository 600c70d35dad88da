# LLaMA-130M on C4 with SCALE, the paper's recipe (arXiv 2506.16659); the rest is train.py's defaults.
# python train.py configs/llama_130m.py   (vocab size comes from data_dir/meta.json)
dim = 768
n_layers = 12
n_heads = 12
ffn_dim = 2048

lr = 1e-3
adam_lr = 0.02  # the paper's scripts leave adam_lr at its default 0.02 for 60M-350M; kept as is
max_steps = 20000
warmup_steps = 2000  # 10%
batch_size = 64  # per GPU; 512 sequences a step on 1, 2, 4 or 8 GPUs, accumulating the rest (raise it on fewer GPUs)

out_dir = "out/llama_130m"
