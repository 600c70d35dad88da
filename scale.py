"""SCALE: Stochastic Column-normAlized Last-layer momEntum (Glentis, Li, Han, Hong; arXiv 2506.16659, Algorithm 1).

Every parameter has a role, and every role ends with p <- p * (1 - lr*wd) - lr * u:
  matrix     u = G / rms(G, dim=1)                             each output unit's gradient row; no state
  embedding  u = G / rms(G, dim=0)                             each embedding dim, over the vocabulary; no state
  output     m = beta*m + (1-beta)*G, u = m / rms(m, dim=1)    the one momentum buffer: the last layer
  vector     AdamW at lr = adam_lr * lr_t / lr_0               1-D norm gains and biases
where rms(x, dim) = max(sqrt(mean(x^2 over dim)), 1e-8) and tensors of 3+ dims are viewed as (shape[0], -1).
PyTorch's weights are (out, in), so the paper's "columns" are rows here. Ablations: momentum=0 (column-normalized
SGD); momentum_roles=("matrix", "embedding", "output") (momentum everywhere).
"""
import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

ROLES = {"matrix": 1, "embedding": 0, "output": 1, "vector": None}  # each role's dim that rms(G, dim) reduces


class SCALE(torch.optim.Optimizer):
    """params: groups with a "role" each (scale_param_groups), a group's tensors on one device. The update runs in
    fp32 and rounds p once: to nearest, or with bf16_rounding="stochastic" unbiased, by bits seeded from (seed, step),
    alike on DDP ranks and after a resume. FSDP2: each rank updates its shards, which must hold whole norms."""

    def __init__(self, params, lr=1e-3, momentum=0.9, weight_decay=0.0, adam_lr=None, adam_betas=(0.9, 0.999),
                 adam_eps=1e-8, momentum_roles=("output",), compile=False, bf16_rounding="nearest", seed=0):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(f"lr ({lr}), weight_decay ({weight_decay}) must be >= 0, momentum ({momentum}) in [0, 1)")
        if not set(momentum_roles) <= {"matrix", "embedding", "output"}:
            raise ValueError(f"momentum_roles must be among matrix, embedding, output; got {tuple(momentum_roles)}")
        if bf16_rounding not in ("nearest", "stochastic"):
            raise ValueError(f"bf16_rounding must be 'nearest' or 'stochastic', got {bf16_rounding!r}")
        super().__init__(params, dict(lr=lr, lr0=lr, momentum=momentum, weight_decay=weight_decay, seed=seed,
                                      momentum_roles=tuple(momentum_roles), adam_lr=lr if adam_lr is None else adam_lr,
                                      adam_betas=tuple(adam_betas), adam_eps=adam_eps, bf16_rounding=bf16_rounding))
        maybe_compile = (lambda f: torch.compile(f, dynamic=False)) if compile else (lambda f: f)
        self._normalized_update, self._adamw_update = maybe_compile(normalized_update_), maybe_compile(adamw_update_)
        self._scalars = {}  # {key: {name: 0-D fp32 tensor}}, see _fill

    def add_param_group(self, group):
        params = [group["params"]] if torch.is_tensor(group["params"]) else list(group["params"])
        if group.get("role") not in ROLES or group["role"] != "vector" and any(p.ndim < 2 for p in params):
            raise ValueError(f"a group needs a role ({'/'.join(ROLES)}; 1-D: 'vector'): use scale_param_groups(model)")
        super().add_param_group({**group, "params": params})

    @torch.no_grad()
    def step(self, closure=None):
        with torch.enable_grad():
            loss = closure() if closure is not None else None
        for i, group in enumerate(self.param_groups):
            params, dim = [p for p in group["params"] if p.grad is not None], ROLES[group["role"]]
            for p in params:
                if p.grad.is_sparse or p.grad.is_complex():
                    raise ValueError("SCALE does not support sparse or complex gradients; use dense real params")
                if dim is not None and any(s.is_shard() and s.dim != 1 - dim for s in getattr(p, "placements", ())):
                    raise ValueError(f"{group['role']} norms span dim {dim}: shard dim {1 - dim}, not {p.placements}")
            if params:
                (self._adamw_step if dim is None else self._normalized_step)(i, group, params)
        return loss

    def _normalized_step(self, i, group, params):
        lr, beta, device = group["lr"], group["momentum"], params[0].device
        momentum = beta > 0 and group["role"] in group["momentum_roles"]
        for p in params if momentum else []:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        bufs = [self.state[p]["momentum_buffer"] for p in params] if momentum else []
        bf16 = [p for p in params if p.dtype == torch.bfloat16 and group["bf16_rounding"] == "stochastic"]
        for p in bf16:
            self.state[p]["step"] = self.state[p].get("step", 0) + 1
        scalars = self._fill(i, device, lr=lr, decay=1 - lr * group["weight_decay"], one_minus_beta=1 - beta)
        generator = torch.cuda.default_generators[device.index] if device.type == "cuda" else torch.default_generator
        shard = params[0].device_mesh.get_coordinate() if isinstance(params[0], DTensor) else []  # FSDP: a rank's bits
        with torch.random.fork_rng([device] if device.type == "cuda" else []):
            generator.manual_seed(hash((group["seed"], i, *shard, *(self.state[p]["step"] for p in bf16))))
            self._normalized_update(local([p, p.grad] for p in params), local(bufs), ROLES[group["role"]],
                                    bool(bf16), **scalars)

    def _adamw_step(self, i, group, params):
        lr = group["adam_lr"] * group["lr"] / group["lr0"] if group["lr0"] else 0.0  # follows lr's schedule
        (beta1, beta2), device, step_sizes = group["adam_betas"], params[0].device, []
        for p in params:
            state = self.state[p]
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1  # each p's own bias correction: one skipped at a step (grad None) lags behind
            step_size = lr * (1 - beta2 ** state["step"]) ** 0.5 / (1 - beta1 ** state["step"])
            step_sizes.append(self._fill(p, device, step_size=step_size)["step_size"])
        scalars = self._fill(i, device, decay=1 - lr * group["weight_decay"], one_minus_beta1=1 - beta1,
                             one_minus_beta2=1 - beta2, eps=group["adam_eps"])
        tensors = local([p, p.grad, self.state[p]["exp_avg"], self.state[p]["exp_avg_sq"]] for p in params)
        self._adamw_update(tensors, step_sizes=step_sizes, **scalars)

    def _fill(self, key, device, **values):
        """{name: 0-D fp32 tensor}, made once per (key, device) and filled in place: no recompile as lr changes."""
        if (key, device) not in self._scalars:
            self._scalars[key, device] = {name: torch.empty((), device=device) for name in values}
        return {name: t.fill_(values[name]) for name, t in self._scalars[key, device].items()}


