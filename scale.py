"""SCALE: Stochastic Column-normAlized Last-layer momEntum (Glentis, Li, Han, Hong; arXiv 2506.16659).

Every parameter has a role, and every role ends with p <- p * (1 - lr*wd) - lr * u:
  matrix     u = G / rms(G, dim=1)                  each output unit's gradient row gets unit RMS; no state
  embedding  u = G / rms(G, dim=0)                  each embedding dim normalized over the vocabulary; no state
  output     m = beta*m + (1-beta)*G, u = m / rms(m, dim=1)        the one momentum buffer: the last layer
  vector     AdamW with bias correction (1-D norm gains, biases), at lr = adam_lr * lr_t / lr_0
where rms(x, dim) = max(sqrt(mean(x^2 over dim)), 1e-8), tensors of more than 2 dims are viewed as
(shape[0], -1), lr_t is the group's current lr and lr_0 the lr given to the constructor. Ablations:
momentum=0 is column-normalized SGD; momentum_roles=("matrix", "embedding", "output") puts momentum everywhere.
compile=True runs each role's update as one torch.compile'd graph (static shapes, lr passed as a tensor so a
schedule never recompiles): the fast path. Eager is the same code, readable and slower (bench.py optimizer).
"""
import torch
import torch.nn as nn

ROLES = ("matrix", "embedding", "output", "vector")
NORM_DIM = {"matrix": 1, "embedding": 0, "output": 1}
BLOCK_BYTES = 2 ** 21  # of the blocks a large tensor is updated in, on CPU (see blocks)


def normalized_update_(params, grads, bufs, h, dim: int):
    """In place, for each p, g (and momentum buffer m, when bufs is not empty: m <- lerp(m, g, 1 - beta), then
    g is m): p <- p*(1 - lr*wd) - lr * g / rms(g, dim), reducing and dividing in fp32.
    h = [lr, 1 - lr*wd, 1 - beta] as an fp32 tensor, so a compiled update does not recompile when lr changes.
    Returns the factors lr / rms(g): as outputs, inductor computes each once per row (or column) instead of
    once per vector of elements, which makes the compiled bf16 step ~15% faster on CPU."""
    lr, decay, one_minus_beta = h.unbind()
    if bufs:
        grads = [m.lerp_(g, one_minus_beta) for m, g in zip(bufs, grads)]  # m = beta*m + (1-beta)*g
    scales = []
    for p, g in zip(params, grads):
        p, g = p.view(p.shape[0], -1), g.reshape(g.shape[0], -1).float()
        scales.append(lr / rms(g, dim))
        # fp32 p: p.float() is p, so this runs in place and eager mode makes no temporaries; bf16 p: one
        # fp32 copy, rounded once into p
        p.copy_(p.float().mul_(decay).addcmul_(g, scales[-1], value=-1))
    return scales


