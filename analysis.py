"""What CoDyRA did to the model, per task: the paper's analyses (Fig. 6, App. B.2, B.3).

    python analysis.py ViT-B/16 out/checkpoint.pt     # what training changed in the weights

For every adapted matrix W0 (d_out, d_in) and its update dW = B diag(g) A of one task:

    active ranks     k = #{i : g_i != 0}, per module type (q, k, v, out, c_fc, c_proj),
                     per layer, per encoder                                     [Fig. 6, App. B.3]
    update size      ||dW||_F
    amplification    ||dW||_F / ||U^T W0 V||_F, U (d_out, r), V (d_in, r) the top-r left/right
                     singular vectors of dW                         [App. B.2 Eq. 8; LoRA paper 7.3]
    drift            ||W_t - W_pre||_F and its ratio to ||W_pre||_F, W_pre the pretrained weight
    gate survival    |g| at injection against whether the rank survived the task   [SPEC section 1]

In training: pretrained = weights(model, where) once; per task start = snapshot(model, where)
right after inject, and task_report(model, start, pretrained) before merge.

Amplification, the details (the paper's Eq. 8 was lost in extraction; this follows Hu et al.,
LoRA, section 7.3, which the appendix cites as [20]):
- r is the numerical rank of dW (torch.linalg.matrix_rank's tolerance): for an adapter its number
  of active ranks unless B or A lost rank; in LoRA, the LoRA rank. A nominal r = 16 on a rank-8
  dW would take 8 arbitrary singular vectors of the null space; with r = rank(dW) the value does
  not depend on the basis chosen. An explicit r (top-r) is accepted too.
- the numerator is the whole ||dW||_F, as in LoRA (its top-r part when r = rank); W0 is the weight
  the update is added to: the pretrained one for the first task, W_{t-1} after.
- "pooled" over all modules is the amplification of the block-diagonal matrix of every dW against
  the block-diagonal W0: sqrt(sum ||dW_m||^2) / sqrt(sum ||U_m^T W0_m V_m||^2) (singular vectors
  of a block-diagonal matrix lie in single blocks, so the cross terms vanish).
- a module with dW = 0 has no amplification (None).
"""
import argparse
import importlib.util
import sys

import torch

import clip_model
import codyra

TYPES = tuple(codyra.CLIP_LAYERS)        # q, k, v, out, c_fc, c_proj: the columns of every grid
ENCODERS = tuple(codyra.CLIP_ENCODERS)   # vision, text
GATE_EDGES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)  # bins of |g_init|; the last one is [2, inf)

# -----------------------------------------------------------------------------
# grids of layer x module type, numbers for results.json, snapshots of a model


def grid(values):
    """{module name: value} -> {encoder: [[value per type in TYPES] per layer]}; None where a
    module is absent. Names outside CLIP's blocks are ignored, and so is an encoder without any."""
    sites = {n: site for n in values if (site := codyra.clip_site(n))}
    out = {e: [] for e in ENCODERS if any(site[0] == e for site in sites.values())}
    for n, (encoder, block, typ) in sites.items():
        rows = out[encoder]
        rows += [[None] * len(TYPES) for _ in range(block + 1 - len(rows))]
        rows[block][TYPES.index(typ)] = values[n]
    return out


def _norm_of_stack(norms):
    """Frobenius norm of a stack of matrices, from the Frobenius norm of each."""
    return sum(x * x for x in norms) ** 0.5


def _rounded(x, digits=5):
    """A float for results.json: `digits` significant digits; None stays None."""
    return None if x is None else float(f"{x:.{digits}g}")


def _weight(m):
    """The weight a linear computes with: W0 + B diag(g) A for an adapter, else its own weight."""
    if isinstance(m, codyra.CoDyRALinear):
        return m.base.weight + (m.lora_B * m.lora_g) @ m.lora_A  # (d_out, d_in)
    return m.weight


@torch.no_grad()
def weights(model, where=None):
    """{name: copy of the weight it computes with} of every nn.Linear or adapter whose name
    satisfies where(name) (None: all). NOTE: the 144 adapted matrices of ViT-B/16 take ~0.5 GB."""
    inner = {n + ".base" for n, _ in codyra.adapters(model)}  # the frozen W0 inside an adapter
    return {n: _weight(m).detach().clone() for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, codyra.CoDyRALinear)) and n not in inner
            and (where is None or where(n))}


