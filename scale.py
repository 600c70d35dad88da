"""SCALE: Stochastic Column-normAlized Last-layer momEntum (Glentis, Li, Han, Hong; arXiv 2506.16659, Algorithm 1).

Every parameter has a role, and every role ends with p <- p * (1 - lr*wd) - lr * u:
  matrix     u = G / rms(G, dim=1)                  each output unit's gradient row gets unit RMS; no state
  embedding  u = G / rms(G, dim=0)                  each embedding dim normalized over the vocabulary; no state
  output     m = beta*m + (1-beta)*G, u = m / rms(m, dim=1)        the one momentum buffer: the last layer
  vector     AdamW with bias correction (1-D norm gains, biases), at lr = adam_lr * lr_t / lr_0
where rms(x, dim) = max(sqrt(mean(x^2 over dim)), 1e-8), tensors of more than 2 dims are viewed as
(shape[0], -1), lr_t is the group's current lr and lr_0 the lr given to the constructor. Weights use PyTorch's
(out, in) layout, so the paper's "columns" are rows here. Ablations: momentum=0 is column-normalized SGD;
momentum_roles=("matrix", "embedding", "output") puts momentum everywhere.
compile=True runs each role's update as one torch.compile'd graph: the fast path. Eager is the same code, readable
and slower (bench.py optimizer). Sharded params (FSDP2's DTensors) are updated shard by shard, each rank its own rows
(see "Sharded params"). bf16_rounding="stochastic" rounds the bf16 writes of p stochastically (see "Stochastic
rounding"). Read on in order: SCALE, the two updates, stochastic rounding, the roles, sharded params, and last the CPU
speed tricks.
"""
import math
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset  # private; torch is pinned

ROLES = ("matrix", "embedding", "output", "vector")
NORM_DIM = {"matrix": 1, "embedding": 0, "output": 1}  # the dim rms(G, dim) reduces: 1 per row, 0 per column