def blocks(t, dim: int):
    """[t], or on CPU, for row norms (dim=1), a t of 2 * BLOCK_BYTES or more as blocks of whole rows of about
    BLOCK_BYTES, so that the update's second read of each block (and of the momentum just written) comes from
    cache, not memory. (Split by columns, the embedding compiles to slow strided kernels: not done.)"""
    n_blocks = t.numel() * t.element_size() // BLOCK_BYTES if dim == 1 and t.device.type == "cpu" else 1
    return [t] if n_blocks < 2 else t.view(t.shape[0], -1).split(-(-t.shape[0] // n_blocks))


def rms(g, dim: int):
    """max(sqrt(mean(g^2 over dim)), 1e-8) of a 2-D g, keepdim."""
    if dim == 1:  # vector_norm: one pass and, in eager mode, no (N, D) temporary
        return (torch.linalg.vector_norm(g, dim=1, keepdim=True) / g.shape[1] ** 0.5).clamp_min(1e-8)
    # over rows: sum blocks of 64 rows first, which inductor's CPU code runs 2x faster than a plain column sum
    k = g.shape[0] - g.shape[0] % 64
    sq = g[:k].view(-1, 64, g.shape[1]).square().sum(1).sum(0, keepdim=True) + g[k:].square().sum(0, keepdim=True)
    return (sq / g.shape[0]).sqrt().clamp_min(1e-8)


def adamw_update_(params, grads, exp_avgs, exp_avg_sqs, h):
    """In place, AdamW on each p. Row i of h = [1 - lr*wd, 1 - beta1, 1 - beta2, eps, lr*sqrt(bc2)/bc1] for p i
    (1 - beta computed in float64: 1 - fp32(0.999) is 1.3e-5 off)."""
    for p, g, m, v, (decay, one_minus_beta1, one_minus_beta2, eps, step_size) in zip(params, grads, exp_avgs,
                                                                                    exp_avg_sqs, h):
        m.lerp_(g, one_minus_beta1)  # m = beta1*m + (1-beta1)*g
        v.lerp_(g.square(), one_minus_beta2)
        p.copy_(p.float() * decay - step_size * m.float() / (v.float().sqrt() + eps))  # eps before bias correction


class SCALE(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, momentum=0.9, weight_decay=0.0, adam_lr=None, adam_betas=(0.9, 0.999),
                 adam_eps=1e-8, momentum_roles=("output",), compile=False):
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"lr ({lr}) and weight_decay ({weight_decay}) must be >= 0")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not set(momentum_roles) <= set(NORM_DIM):
            raise ValueError(f"momentum_roles {tuple(momentum_roles)} must be among {tuple(NORM_DIM)} "
                             "(vector params always use AdamW)")
        defaults = dict(lr=lr, lr0=lr, momentum=momentum, weight_decay=weight_decay, momentum_roles=tuple(momentum_roles),
                        adam_lr=lr if adam_lr is None else adam_lr, adam_betas=tuple(adam_betas), adam_eps=adam_eps)
        super().__init__(with_roles(params), defaults)
        for group in self.param_groups:
            if group["role"] not in ROLES:
                raise ValueError(f"unknown role {group['role']!r}: use one of {', '.join(ROLES)}")
            if group["role"] != "vector" and any(p.ndim < 2 for p in group["params"]):
                raise ValueError(f"role {group['role']!r} needs tensors of 2+ dims; give 1-D params role 'vector'")
        self._normalized_update = torch.compile(normalized_update_, dynamic=False) if compile else normalized_update_
        self._adamw_update = torch.compile(adamw_update_, dynamic=False) if compile else adamw_update_

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse or p.grad.is_complex():
                    raise ValueError("SCALE does not support sparse or complex gradients; use dense real params")
            if not params:
                continue
            if group["role"] == "vector":
                self._adamw_step(group, params)
            else:
                self._normalized_step(group, params)
        return loss

    def _normalized_step(self, group, params):
        lr, beta, dim = group["lr"], group["momentum"], NORM_DIM[group["role"]]
        bufs = []
        if beta > 0 and group["role"] in group["momentum_roles"]:
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
        in_blocks = lambda ts: [b for t in ts for b in blocks(t, dim)]
        h = torch.tensor([lr, 1 - lr * group["weight_decay"], 1 - beta], device=params[0].device)
        self._normalized_update(in_blocks(params), in_blocks(p.grad for p in params), in_blocks(bufs), h, dim)

    def _adamw_step(self, group, params):
        lr = group["adam_lr"] * group["lr"] / group["lr0"] if group["lr0"] else 0.0
        (beta1, beta2), eps = group["adam_betas"], group["adam_eps"]
        rows = []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
            state["step"] += 1
            step_size = lr * (1 - beta2 ** state["step"]) ** 0.5 / (1 - beta1 ** state["step"])
            rows.append([1 - lr * group["weight_decay"], 1 - beta1, 1 - beta2, eps, step_size])
        self._adamw_update(params, [p.grad for p in params], [self.state[p]["exp_avg"] for p in params],
                           [self.state[p]["exp_avg_sq"] for p in params], torch.tensor(rows, device=params[0].device))


def with_roles(params):
    """Param groups with a 'role' each: a group without one is split into 'vector' (1-D) and 'matrix'."""
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    out = []
    for group in groups:
        if "role" in group:
            out.append(group)
            continue
        ps = list(group["params"])
        for role, members in (("vector", [p for p in ps if p.ndim < 2]), ("matrix", [p for p in ps if p.ndim >= 2])):
            if members:
                out.append({**group, "params": members, "role": role})
    return out


def scale_param_groups(model, output=None):
    """Param groups by role, from the model's structure: nn.Embedding weights are 'embedding', the weight of
    `output` (default: model.lm_head) is 'output', other tensors of 2+ dims 'matrix', the rest 'vector'.
    A weight shared by an embedding and the output layer (tied embeddings) is 'output'."""
    output = getattr(model, "lm_head", None) if output is None else output
    if not isinstance(output, nn.Module) or getattr(output, "weight", None) is None:
        raise ValueError("cannot find the output layer: the model has no lm_head; pass output=<the output module>")
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups = {role: [] for role in ROLES}
    for p in model.parameters():  # each shared parameter once
        if p is output.weight:
            role = "output"
        elif id(p) in embeddings:
            role = "embedding"
        else:
            role = "matrix" if p.ndim >= 2 else "vector"
        groups[role].append(p)
    return [{"params": ps, "role": role} for role, ps in groups.items() if ps]


def state_bytes(optimizers):
    """Bytes of the state tensors of any torch optimizers, scalar step counters aside: the memory SCALE saves."""
    return sum(t.numel() * t.element_size() for opt in optimizers for state in opt.state.values()
               for t in state.values() if torch.is_tensor(t) and t.ndim > 0)