def snapshot(model, where=None):
    """Where a task starts from, for task_report; take it right after codyra.inject. With adapters
    {adapter name: copy of g} (|g_init| against survival); without (full fine-tuning) weights(model,
    where), which the task's update is measured against."""
    if codyra.adapters(model):
        return {n: m.lora_g.detach().clone() for n, m in codyra.adapters(model)}
    return weights(model, where)

# -----------------------------------------------------------------------------
# the measures, one matrix at a time


def low_rank_svd(B, A):
    """Thin SVD (U, S, Vh) of dW = B @ A, B (d_out, k), A (k, d_in), without forming dW.

    dW has rank <= k, so with B = Q_B R_B and A^T = Q_A R_A (reduced QR, Q with orthonormal
    columns), dW = Q_B (R_B R_A^T) Q_A^T and the SVD of the small (k, k) core M = Us S Vs^T gives
    dW = (Q_B Us) S (Vs^T Q_A^T). Cost O((d_out + d_in) k^2), not an SVD of a 3072 x 768 matrix.
    """
    QB, RB = torch.linalg.qr(B)                      # (d_out, k), (k, k)
    QA, RA = torch.linalg.qr(A.T)                    # (d_in, k), (k, k)
    Us, S, Vsh = torch.linalg.svd(RB @ RA.T)         # (k, k), (k,), (k, k)
    return QB @ Us, S, Vsh @ QA.T                    # (d_out, k), (k,), (k, d_in)


def numerical_rank(S, shape, dtype, floor=0.0):
    """Rank from singular values: S > max(max(S) * max(shape) * eps(dtype), floor), the first term
    torch.linalg.matrix_rank's default tolerance, dtype that of the data dW came from."""
    if len(S) == 0 or S.max() == 0:
        return 0
    return int((S > max(float(S.max()) * max(shape) * torch.finfo(dtype).eps, floor)).sum())


def amplification(W0, U, S, Vh, r):
    """||dW||_F / ||U_r^T W0 V_r||_F for dW = U diag(S) Vh (S descending), U_r, V_r its top-r
    singular vectors (App. B.2 Eq. 8); None when dW = 0 or r = 0."""
    if r == 0 or len(S) == 0 or S.max() == 0:
        return None
    proj = U[:, :r].T @ (W0.to(U.dtype) @ Vh[:r].T)  # (r, r): W0 seen in dW's own subspaces
    return float(S.norm() / proj.norm())


def _measures(W0, U, S, Vh, dtype, r, floor=0.0):
    """{"norm", "rank", "r", "amp"} of dW = U diag(S) Vh; dtype, floor: see numerical_rank."""
    rank = numerical_rank(S, W0.shape, dtype, floor)
    r = rank if r is None else min(r, len(S))
    return {"norm": float(S.norm()), "rank": rank, "r": r, "amp": amplification(W0, U, S, Vh, r)}


@torch.no_grad()
def adapter_update(m, r=None):
    """||dW||_F, rank(dW), r and amplification of a CoDyRALinear, from its active ranks, in fp64."""
    keep = m.lora_g != 0
    if not keep.any():
        return {"norm": 0.0, "rank": 0, "r": 0, "amp": None}
    B = (m.lora_B[:, keep] * m.lora_g[keep]).double()  # (d_out, k)
    U, S, Vh = low_rank_svd(B, m.lora_A[keep].double())
    return _measures(m.base.weight.double(), U, S, Vh, m.lora_A.dtype, r)


@torch.no_grad()
def weight_update(W0, W1, r=None):
    """||W1 - W0||_F, its rank, r and the amplification of W1 - W0 against W0, for two full
    matrices. NOTE: a full SVD (about 0.4 s for 3072 x 768 on one CPU core, fp32); use
    adapter_update when the factors are at hand."""
    U, S, Vh = torch.linalg.svd(W1 - W0, full_matrices=False)  # (d_out, k), (k,), (k, d_in)
    # NOTE: storing W in fp32 rounds it by up to eps/2 * ||W||_F, so singular values of W1 - W0
    # below eps * ||W0||_F cannot be told from rounding (each merge rounds); the rank ignores them
    return _measures(W0, U, S, Vh, W0.dtype, r, floor=torch.finfo(W0.dtype).eps * float(W0.norm()))

# -----------------------------------------------------------------------------
# a whole model: one task's report (what train.py stores in results.json), two models compared


