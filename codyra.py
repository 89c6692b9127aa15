"""CoDyRA: continual learning with dynamic rank-selective LoRA, in one file that needs only torch.

For every adapted linear layer with frozen weight W0 (d_out, d_in):

    W = W0 + B diag(g) A       A (r, d_in), B (d_out, r), g (r,) the importance of each rank [Eq. 2]
    minimise L_sup + lambda * sum_m ||g_m||_1 over the adapted layers m                   [Eq. 3]
    after every optimizer step:  g <- S_tau(g)                                             [Eq. 4-6]
    S_tau(x) = sign(x) * max(|x| - tau, 0)                                                 [Eq. 7]

The L1 term is never added to the loss: the proximal step (soft-thresholding g) is what makes g
sparse. tau is 0 during a dense phase, then rises to kappa_max (`threshold_schedule`). After a
task, `merge` drops the ranks whose g is zero, folds W0 <- W0 + B diag(g) A and puts the plain
nn.Linear back; the next task injects fresh adapters. No alpha/r scaling. A ~ kaiming_uniform
(a=sqrt(5)), B = 0, g ~ N(0, 1), as in the authors' released code. Without `proximal_step` the
same layer is the plain LoRA baseline (g is then a learned per-rank scale).

Threshold operator: the true S_tau of Eq. 7. The released code runs three masked in-place
updates in sequence (g[g > tau] -= tau; g[g < -tau] += tau; g[|g| < tau] = 0), which zeroes
every |g| < 2 tau. Recipe (one task):

    inject(model, rank=16, where=clip_placement())     # fresh adapters, everything else frozen
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    for it in range(iterations):
        ...; loss.backward(); opt.step(); opt.zero_grad()
        proximal_step(model, threshold_schedule(it, iterations, dense_ratio, kappa_max))
    merge(model)                                       # same architecture as before inject

NOTE: an adapter only acts if its module's forward() runs. nn.MultiheadAttention reads
out_proj.weight directly, so `inject` refuses to wrap that out_proj: exclude it with `where`.
"""
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F


# --- the layer
class CoDyRALinear(nn.Module):
    """A frozen nn.Linear plus B diag(g) A (Eq. 2). Adapter parameters share the `lora_` prefix,
    so the adapter-only state dict is {k: v for k, v in sd.items() if "lora_" in k}."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.base = base.requires_grad_(False)
        w = base.weight  # adapters follow its device and dtype
        self.lora_A = nn.Parameter(w.new_empty(rank, base.in_features))    # (r, d_in)
        self.lora_B = nn.Parameter(w.new_zeros(base.out_features, rank))   # (d_out, r)
        self.lora_g = nn.Parameter(w.new_empty(rank).normal_())            # (r,)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.lora_A) * self.lora_g, self.lora_B)

    def extra_repr(self):
        return f"rank={self.lora_g.numel()}"


def adapters(model):
    """(name, CoDyRALinear) pairs of a model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, CoDyRALinear)]


# --- placement: inject, and the CLIP placements of the paper's ablations
def inject(model, rank, where=None):
    """Wrap every nn.Linear whose qualified name satisfies where(name) (None: every nn.Linear) in a
    CoDyRALinear of this rank and freeze every other parameter. The root module itself is never
    wrapped. Returns the model, changed in place."""
    if adapters(model):
        raise RuntimeError("model already has adapters; merge(model) before injecting new ones")
    targets = [(n, m) for n, m in model.named_modules()
               if n and isinstance(m, nn.Linear) and (where is None or where(n))]
    parents = [model.get_submodule(n.rpartition(".")[0]) for n, _ in targets]
    for (name, _), parent in zip(targets, parents):
        if isinstance(parent, nn.MultiheadAttention):  # checked before anything is wrapped
            raise ValueError(f"{name}: nn.MultiheadAttention reads this weight directly, so an "
                             "adapter there would never run; exclude it with `where`")
    for (name, linear), parent in zip(targets, parents):
        setattr(parent, name.rpartition(".")[2], CoDyRALinear(linear, rank))
    model.requires_grad_(False)
    for _, m in adapters(model):
        for p in (m.lora_A, m.lora_B, m.lora_g):
            p.requires_grad_(True)
    return model


CLIP_LAYERS = {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj",
               "out": "attn.out_proj", "c_fc": "mlp.c_fc", "c_proj": "mlp.c_proj"}
CLIP_ENCODERS = {"vision": "visual.transformer.resblocks", "text": "transformer.resblocks"}
_CLIP_NAME = re.compile(rf"({'|'.join(map(re.escape, CLIP_ENCODERS.values()))})\.(\d+)\."
                        rf"({'|'.join(map(re.escape, CLIP_LAYERS.values()))})")