class SCALE(torch.optim.Optimizer):
    """The SCALE optimizer (arXiv 2506.16659, Algorithm 1; the rule is in the module docstring).

    params: param groups with a "role" each (one of ROLES), as scale_param_groups(model) makes them, or tensors
        or groups without one, which are split by ndim into "vector" (1-D) and "matrix" (2+ dims) with a warning.
        Dense real tensors of any float dtype (fp32, bf16); a group's tensors on one device. The state (momentum
        buffer, AdamW moments) has p's dtype and shape; the update runs in fp32, state included, and rounds into p
        and each state tensor once. DTensors sharded by rows (FSDP2's fully_shard) work too, with DTensor state of the
        same sharding: each rank updates its own rows, and the result is the unsharded step's to float rounding.
    lr: the lr of the matrix, embedding and output roles (>= 0); a schedule changes group["lr"] between steps.
    momentum: beta of the momentum buffer, in [0, 1); 0 means no momentum anywhere (column-normalized SGD).
    weight_decay: decoupled weight decay wd (>= 0) of every role: p <- p * (1 - lr*wd) - lr * u.
    adam_lr: the vector role's lr (default: lr), scaled by the schedule: adam_lr * group["lr"] / lr.
    adam_betas, adam_eps: AdamW's (beta1, beta2) and eps of the vector role; eps is added to sqrt(v) before bias
        correction (so it acts as eps / sqrt(1 - beta2^t), unlike torch.optim.AdamW).
    momentum_roles: the roles among matrix, embedding and output that get a momentum buffer; ("output",) is SCALE.
    compile: run each role's update as one torch.compile'd graph (static shapes).
    bf16_rounding: how the matrix, embedding and output roles write a bf16 p: "nearest" (round to nearest even, as
        PyTorch casts), or "stochastic": unbiased stochastic rounding, so that an update smaller than bf16's spacing
        still moves p in expectation (see "Stochastic rounding"). No effect on fp32 params (their write is exact);
        the momentum buffer and the vector role's writes round to nearest either way.
    seed: the seed of stochastic rounding's random bits (an int, taken mod 2^32). The bits are a hash of (seed, p's
        step, p's index in the optimizer, the element's index in p): a resumed run continues bit for bit (p's step is
        state[p]["step"], in state_dict), and DDP ranks, stepping the same values, stay identical.

    The changing hyperparameters reach the updates as named 0-D fp32 tensors on the params' device (stochastic
    rounding's keys as 0-D int32 ones), made at the first step and filled in place from the param groups (and
    each param's step) at each step, and so not in state_dict: a compiled step does not recompile when lr changes,
    and a GPU step makes no host-to-device copy and no sync.

    Raises ValueError on lr or weight_decay < 0, momentum outside [0, 1), momentum_roles outside the 2-D roles,
    bf16_rounding not "nearest" or "stochastic", an unknown role, or a role other than "vector" with a tensor of
    fewer than 2 dims; step() raises ValueError on a sparse or complex gradient, or a matrix or output DTensor
    sharded by columns (its row norms would span ranks).
    Warns (UserWarning) on params without roles, e.g. SCALE(model.parameters()): the embedding and output layers
    get role "matrix", so no momentum and a row-normalized embedding, not SCALE.
    """

    def __init__(self, params, lr=1e-3, momentum=0.9, weight_decay=0.0, adam_lr=None, adam_betas=(0.9, 0.999),
                 adam_eps=1e-8, momentum_roles=("output",), compile=False, bf16_rounding="nearest", seed=0):
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"lr ({lr}) and weight_decay ({weight_decay}) must be >= 0")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if bf16_rounding not in ("nearest", "stochastic"):
            raise ValueError(f"bf16_rounding must be 'nearest' or 'stochastic', got {bf16_rounding!r}")
        if not set(momentum_roles) <= set(NORM_DIM):
            raise ValueError(f"momentum_roles {tuple(momentum_roles)} must be among {tuple(NORM_DIM)} "
                             "(vector params always use AdamW)")
        defaults = dict(lr=lr, lr0=lr, momentum=momentum, weight_decay=weight_decay,
                        momentum_roles=tuple(momentum_roles), adam_lr=lr if adam_lr is None else adam_lr,
                        adam_betas=tuple(adam_betas), adam_eps=adam_eps, bf16_rounding=bf16_rounding, seed=seed)
        self._index = {}  # {id(p): p's index in the optimizer}, in the order add_param_group meets them
        super().__init__(with_roles(params), defaults)
        self._normalized_update = torch.compile(normalized_update_, dynamic=False) if compile else normalized_update_
        self._adamw_update = torch.compile(adamw_update_, dynamic=False) if compile else adamw_update_
        self._scalar_tensors = {}  # {(key, device): {name: 0-D fp32 or int32 tensor}}, see _scalars

    def add_param_group(self, param_group):
        """torch.optim.Optimizer's (called by __init__ for each group), for a group with a role: its params get the
        next indices in the optimizer (for stochastic rounding's bits). Raises ValueError, and adds nothing, on a
        role that is missing or unknown, or a role other than "vector" with a tensor of fewer than 2 dims."""
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if "role" not in param_group:
            raise ValueError(f"a param group needs a 'role', one of {', '.join(ROLES)}, as scale_param_groups gives")
        role = param_group["role"]
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
        if role != "vector" and any(p.ndim < 2 for p in params):
            raise ValueError(f"role {role!r} needs tensors of 2+ dims; give 1-D params role 'vector'")
        super().add_param_group({**param_group, "params": params})
        for p in params:
            self._index.setdefault(id(p), len(self._index))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group_index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse or p.grad.is_complex():
                    raise ValueError("SCALE does not support sparse or complex gradients; use dense real params")
                if group["role"] in ("matrix", "output") and norm_process_groups(p, dim=1):
                    raise ValueError(f"SCALE normalizes the rows of role {group['role']!r}, so each rank needs whole "
                                     f"rows; shard its params by dim 0 (fully_shard's default), got {p.placements}")
            if not params:
                continue
            if group["role"] == "vector":
                self._adamw_step(group_index, group, params)
            else:
                self._normalized_step(group_index, group, params)
        return loss

    def _normalized_step(self, group_index, group, params):
        lr, beta, dim = group["lr"], group["momentum"], NORM_DIM[group["role"]]
        bufs = []
        if beta > 0 and group["role"] in group["momentum_roles"]:
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
        scalars = self._scalars(group_index, params[0].device, lr=lr, decay=1 - lr * group["weight_decay"],
                                one_minus_beta=1 - beta)
        ps, gs, ms = local_shards(params), local_shards(p.grad for p in params), local_shards(bufs)
        rmss = None
        if dim == 0 and any(norm_process_groups(p, dim) for p in params):
            # the embedding sharded by rows (FSDP2): its column norms sum over every rank's rows, so each rank sums
            # its own rows' squares and one all-reduce of a (1, D) vector per tensor adds up the ranks'; the
            # momentum (if the embedding has any) comes first, since the norms are of the new m
            if ms:  # gs becomes the new m, and ms = [] so the update does not apply the momentum again
                gs, ms = [ema_(m, g, scalars["one_minus_beta"]) for m, g in zip(ms, gs)], []
            # a collective: every rank calls it for every param, so it comes before empty shards are dropped
            rmss = [sharded_column_rms(g, p) for g, p in zip(gs, params)]
        keys = self._rounding_keys(group_index, group, params, dim)
        ps, gs, ms, rmss, keys = without_empty_shards(ps, gs, ms, rmss, keys)
        if ps:
            # CPU speed (see blocks): p, G and m, of one shape, split into the same row blocks, and keys has one key
            # per block; blocks splits only row-normalized roles (dim 1) and rmss exists only for dim 0, so rmss
            # stays one per p. The returned factors are for inductor's sake (see "CPU speed"), not used here.
            in_blocks = lambda ts: [b for t in ts for b in blocks(t, dim)]
            keys = [key for per_block in keys for key in per_block]
            self._normalized_update(in_blocks(ps), in_blocks(gs), in_blocks(ms), rmss, keys, dim, **scalars)

    def _rounding_keys(self, group_index, group, params, dim):
        """For bf16_rounding="stochastic": per param, per block of its local shard (blocks), the key of its random
        bits (a 0-D int32 tensor, or None for a param that is not bf16), counting each bf16 param's step in
        state[p]["step"]; [] for "nearest". The key is the hash of (seed, step, p's index) plus the flat index in p
        of the block's first element, so an element's bits are the same however p is blocked, and, sharded by
        rows, as unsharded."""
        if group["bf16_rounding"] != "stochastic":
            return []
        keys = []
        for p in params:
            local = local_shards([p])[0]
            if p.dtype != torch.bfloat16:
                keys.append([None] * len(blocks(local, dim)))
                continue
            state = self.state[p]
            state["step"] = state.get("step", 0) + 1
            if local.numel() > KEY_MASK + 1:
                raise ValueError(f"bf16_rounding='stochastic' handles tensors of up to 2^30 elements, got {p.shape}")
            key = hash32(group["seed"] ^ hash32(state["step"] ^ hash32(self._index[id(p)])))
            offset, keys_of_p = shard_offset(p), {}
            for k, block in enumerate(blocks(local, dim)):
                keys_of_p[f"key{k}"] = (key + offset) & KEY_MASK
                offset += block.numel()
            keys.append(list(self._scalars((group_index, id(p)), p.device, torch.int32, **keys_of_p).values()))
        return keys

    def _adamw_step(self, group_index, group, params):
        # group["lr"] is the schedule's lr of the other roles; this role follows it at adam_lr * lr_t / lr_0
        lr = group["adam_lr"] * group["lr"] / group["lr0"] if group["lr0"] else 0.0
        (beta1, beta2), eps = group["adam_betas"], group["adam_eps"]
        step_sizes = []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
            state["step"] += 1
            # bias correction in Python float64, per parameter: a param skipped at a step (grad None) lags behind
            step_size = lr * (1 - beta2 ** state["step"]) ** 0.5 / (1 - beta1 ** state["step"])
            step_sizes.append(self._scalars((group_index, id(p)), p.device, step_size=step_size)["step_size"])
        # 1 - beta in float64, then fp32: 1 - fp32(0.999) would be off by a relative 1.3e-5
        scalars = self._scalars(group_index, params[0].device, decay=1 - lr * group["weight_decay"],
                                one_minus_beta1=1 - beta1, one_minus_beta2=1 - beta2, eps=eps)
        grads = [p.grad for p in params]
        exp_avgs, exp_avg_sqs = [self.state[p]["exp_avg"] for p in params], [self.state[p]["exp_avg_sq"] for p in params]
        ps, gs, ms, vs, step_sizes = without_empty_shards(
            local_shards(params), local_shards(grads), local_shards(exp_avgs), local_shards(exp_avg_sqs), step_sizes)
        if ps:
            self._adamw_update(ps, gs, ms, vs, step_sizes=step_sizes, **scalars)

    def _scalars(self, key, device, dtype=torch.float32, **values):
        """{name: a 0-D tensor of dtype (fp32, or int32 for rounding keys) on device holding values[name]}, made once
        under (key, device, name) and filled in place at every call after: a fill from a Python number is one kernel
        launch (no host-to-device copy, no sync), and a compiled update sees the same inputs at every step. Each
        tensor is filled before each use, so a key needs only to be unique among a step's groups (group index) and
        parameters ((group index, id(p)))."""
        tensors = self._scalar_tensors.setdefault((key, device), {})
        for name, value in values.items():
            if name not in tensors:
                tensors[name] = torch.empty((), dtype=dtype, device=device)
            tensors[name].fill_(value)
        return {name: tensors[name] for name in values}