def updates(model, before=None, r=None):
    """{name: {"norm", "rank", "r", "amp"}} of this task's update: from the model's adapters or,
    in a model without (full fine-tuning), from its weights against `before` (weights() then)."""
    adapters = codyra.adapters(model)
    if adapters:
        return {n: adapter_update(m, r) for n, m in adapters}
    after = weights(model, lambda n: n in before)
    return {n: weight_update(before[n], after[n], r) for n in before}


@torch.no_grad()
def drift(pretrained, model):
    """{name: (||W - W_pre||_F, ||W_pre||_F)} for every name of `pretrained`; W is what the model
    computes with (adapters included)."""
    return {n: (float((_weight(model.get_submodule(n)) - W0).norm()), float(W0.norm()))
            for n, W0 in pretrained.items()}


def summarize_drift(d):
    """{"norm": {...}, "relative": {...}}, each {encoder: {type: x, "all": x}, "total": x}: the
    Frobenius norm of the drift of each group's matrices; relative: over the group's ||W_pre||_F."""
    groups = {"total": list(d)}
    for n in d:
        if site := codyra.clip_site(n):
            for typ in ("all", site[2]):
                groups.setdefault((site[0], typ), []).append(n)
    norm, relative = {}, {}
    for key, names in groups.items():
        a = _norm_of_stack(d[n][0] for n in names)  # of the drift
        b = _norm_of_stack(d[n][1] for n in names)  # of W_pre
        encoder, typ = key if key != "total" else (None, "total")
        for tree, x in ((norm, a), (relative, a / b if b else None)):
            (tree.setdefault(encoder, {}) if encoder else tree)[typ] = _rounded(x)
    return {"norm": norm, "relative": relative}


def gate_survival(g_init, g_final, edges=GATE_EDGES):
    """|g_init| of every rank against survival (g_final != 0): counts per bin of |g_init| (bins
    [edges[i], edges[i+1]), the last one open), mean |g_init| of survivors and of pruned ranks."""
    if not g_init:
        return None
    init = torch.cat([g_init[n].abs().float().cpu() for n in g_init])
    kept = torch.cat([g_final[n].cpu() != 0 for n in g_init])
    which = torch.bucketize(init, torch.tensor(edges[1:]), right=True)  # bin index of each rank
    return {"edges": list(edges),
            "kept": torch.bincount(which[kept], minlength=len(edges)).tolist(),
            "total": torch.bincount(which, minlength=len(edges)).tolist(),
            "mean_init_kept": _rounded(float(init[kept].mean())) if kept.any() else None,
            "mean_init_pruned": _rounded(float(init[~kept].mean())) if not kept.all() else None}


def _summaries(upd):
    """{"update": ||dW||_F per module (as grids) and over all modules, "amplification": per module
    and pooled over all modules (block-diagonal, see top)}, from updates() or weight_update()."""
    proj = [u["norm"] / u["amp"] for u in upd.values() if u["amp"]]
    total = _norm_of_stack(u["norm"] for u in upd.values())
    return {"update": {"grid": grid({n: _rounded(u["norm"]) for n, u in upd.items()}),
                       "total": _rounded(total)},
            "amplification": {"grid": grid({n: _rounded(u["amp"]) for n, u in upd.items()}),
                              "pooled": _rounded(total / _norm_of_stack(proj) if proj else None)}}


def task_report(model, start, pretrained):
    """Everything of one task, JSON-ready; call it before codyra.merge. start: snapshot() at the
    task's start; pretrained: weights() of the pretrained model."""
    adapters = codyra.adapters(model)
    ranks = codyra.rank_stats(model)
    upd = updates(model, None if adapters else start)
    summary, norms = _summaries(upd), [u["norm"] for u in upd.values()]
    by_type = {e: {t: sum(x[i] for x in rows if x[i] is not None) for i, t in enumerate(TYPES)}
               for e, rows in grid(ranks).items()}
    return {
        "ranks": ranks and {"grid": grid(ranks), "by_type": by_type,
                            "mean": _rounded(sum(ranks.values()) / len(ranks)),
                            "of": max(len(m.lora_g) for _, m in adapters)},
        "gates": gate_survival(start, {n: m.lora_g for n, m in adapters}) if adapters else None,
        "update": {**summary["update"], "mean": _rounded(sum(norms) / max(len(norms), 1))},
        "amplification": summary["amplification"],
        "drift": summarize_drift(drift(pretrained, model)),
    }