def clip_site(name):
    """(encoder, block, layer type) of a clip_model.CLIP linear's qualified name, for example
    ("vision", 3, "c_fc"); None for any other name."""
    m = _CLIP_NAME.fullmatch(name)
    key = {v: k for k, v in {**CLIP_ENCODERS, **CLIP_LAYERS}.items()}  # module path -> short name
    return (key[m[1]], int(m[2]), key[m[3]]) if m else None


def clip_placement(encoders="both", layers=tuple(CLIP_LAYERS)):
    """A `where` predicate for clip_model.CLIP's module names. encoders: "vision", "text" or
    "both"; layers: a non-empty subset of CLIP_LAYERS (the paper's default: all six, both)."""
    if encoders not in ("vision", "text", "both"):
        raise ValueError(f"encoders must be 'vision', 'text' or 'both', got {encoders!r}")
    if not layers or any(x not in CLIP_LAYERS for x in layers):
        raise ValueError(f"layers must be a non-empty subset of {', '.join(CLIP_LAYERS)}; "
                         f"got {list(layers)}")
    chosen = CLIP_ENCODERS if encoders == "both" else (encoders,)

    def where(name):
        site = clip_site(name)
        return site is not None and site[0] in chosen and site[2] in layers
    return where


# --- rank selection: the proximal step (Eq. 4-7) and its threshold schedule
def soft_threshold(x, tau):
    """S_tau(x) = sign(x) * max(|x| - tau, 0), the proximal operator of tau * ||x||_1 (Eq. 7)."""
    return torch.sign(x) * torch.clamp(x.abs() - tau, min=0)


def threshold_schedule(iteration, iterations, dense_ratio, kappa_max, levels=50):
    """tau to apply after optimizer step `iteration` (0-based), as in the released code: 0 for
    iterations 0 .. dense = dense_ratio * iterations inclusive; then the `levels` values of
    linspace(0, kappa_max, levels), one up at every multiple of (iterations - dense) // levels
    from `dense` on; then kappa_max. Absolute: not multiplied by the learning rate. Equal to the
    released code's values whenever dense_ratio * iterations is whole (it compares floats)."""
    dense = round(dense_ratio * iterations)
    if iteration <= dense:
        return 0.0
    # NOTE: with fewer sparse iterations than levels the released code's step is 0 and tau stays 0
    # for the whole task; here the ramp is shortened to one level per iteration instead, so tau
    # still reaches kappa_max before the task ends.
    levels = max(2, min(levels, iterations - dense))
    every = max(1, (iterations - dense) // levels)
    level = iteration // every - (dense - 1) // every  # multiples of `every` in [dense, iteration]
    return kappa_max * min(level, levels - 1) / (levels - 1)


@torch.no_grad()
def proximal_step(model, tau):
    """g <- S_tau(g) in place for every adapter of the model, right after optimizer.step()."""
    for _, m in adapters(model):
        m.lora_g.copy_(soft_threshold(m.lora_g, tau))


def rank_stats(model):
    """{module name: number of active ranks (g != 0)} for every adapter of the model."""
    return {n: int(torch.count_nonzero(m.lora_g)) for n, m in adapters(model)}


# --- merge: back to the original architecture
@torch.no_grad()
def factors(model):
    """{adapter name: (B', A')}, the update that merge folds in, W0 <- W0 + B' A', over the
    surviving ranks only: B' = B[:, keep] diag(g[keep]) (d_out, k), A' = A[keep] (k, d_in),
    keep = g != 0. Saved after every task, they rebuild any model of the sequence from the first."""
    return {n: ((m.lora_B[:, m.lora_g != 0] * m.lora_g[m.lora_g != 0]).detach().clone(),
                m.lora_A[m.lora_g != 0].detach().clone()) for n, m in adapters(model)}


def used_parameters(model):
    """Parameters the adapters finally use, kept ranks x (d_in + d_out + 1) summed over adapters
    (a kept rank is a row of A, a column of B and its g): all of them for plain LoRA."""
    return sum(int(torch.count_nonzero(m.lora_g)) * (m.base.in_features + m.base.out_features + 1)
               for _, m in adapters(model))


@torch.no_grad()
def merge(model):
    """Fold every adapter into its base weight, W0 <- W0 + B diag(g) A over the ranks with g != 0,
    and put the base nn.Linear back in its place: the model then has exactly the architecture,
    state-dict keys and inference cost of a never-injected one. Idempotent (a model without
    adapters is left as it is). requires_grad is not touched: what inject froze stays frozen.
    Returns the model, changed in place."""
    if isinstance(model, CoDyRALinear):
        raise TypeError("merge needs the module holding the CoDyRALinear, to put the Linear back")
    for (name, m), (B, A) in zip(adapters(model), factors(model).values()):
        m.base.weight += B @ A  # (d_out, k) @ (k, d_in)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, m.base)
    return model