# -----------------------------------------------------------------------------
# the two updates, each one torch.compile'd graph with compile=True

def normalized_update_(params, grads, bufs, rmss, keys, dim: int, lr, decay, one_minus_beta):
    """The matrix, embedding and output roles, in place: for each p, G (and momentum buffer m, when bufs is not
    empty: m <- beta*m + (1-beta)*G, and G is m from then on), p <- p * (1 - lr*wd) - lr * G / rms(G, dim).

    params, grads, bufs: lists of tensors of 2+ dims (viewed as (shape[0], -1)), of p's dtype; bufs is [] or one per
    p. rmss: None, or for each p rms(G, dim) computed elsewhere, (1, D) fp32 (a shard's column norms, from all ranks'
    rows: sharded_column_rms). dim: 1 normalizes rows (matrix, output), 0 columns (embedding). lr, decay = 1 - lr*wd
    and one_minus_beta = 1 - beta: 0-D fp32 tensors. keys: [] (round to nearest), or for each p None (nearest) or
    the 0-D int32 key of its stochastic rounding (round_stochastic; p bf16). Computes in fp32 and rounds into p (and m)
    once. Returns the factors lr / rms(G), (N, 1) or (1, D) fp32 each, for CPU speed (see "CPU speed" at the end of
    the file)."""
    if bufs:
        grads = [ema_(m, g, one_minus_beta) for m, g in zip(bufs, grads)]
    factors = []
    for k, (p, g) in enumerate(zip(params, grads)):
        p, g = p.view(p.shape[0], -1), g.reshape(g.shape[0], -1).float()
        factors.append(lr / (rms(g, dim) if rmss is None else rmss[k]))
        # p*(1 - lr*wd) - G * lr / rms(G). fp32 p: p.float() is p, so this runs in place and eager mode makes no
        # temporaries; bf16 p: one fp32 copy, rounded once into p (the one write of p)
        new = p.float().mul_(decay).addcmul_(g, factors[-1], value=-1)
        p.copy_(new if not keys or keys[k] is None else round_stochastic(new, keys[k]))
    return factors