def compare(model_a, model_b, r=None, where=None):
    """What changed from model A to model B, in every CLIP linear (where: a codyra placement; None:
    all six types of both encoders): {"update": ||W_B - W_A||_F, "rank": rank of W_B - W_A,
    "amplification": of W_B - W_A against W_A (top-r, r = that rank unless given), "drift": B from
    A}. NOTE: one full SVD per matrix, ~2 min for ViT-B/16 on two CPU cores (seconds on a GPU)."""
    where = where or codyra.clip_placement()
    wa, wb = weights(model_a, where), weights(model_b, where)
    if {n: w.shape for n, w in wa.items()} != {n: w.shape for n, w in wb.items()}:
        raise ValueError("the two models have different architectures")
    upd = {n: weight_update(wa[n], wb[n].to(wa[n].device), r) for n in wa}
    summary = _summaries(upd)
    return {"update": summary["update"],
            "rank": {"grid": grid({n: u["rank"] for n, u in upd.items()}), "r": r},
            "amplification": summary["amplification"],
            "drift": summarize_drift({n: (upd[n]["norm"], float(wa[n].norm())) for n in wa})}

# -----------------------------------------------------------------------------
# terminal print, figures (matplotlib is optional), the command line


def format_grid(rows, title, spec=""):
    """Lines of a text heat map: a row per module type, a column per layer, format(value, spec)."""
    cells = [[("-" if v is None else format(v, spec)) for v in layer] for layer in rows]
    w = max([len(c) for layer in cells for c in layer] + [len(str(len(rows) - 1))]) + 1
    lines = [f"{title:<7}" + "".join(f"{i:>{w}}" for i in range(len(rows)))]
    for i, t in enumerate(TYPES):
        lines.append(f"{t:<7}" + "".join(f"{layer[i]:>{w}}" for layer in cells))
    return lines


def side_by_side(blocks, gap="   "):
    """Join blocks of lines left to right."""
    widths = [max(map(len, b)) for b in blocks]
    return [gap.join(line.ljust(w) for line, w in zip(row, widths)).rstrip()
            for row in zip(*blocks)]


def format_report(report):
    """The print after a task: active ranks by layer and module type per encoder, then sizes."""
    lines = []
    ranks = report["ranks"]
    if ranks:
        lines.append(f"active ranks of {ranks['of']}, layer by module type ('-': not adapted)")
        lines += side_by_side([format_grid(rows, e) for e, rows in ranks["grid"].items()])
    d, g, a = report["drift"], report["gates"], report["amplification"]["pooled"]
    parts = [f"mean rank {ranks['mean']:.1f}/{ranks['of']}"] if ranks else []
    parts += [f"||dW||_F {report['update']['total']:.3g}",
              f"amplification {'-' if a is None else f'{a:.3g}'}",
              f"drift {d['norm']['total']:.3g} "
              f"({100 * d['relative']['total']:.2g}% of ||W_pre||_F)"]
    if g and g["mean_init_kept"] is not None and g["mean_init_pruned"] is not None:
        parts.append(f"|g_init| kept {g['mean_init_kept']:.2f} "
                     f"vs pruned {g['mean_init_pruned']:.2f}")
    lines.append(" | ".join(parts))
    return "\n".join(lines)


def format_comparison(c):
    """The print of `python analysis.py A B`: three grids per encoder, the drift per module type."""
    r = "r = rank of W_B - W_A" if c["rank"]["r"] is None else f"top r = {c['rank']['r']}"
    lines = []
    for title, key, spec in (("||W_B - W_A||_F", "update", ".3g"),
                             ("rank of W_B - W_A", "rank", ""),
                             (f"amplification of W_B - W_A against W_A ({r})", "amplification",
                              ".3g")):
        lines.append(f"{title}, layer by module type ('-': none)")
        lines += side_by_side([format_grid(rows, e, spec) for e, rows in c[key]["grid"].items()])
    d, a = c["drift"], c["amplification"]["pooled"]
    lines.append("drift relative to ||W_A||_F (%): " + " | ".join(
        f"{e} " + " ".join(f"{t} {100 * d['relative'][e][t]:.2g}"
                           for t in TYPES if t in d["relative"][e])
        for e in ENCODERS if e in d["relative"]))
    lines.append(f"||W_B - W_A||_F {d['norm']['total']:.3g} ({100 * d['relative']['total']:.2g}% "
                 f"of ||W_A||_F) | amplification {'-' if a is None else f'{a:.3g}'} (pooled)")
    return "\n".join(lines)


def can_plot():
    """True when matplotlib is installed."""
    return importlib.util.find_spec("matplotlib") is not None


