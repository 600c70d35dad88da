"""A compact LLaMA, the network trained in the SCALE paper (arXiv 2506.16659).

Pre-norm blocks: RMSNorm -> causal self-attention with rotary embeddings -> residual,
RMSNorm -> SwiGLU MLP -> residual; final RMSNorm; untied lm_head. No biases, no dropout.
Numerically the same as transformers.LlamaForCausalLM with the same config (test_model.py checks).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


LOSS_CHUNKS = 4  # the backward of the output layer and the loss runs in this many chunks of tokens (see below)

# dense bf16 FLOP/s of known GPUs, for MFU; the first key found in the device name wins
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device_name):
    """The GPU's dense bf16 FLOP/s, or None for a device not in the table (we report no MFU rather than guess)."""
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in device_name), None)


SHAPE = ("dim", "n_layers", "n_heads", "ffn_dim")  # the run config's keys that set the model's shape


@dataclass
class LLaMAConfig:
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    ffn_dim: int = 1376
    vocab_size: int = 32000
    max_seq_len: int = 2048
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self):  # config.py checks that each is positive
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}); change dim or n_heads")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head dim dim/n_heads = {self.dim // self.n_heads} must be even for rotary embeddings; "
                             "change dim or n_heads")

    @classmethod
    def from_config(cls, cfg, vocab_size):
        """The model of a run config (a mapping with the SHAPE keys and seq_len, e.g. vars(config.load_config(...)))
        with this vocabulary; its rotary tables cover seq_len positions."""
        return cls(**{key: cfg[key] for key in SHAPE}, vocab_size=vocab_size, max_seq_len=cfg["seq_len"])


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalize in fp32 (as HF LlamaRMSNorm), cast back, then scale by the gain in x's dtype: an fp32 gain
        # (train.py's bf16 runs keep 1-D params fp32) does not promote bf16 activations to fp32
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(x.dtype) * x32.to(x.dtype)


def rope_cos_sin(head_dim, max_seq_len, theta):
    """cos/sin tables (max_seq_len, head_dim), frequencies repeated for the rotate-half convention."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    # rotate-half: pairs are (i, i + head_dim/2), as in HF Llama (not interleaved as in Meta's code)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.dim // cfg.n_heads
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class LinearCrossEntropy(torch.autograd.Function):
    """logits = h @ weight.T and their mean cross-entropy in fp32, as F.linear then F.cross_entropy (no ignore_index).
    The backward computes the logits' gradient, (softmax(logits) - onehot(targets)) / N, in LOSS_CHUNKS chunks of
    tokens, each used at once by the two matmuls, so the (N, V) fp32 gradient never exists whole."""

    @staticmethod
    def forward(ctx, h, weight, targets):
        logits = h @ weight.t()
        lse = torch.logsumexp(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # >= fp32
        loss = lse.mean() - logits.gather(1, targets[:, None]).to(lse.dtype).mean()
        ctx.save_for_backward(h, weight, logits, lse, targets)
        ctx.mark_non_differentiable(logits)
        ctx.set_materialize_grads(False)  # the logits get no gradient: no (N, V) zeros for it
        return logits, loss

    @staticmethod
    def backward(ctx, _, grad):
        h, weight, logits, lse, targets = ctx.saved_tensors
        scale = grad / len(targets)
        dh, dweight = [], torch.zeros_like(weight, dtype=lse.dtype)
        rows = -(-len(targets) // LOSS_CHUNKS)  # slices, not .chunk(): with split, inductor runs all chunks' exp
        # kernels before their matmuls, and no chunk buffer is reused
        for i in range(0, len(targets), rows):
            chunk = slice(i, i + rows)
            dlogits = (logits[chunk].to(lse.dtype) - lse[chunk, None]).exp_().mul_(scale)  # in place: one buffer
            dlogits[torch.arange(dlogits.shape[0], device=targets.device), targets[chunk]] -= scale
            dlogits = dlogits.to(h.dtype)
            dh.append(dlogits @ weight)
            dweight += dlogits.t() @ h[chunk]
        return torch.cat(dh), dweight.to(weight.dtype), None


class LLaMA(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_cos_sin(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        # not saved in checkpoints (a function of the config); cast to the activation dtype at use,
        # so a bf16 copy of the table gives exactly what HF's fp32-computed-then-cast tables give
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        for m in self.modules():  # the paper's code (HF Llama init): Linear/Embedding weights N(0, 0.02), gains 1
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}; use shorter "
                             "sequences or raise max_seq_len")
        x = self.tok_embeddings(idx)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x), None
        if self.lm_head.bias is not None:  # the fused loss below uses lm_head.weight alone
            raise ValueError("lm_head has a bias, which the training loss would ignore; use bias=False or add the bias "
                             "in LinearCrossEntropy")
        logits, loss = LinearCrossEntropy.apply(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1))
        return logits.view(B, T, -1), loss  # logits without grad: only the loss is differentiable

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6 per parameter-multiply (fwd + bwd), embedding lookup excluded,
        plus attention scores and weighted sum (PaLM appendix B: 6 * n_layers * 2 * dim * seq_len,
        counted over the full T x T square, i.e. not halved for causality)."""
        cfg = self.config
        n_matmul = self.num_params() - self.tok_embeddings.weight.numel()
        return 6 * n_matmul + 12 * cfg.n_layers * cfg.dim * seq_len