def adamw_update_(params, grads, exp_avgs, exp_avg_sqs, decay, one_minus_beta1, one_minus_beta2, eps, step_sizes):
    """The vector role, in place: AdamW on each p, with m and v its moments, m <- beta1*m + (1-beta1)*g,
    v <- beta2*v + (1-beta2)*g^2, p <- p * (1 - lr*wd) - step_size * m / (sqrt(v) + eps), where step_size =
    lr * sqrt(1 - beta2^t) / (1 - beta1^t) is p's bias correction at its step t (Adam: Kingma & Ba, arXiv
    1412.6980, Algorithm 1 with eps before the correction; decoupled weight decay: Loshchilov & Hutter, 1711.05101).

    params, grads, exp_avgs, exp_avg_sqs: lists of tensors of one shape per p, of p's dtype. decay = 1 - lr*wd,
    one_minus_beta1, one_minus_beta2, eps: 0-D fp32 tensors; step_sizes: one 0-D fp32 tensor per p. Computes in fp32
    and rounds into p (and m, v) once."""
    for p, g, m, v, step_size in zip(params, grads, exp_avgs, exp_avg_sqs, step_sizes):
        m, v = ema_(m, g, one_minus_beta1), ema_(v, g.float().square(), one_minus_beta2)
        p.copy_(p.float() * decay - step_size * m / (v.sqrt() + eps))  # the one write of p