def normalized_update_(tensors, bufs, dim: int, stochastic: bool, lr, decay, one_minus_beta):
    """For each (p, G) of tensors (and m of bufs, if any: G <- m <- beta*m + (1-beta)*G), in place:
    p <- p * decay - lr * G / rms(G, dim), in fp32, rounded into p once."""
    factors = []
    for k, (p, g) in enumerate(tensors):
        g = (ema_(bufs[k], g, one_minus_beta) if bufs else g.float()).flatten(1)
        factors.append(lr / g.square().mean(dim, keepdim=True).sqrt().clamp_min(1e-8))
        new = (p.float().flatten(1) * decay - g * factors[-1]).view(p.shape)
        p.copy_(round_stochastic(new) if stochastic and p.dtype == torch.bfloat16 else new)
    return factors  # returned, so inductor's CPU outer-loop fusion (torch 2.13) does not crash on the output role


def adamw_update_(tensors, step_sizes, decay, one_minus_beta1, one_minus_beta2, eps):
    """AdamW in place on each (p, g, m, v) of tensors, with eps added before the bias correction in step_sizes."""
    for (p, g, m, v), step_size in zip(tensors, step_sizes):
        m, v = ema_(m, g, one_minus_beta1), ema_(v, g.float().square(), one_minus_beta2)
        p.copy_(p.float() * decay - step_size * m / (v.sqrt() + eps))


def ema_(m, x, one_minus_beta):
    """m <- beta*m + (1-beta)*x in fp32, rounded into m once -> the fp32 new m (so eager and compiled read alike)."""
    new = m.float().lerp_(x.float(), one_minus_beta)
    m.copy_(new)
    return new


def round_stochastic(x):
    """fp32 x -> bf16, unbiased: 16 random bits added to x's bit pattern, then cut, round x up in magnitude with
    probability (its low 16 bits) / 2^16. A bf16 value (low bits zero) is unchanged."""
    bits = torch.randint_like(x, 1 << 16, dtype=torch.int32)
    return ((x.view(torch.int32) + bits) & -(1 << 16)).view(torch.float32).to(torch.bfloat16)


def local(tensors):
    """Nested lists of tensors with each DTensor (an FSDP2 param, grad or state) replaced by its local shard."""
    return [local(t) if isinstance(t, list) else t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def scale_param_groups(model, output=None):
    """Param groups by role, from the model's structure: the weight of `output` (default: model.lm_head, even if tied)
    'output', nn.Embedding weights 'embedding', other tensors of 2+ dims 'matrix', the rest 'vector'."""
    output = getattr(model, "lm_head", None) if output is None else output
    if getattr(output, "weight", None) is None:
        raise ValueError("cannot find the output layer: the model has no lm_head; pass output=<the output module>")
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups = {role: [] for role in ROLES}
    for p in model.parameters():  # each shared parameter once
        role = "matrix" if p.ndim >= 2 else "vector"
        role = "output" if p is output.weight else "embedding" if id(p) in embeddings else role
        groups[role].append(p)
    return [{"params": ps, "role": role} for role, ps in groups.items() if ps]