def plot(results, out):
    """Write accuracy.png, ranks.png and drift.png from a results.json dict into `out`; returns
    the paths written (ranks.png only when the run had adapters)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    import numpy as np

    names, acc, reports = results["datasets"], np.array(results["acc"]), results["analysis"]
    done = [f"{t + 1} {names[t]}" for t in range(len(acc))]
    paths = []

    def save(fig, name):
        fig.savefig(f"{out}/{name}", dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(f"{out}/{name}")

    # accuracy matrix: row t = evaluation after task t, column j = dataset j
    fig, ax = plt.subplots(figsize=(1.5 + 0.7 * len(names), 1.2 + 0.5 * len(acc)))
    im = ax.imshow(acc, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    for (t, j), a in np.ndenumerate(acc):
        ax.text(j, t, f"{a:.0f}", ha="center", va="center", fontsize=8,
                color="w" if a < 60 else "k")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(acc)), done)
    ax.set(xlabel="evaluated on", ylabel="after task", title="top-1 accuracy (%)")
    fig.colorbar(im, ax=ax)
    save(fig, "accuracy.png")

    # rank allocation: one panel per encoder (rows) and task (columns), module type x layer
    if reports and reports[0]["ranks"]:
        encoders, top = list(reports[0]["ranks"]["grid"]), reports[0]["ranks"]["of"]
        fig, axes = plt.subplots(len(encoders), len(reports), squeeze=False,
                                 figsize=(1.0 + 1.9 * len(reports), 0.6 + 1.9 * len(encoders)))
        for t, rep in enumerate(reports):
            for i, e in enumerate(encoders):
                cells = np.array([[np.nan if v is None else v for v in layer]
                                  for layer in rep["ranks"]["grid"][e]], dtype=float).T
                ax, layers = axes[i, t], range(cells.shape[1])  # cells: (types, layers)
                im = ax.imshow(cells, vmin=0, vmax=top, cmap="magma", aspect="auto")
                ax.set_yticks(range(len(TYPES)), TYPES if t == 0 else [""] * len(TYPES), fontsize=7)
                ax.set_xticks(layers, [str(x) if x % 2 == 0 else "" for x in layers], fontsize=7)
                ax.set_title(done[t] if i == 0 else "", fontsize=9)
                ax.set_ylabel(e if t == 0 else "")
                ax.set_xlabel("layer" if i == len(encoders) - 1 else "", fontsize=8)
        fig.colorbar(im, ax=axes, label=f"active ranks (of {top})")
        save(fig, "ranks.png")

    # drift from the pretrained weights after each task, and each task's own update
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    x = range(1, len(reports) + 1)
    rel = [rep["drift"]["relative"] for rep in reports]
    for e, style in (("vision", "-"), ("text", "--")):
        for k, t in enumerate(TYPES):
            if e in rel[0] and t in rel[0][e]:
                left.plot(x, [100 * r[e][t] for r in rel], style, color=f"C{k}", label=f"{e} {t}")
    left.plot(x, [100 * r["total"] for r in rel], "k-", lw=2.5, label="all")
    left.set(ylabel="||W_t - W_pre||_F / ||W_pre||_F (%)",
             title="drift from the pretrained weights")
    left.legend(fontsize=7, ncol=2)
    right.bar(x, [rep["update"]["total"] for rep in reports], color="C0")
    right.set_ylabel("||dW||_F of the task (all matrices)", color="C0")
    right.set_title("each task's update")
    amp = right.twinx()
    amp.plot(x, [rep["amplification"]["pooled"] or np.nan for rep in reports], "o-", color="C3")
    amp.set_ylabel("amplification (pooled)", color="C3")
    for ax in (left, right):
        ax.set_xticks(list(x), done, rotation=45, ha="right")
        ax.set_xlabel("after task")
    save(fig, "drift.png")
    return paths


def main():
    p = argparse.ArgumentParser(description="Print what changed from CLIP model A to model B: "
                                "||W_B - W_A||_F, its rank and amplification, and the drift.")
    for name in ("A", "B"):
        p.add_argument(name, help="a model name (ViT-B/16), an OpenAI weight file or a checkpoint")
    p.add_argument("--amp-rank", type=int, help="r of the amplification factor, in singular "
                   "vectors (default: the rank of each W_B - W_A)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    args = p.parse_args()
    if args.amp_rank is not None and args.amp_rank < 1:
        p.error("--amp-rank must be >= 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        a, b = clip_model.load(args.A, device), clip_model.load(args.B, device)
        print(format_comparison(compare(a, b, args.amp_rank)))
    except (clip_model.CLIPLoadError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