def ema_(m, x, one_minus_beta):
    """m <- beta*m + (1-beta)*x, in place; returns the new m in fp32, which the update then reads (so eager and
    compiled agree: the compiled graph would skip rounding m to bf16 and back). Computed in fp32: a bf16 lerp_ would
    round its fp32 weight 1 - beta to bf16 (0.001 to 0.0009995)."""
    new = m.float().lerp_(x.float(), one_minus_beta)  # fp32 m: in place, no temporary
    m.copy_(new)  # fp32 m: a no-op; bf16 m: rounded once (the one write of m)
    return new


def rms(g, dim: int):
    """max(sqrt(mean(g^2 over dim)), 1e-8) of a 2-D fp32 g of shape (N, D), keepdim: (N, 1) for dim=1, (1, D) for 0."""
    if dim == 1:  # vector_norm: one pass and, in eager mode, no (N, D) temporary
        return (torch.linalg.vector_norm(g, dim=1, keepdim=True) / g.shape[1] ** 0.5).clamp_min(1e-8)
    return rms_of_sum(column_sum_of_squares(g), g.shape[0])


def rms_of_sum(sum_of_squares, n):
    """max(sqrt(sum_of_squares / n), 1e-8): an rms from its sum of squares over n elements."""
    return (sum_of_squares / n).sqrt().clamp_min(1e-8)


# -----------------------------------------------------------------------------
# stochastic rounding (bf16_rounding="stochastic"): an fp32 x between two neighbouring bf16 values a < x < b becomes b
# with probability (x - a) / (b - a), else a, so its expectation is x: a step smaller than bf16's spacing (2^-7 of a
# weight's magnitude; 2^-9 at 0.02) moves the weight in expectation instead of being lost (Gupta et al. 2015,
# arXiv 1502.02551; for bf16 training, Zamirai et al. 2020, arXiv 2010.06192). The random bits come from a counter-
# based hash, not a generator: no RNG state to save, the same bits on every DDP rank, and in a compiled step one fused
# kernel with no memory traffic of its own (the element index is an arange inductor fuses).

MASK = 2 ** 32 - 1
KEY_MASK = 2 ** 30 - 1  # keys and element indices stay below 2^30, so key + index fits an int32


def hash32(x):
    """A 32-bit integer hash of a Python int (Wellons' hash prospector, two xorshift-multiply rounds), a bijection
    on [0, 2^32); x is taken mod 2^32 first. It mixes (seed, step, param index) into each step's key, on the host."""
    x = x & MASK
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & MASK
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & MASK
    return x ^ (x >> 15)


def hash16(x):
    """16 random bits of each x in [0, 2^31), elementwise on an int32 tensor (or a Python int): the high half folded
    into the low one, then three xorshift-multiply rounds mod 2^16 with odd multipliers below 2^15 (each a
    bijection), so no product reaches 2^31 and nothing overflows int32; consecutive x spread evenly over [0, 2^16)."""
    h = (x & 0xFFFF) ^ (((x >> 16) * 0x2C1B) & 0xFFFF)
    h = (h * 0x6D2B) & 0xFFFF
    h = h ^ (h >> 8)
    h = (h * 0x4F1B) & 0xFFFF
    h = h ^ (h >> 7)
    h = (h * 0x3A6D) & 0xFFFF
    return h ^ (h >> 8)


def round_stochastic(x, key):
    """fp32 x -> bf16, rounded stochastically and unbiased: 16 random bits r per element (hash16 of key + the
    element's flat index, key a 0-D int32 tensor in [0, 2^30), x of at most 2^30 elements) are added to x's bit
    pattern, whose low 16 bits are then cut: x rounds up in magnitude with probability (its low 16 bits) / 2^16.
    A bf16 value (low 16 bits zero) is returned unchanged, and the cut value converts to bf16 exactly. In int32:
    the largest finite pattern plus r stays below 2^31 (and a negative one above -2^31). inf stays inf, and a NaN
    as arithmetic makes it (0x7FC00000, or with the sign bit) stays NaN."""
    bits = hash16(torch.arange(x.numel(), device=x.device, dtype=torch.int32).view(x.shape) + key)
    return ((x.view(torch.int32) + bits) & -2 ** 16).view(torch.float32).to(torch.bfloat16)


def shard_offset(p):
    """The flat index, in the whole of p, of its local shard's first element (0 for a plain tensor): sharded by rows,
    the shard's elements have the indices they have unsharded, so they round with the same bits."""
    if not isinstance(p, DTensor):
        return 0
    _, offsets = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return sum(offset * math.prod(p.shape[d + 1:]) for d, offset in enumerate(offsets))


# -----------------------------------------------------------------------------
# roles: which update each parameter gets; and the state's size

def with_roles(params):
    """Param groups with a 'role' each: a group without one is split into 'vector' (1-D) and 'matrix' (2+ dims),
    with a UserWarning when it has tensors of 2+ dims (an embedding or output layer among them would get 'matrix')."""
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    out, guessed = [], False
    for group in groups:
        if "role" in group:
            out.append(group)
            continue
        ps = list(group["params"])
        for role, members in (("vector", [p for p in ps if p.ndim < 2]), ("matrix", [p for p in ps if p.ndim >= 2])):
            if members:
                out.append({**group, "params": members, "role": role})
                guessed |= role == "matrix"
    if guessed:
        warnings.warn("SCALE: params without a role get role 'matrix' (2+ dims) or 'vector' (1-D), so an embedding "
                      "or output layer among them is row-normalized with no momentum, which is not SCALE; pass "
                      "scale_param_groups(model)", UserWarning, stacklevel=3)
    return out


def scale_param_groups(model, output=None):
    """Param groups by role, from the model's structure: nn.Embedding weights are 'embedding', the weight of
    `output` (default: model.lm_head) is 'output', other tensors of 2+ dims 'matrix', the rest 'vector'.
    A weight shared by an embedding and the output layer (tied embeddings) is 'output'.
    Raises ValueError when there is no output layer (no model.lm_head with a weight and no `output` given)."""
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


def state_tensors(optimizers):
    """The state tensors of any torch optimizers (momentum buffers, moments), scalar step counters aside."""
    return [t for opt in optimizers for state in opt.state.values() for t in state.values()
            if torch.is_tensor(t) and t.ndim > 0]


def state_bytes(optimizers):
    """Bytes of the state tensors of any torch optimizers, scalar step counters aside: the memory SCALE saves."""
    return sum(t.numel() * t.element_size() for t in state_tensors(optimizers))


# -----------------------------------------------------------------------------
# sharded params: FSDP2 (fully_shard) makes each param a DTensor, of which each rank holds some rows (Shard(0); the
# shards can be uneven, and empty on some ranks for a tensor of fewer rows than ranks). The update runs on each rank's
# local rows. Row norms (matrix, output) and AdamW (vector) need nothing from other ranks; the embedding's column norms,
# over the vocabulary, need every rank's rows (sharded_column_rms). The state is made by zeros_like(p), a DTensor of p's
# sharding, so torch.distributed.checkpoint.state_dict gathers and shards it like the params.

def local_shards(tensors):
    """Each tensor's local shard (DTensor.to_local(), a view that in-place updates write through), or the tensor."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def without_empty_shards(params, *others):
    """Parallel lists (params' local shards, then their grads, state, ... or None) without the positions where the
    param's shard is empty: a tensor of fewer rows than ranks has no rows on some of them."""
    keep = [k for k, p in enumerate(params) if p.numel()]
    return [[ts[k] for k in keep] if ts else ts for ts in (params, *others)]


def norm_process_groups(p, dim: int):
    """The process groups over which rms(G, dim) of p (viewed as (shape[0], -1)) is split: a norm reduces over dim
    (0: each column's, over the rows; 1: each row's, over the columns), so for a DTensor it is the groups of the mesh
    dims that shard that axis (rows for dim=0, columns for dim=1); [] for a plain tensor."""
    if not isinstance(p, DTensor):
        return []
    return [p.device_mesh.get_group(i) for i, placement in enumerate(p.placements)
            if placement.is_shard() and (placement.dim == 0) == (dim == 0)]


def sharded_column_rms(g, p):
    """rms(G, dim=0) of the whole of p, a DTensor sharded by rows, from this rank's rows g of G (a local shard of
    p's shape but for its rows, any dtype, possibly 0 rows) -> (1, D) fp32: this rank's column sums of squares,
    all-reduced over the groups that shard p's rows, over p's full row count."""
    sum_of_squares = column_sum_of_squares(g.float().flatten(1))  # flatten, not view(N, -1): N may be 0
    for group in norm_process_groups(p, dim=0):
        dist.all_reduce(sum_of_squares, group=group)
    return rms_of_sum(sum_of_squares, p.shape[0])


# -----------------------------------------------------------------------------
# CPU speed: tricks for the compiled step on CPU. Each computes what the plain math would (to float rounding); they
# are called from _normalized_step (blocks), rms (column_sum_of_squares) and normalized_update_ (returned factors)
# - row blocks (blocks): the normalized update of a large tensor runs on blocks of whole rows that fit in cache.
# - 64-row column sums (column_sum_of_squares): the embedding's sum over rows in two stages (on every device).
# - returned factors: normalized_update_ returns lr / rms(G); as graph outputs, inductor computes each once per
#   row (or column) instead of once per vector of elements, which makes the compiled bf16 step ~15% faster.

BLOCK_BYTES = 2 ** 21  # of the blocks a large tensor is updated in, on CPU (see blocks)


def blocks(t, dim: int):
    """[t], or on CPU, for row norms (dim=1), a t of 2 * BLOCK_BYTES or more as blocks of whole rows of about
    BLOCK_BYTES, so that the update's second read of each block (and of the momentum just written) comes from
    cache, not memory. (Split by columns, the embedding compiles to slow strided kernels: not done.)"""
    n_blocks = t.numel() * t.element_size() // BLOCK_BYTES if dim == 1 and t.device.type == "cpu" else 1
    return [t] if n_blocks < 2 else t.view(t.shape[0], -1).split(-(-t.shape[0] // n_blocks))


def column_sum_of_squares(g):
    """sum(g^2 over rows) of a 2-D fp32 g of shape (N, D), as (1, D): blocks of 64 rows summed first, which
    inductor's CPU code runs 2x faster than a plain column sum."""
    k = g.shape[0] - g.shape[0] % 64
    return g[:k].view(-1, 64, g.shape[1]).square().sum(1).sum(0, keepdim=True) + g[k:].square().sum(0, keepdim=True)
