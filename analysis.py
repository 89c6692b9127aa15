"""What CoDyRA did to the model per task (the paper's Fig. 6, App. B.2, B.3): for each adapted W0
and update dW = B diag(g) A, active ranks #{i : g_i != 0} per module type, layer and encoder,
||dW||_F, amplification [Eq. 8], drift ||W_t - W_pre||_F, |g| at injection against survival.

    python analysis.py ViT-B/16 out/checkpoint.pt     # what training changed in the weights
"""
import argparse
import importlib.util
import math
import sys

import torch

import clip_model
import codyra

TYPES = tuple(codyra.CLIP_LAYERS)        # q, k, v, out, c_fc, c_proj: the columns of every grid
ENCODERS = tuple(codyra.CLIP_ENCODERS)   # vision, text
GATE_EDGES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)  # bins of |g_init|; the last one is [2, inf)


def grid(values):
    """{module name: value} -> {encoder: [[value per type in TYPES] per layer]}, None if absent."""
    sites = {n: site for n in values if (site := codyra.clip_site(n))}
    out = {e: [] for e in ENCODERS if any(site[0] == e for site in sites.values())}
    for n, (encoder, block, typ) in sites.items():
        rows = out[encoder]
        rows += [[None] * len(TYPES) for _ in range(block + 1 - len(rows))]
        rows[block][TYPES.index(typ)] = values[n]
    return out


def _rounded(x, digits=5):  # a float for results.json; None stays None
    return None if x is None else float(f"{x:.{digits}g}")


def _weight(m):  # the weight a linear computes with: W0 + B diag(g) A for an adapter
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
    """A task's start, after codyra.inject: {adapter: copy of g}, or weights(model, where)."""
    gates = {n: m.lora_g.detach().clone() for n, m in codyra.adapters(model)}
    return gates or weights(model, where)


def low_rank_svd(B, A):
    """Thin SVD (U, S, Vh) of dW = B @ A without forming dW: B = Q_B R_B, A^T = Q_A R_A and the
    (k, k) core R_B R_A^T = Us S Vs^T give dW = (Q_B Us) S (Vs^T Q_A^T): O((d_out + d_in) k^2)."""
    QB, RB = torch.linalg.qr(B)                      # (d_out, k), (k, k)
    QA, RA = torch.linalg.qr(A.T)                    # (d_in, k), (k, k)
    Us, S, Vsh = torch.linalg.svd(RB @ RA.T)         # (k, k), (k,), (k, k)
    return QB @ Us, S, Vsh @ QA.T                    # (d_out, k), (k,), (k, d_in)


def amplification(W0, U, S, Vh, r):
    """||dW||_F / ||U_r^T W0 V_r||_F, dW = U diag(S) Vh (S descending), None if dW = 0 or r = 0.
    As LoRA 7.3 (Eq. 8 was lost in extraction); r = rank(dW): no basis of dW's null space counts."""
    if r == 0 or len(S) == 0 or S.max() == 0:
        return None
    proj = U[:, :r].T @ (W0.to(U.dtype) @ Vh[:r].T)  # (r, r): W0 seen in dW's own subspaces
    return float(S.norm() / proj.norm())


@torch.no_grad()
def adapter_update(m):  # weight_update's measures of a CoDyRALinear, from its active ranks, in fp64
    keep = m.lora_g != 0
    if not keep.any():
        return {"norm": 0.0, "rank": 0, "r": 0, "amp": None}
    svd = low_rank_svd((m.lora_B[:, keep] * m.lora_g[keep]).double(), m.lora_A[keep].double())
    return weight_update(m.base.weight.double(), None, svd=svd, dtype=m.lora_A.dtype)


@torch.no_grad()
def weight_update(W0, W1, r=None, svd=None, dtype=None):
    """{"norm", "rank", "r", "amp"} of dW = W1 - W0 (or svd: its U, S, Vh; dtype: that of its data)
    against W0; rank: #{S > max(S) * max(shape) * eps(dtype)} (matrix_rank's tolerance) and, by a
    full SVD (~0.4 s for 3072 x 768, CPU), > eps * ||W0||_F, the size of rounding W to fp32."""
    U, S, Vh = svd or torch.linalg.svd(W1 - W0, full_matrices=False)  # (d_out, k), (k,), (k, d_in)
    eps = torch.finfo(dtype or W0.dtype).eps
    floor = 0.0 if svd else eps * float(W0.norm())
    rank = int((S > max(float(S.max()) * max(W0.shape) * eps, floor)).sum()) if len(S) else 0
    r = rank if r is None else min(r, len(S))
    return {"norm": float(S.norm()), "rank": rank, "r": r, "amp": amplification(W0, U, S, Vh, r)}


@torch.no_grad()
def drift(pretrained, model):
    """{name: (||W - W_pre||_F, ||W_pre||_F)} per name in `pretrained`, W as the model uses it."""
    return {n: (float((_weight(model.get_submodule(n)) - W0).norm()), float(W0.norm()))
            for n, W0 in pretrained.items()}


def summarize_drift(d):
    """{"norm"/"relative": {encoder: {type: x, "all": x}, "total": x}}: each group's stacked."""
    groups = {(None, "total"): list(d)}
    for n in d:
        if site := codyra.clip_site(n):
            for typ in ("all", site[2]):
                groups.setdefault((site[0], typ), []).append(n)
    norm, relative = {}, {}
    for (encoder, typ), names in groups.items():
        a, b = (math.hypot(*(d[n][i] for n in names)) for i in (0, 1))  # drift, W_pre: stacked
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
    count = [torch.bincount(w, minlength=len(edges)).tolist() for w in (which[kept], which)]
    return {"edges": list(edges), "kept": count[0], "total": count[1],
            "mean_init_kept": _rounded(float(init[kept].mean())) if kept.any() else None,
            "mean_init_pruned": _rounded(float(init[~kept].mean())) if not kept.all() else None}


def _report(upd, drifts):
    """A report's "update", "amplification", "drift"; the total and pooled of all dW, stacked."""
    proj = [u["norm"] / u["amp"] for u in upd.values() if u["amp"]]
    total = math.hypot(*(u["norm"] for u in upd.values()))
    return {"update": {"grid": grid({n: _rounded(u["norm"]) for n, u in upd.items()}),
                       "total": _rounded(total)},
            "amplification": {"grid": grid({n: _rounded(u["amp"]) for n, u in upd.items()}),
                              "pooled": _rounded(total / math.hypot(*proj) if proj else None)},
            "drift": summarize_drift(drifts)}


def task_report(model, start, pretrained):
    """Everything of one task, JSON-ready; call it before codyra.merge. start: snapshot() at the
    task's start (without adapters, the update is measured against it); pretrained: weights()."""
    adapters, ranks = codyra.adapters(model), codyra.rank_stats(model)
    upd = ({n: adapter_update(m) for n, m in adapters} if adapters else
           {n: weight_update(start[n], w) for n, w in weights(model, start.__contains__).items()})
    report, norms = _report(upd, drift(pretrained, model)), [u["norm"] for u in upd.values()]
    pre = math.hypot(*(float(pretrained[n].norm()) for n in upd))
    # relative: ||dW_t||_F / ||W_pre||_F over the same matrices, comparable across scales
    report["update"].update(mean=_rounded(sum(norms) / max(len(norms), 1)),
                            relative=_rounded(math.hypot(*norms) / pre if upd else None))
    by_type = {e: {t: sum(filter(None, column)) for t, column in zip(TYPES, zip(*rows))}
               for e, rows in grid(ranks).items()}  # None: not adapted
    return {"ranks": ranks and {"grid": grid(ranks), "by_type": by_type,
                                "mean": _rounded(sum(ranks.values()) / len(ranks)),
                                "of": max(len(m.lora_g) for _, m in adapters)},
            "gates": gate_survival(start, {n: m.lora_g for n, m in adapters}) if adapters else None,
            **report,  # Table 7's "final used params"; full fine-tuning: every trainable parameter
            "used_parameters": (codyra.used_parameters(model) if adapters else
                                sum(p.numel() for p in model.parameters() if p.requires_grad))}


def compare(model_a, model_b, r=None, where=None):
    """task_report's "update", "rank", "amplification" (against W_A, top r; default the rank),
    "drift" from A to B in CLIP's linears `where`. NOTE: a full SVD each (ViT-B/16: 2 min, CPU)."""
    wa, wb = (weights(m, where or codyra.clip_placement()) for m in (model_a, model_b))
    if {n: w.shape for n, w in wa.items()} != {n: w.shape for n, w in wb.items()}:
        raise ValueError("the two models have different architectures")
    upd = {n: weight_update(wa[n], wb[n].to(wa[n].device), r) for n in wa}
    return {"rank": {"grid": grid({n: u["rank"] for n, u in upd.items()}), "r": r},
            **_report(upd, {n: (upd[n]["norm"], float(wa[n].norm())) for n in wa})}


def format_grids(grids, spec="", gap="   "):
    """Text heat maps of {encoder: rows} side by side: a row per module type, a column per layer."""
    blocks = []
    for e, rows in grids.items():
        cells = [[("-" if v is None else format(v, spec)) for v in layer] for layer in rows]
        w = max([len(c) for layer in cells for c in layer] + [len(str(len(rows) - 1))]) + 1
        table = [(e, range(len(rows))), *zip(TYPES, zip(*cells))]  # header, then a row per type
        blocks.append([f"{h:<7}" + "".join(f"{c:>{w}}" for c in row) for h, row in table])
    widths = [max(map(len, b)) for b in blocks]
    return [gap.join(line.ljust(w) for line, w in zip(row, widths)).rstrip()
            for row in zip(*blocks)]


def format_report(report):
    """The print after a task: active ranks by layer and module type per encoder, then sizes."""
    ranks, u, d, g = report["ranks"], report["update"], report["drift"], report["gates"]
    a = report["amplification"]["pooled"]
    lines = [f"active ranks of {ranks['of']}, layer by module type ('-': not adapted)",
             *format_grids(ranks["grid"])] if ranks else []
    parts = ([f"mean rank {ranks['mean']:.1f}/{ranks['of']}"] if ranks else []) + [
        f"used params {report['used_parameters'] / 1e6:.3g}M",
        f"||dW||_F {u['total']:.3g} ({100 * u['relative']:.2g}% of ||W_pre||_F)",
        f"amplification {'-' if a is None else f'{a:.3g}'}",
        f"drift {d['norm']['total']:.3g} ({100 * d['relative']['total']:.2g}% of ||W_pre||_F)"]
    if g and None not in (g["mean_init_kept"], g["mean_init_pruned"]):
        parts += [f"|g_init| kept {g['mean_init_kept']:.2f} vs pruned {g['mean_init_pruned']:.2f}"]
    return "\n".join(lines + [" | ".join(parts)])


def format_comparison(c):
    """The print of `python analysis.py A B`: three grids per encoder, the drift per module type."""
    r = "r = rank of W_B - W_A" if c["rank"]["r"] is None else f"top r = {c['rank']['r']}"
    rel, a, lines = c["drift"]["relative"], c["amplification"]["pooled"], []
    amp = f"amplification of W_B - W_A against W_A ({r})"
    for title, key, spec in (("||W_B - W_A||_F", "update", ".3g"),
                             ("rank of W_B - W_A", "rank", ""), (amp, "amplification", ".3g")):
        lines += [f"{title}, layer by module type ('-': none)", *format_grids(c[key]["grid"], spec)]
    lines.append("drift relative to ||W_A||_F (%): " + " | ".join(
        f"{e} " + " ".join(f"{t} {100 * rel[e][t]:.2g}" for t in TYPES if t in rel[e])
        for e in ENCODERS if e in rel))
    lines.append(f"||W_B - W_A||_F {c['drift']['norm']['total']:.3g} ({100 * rel['total']:.2g}% "
                 f"of ||W_A||_F) | amplification {'-' if a is None else f'{a:.3g}'} (pooled)")
    return "\n".join(lines)


def can_plot():  # matplotlib installed?
    return importlib.util.find_spec("matplotlib") is not None


def plot(results, out=None):
    """A run's figures, {file name: matplotlib Figure}: accuracy.png, ranks.png (with adapters) and
    drift.png, written into `out` if given. No pyplot: no window, no backend, nothing to close."""
    from matplotlib.figure import Figure
    import numpy as np
    names, acc, reports = results["datasets"], np.array(results["acc"]), results["analysis"]
    done, figs = [f"{t + 1} {names[t]}" for t in range(len(acc))], {}
    def new(name, size, *grid, **kw):  # the axes of a new figure, kept in figs
        return figs.setdefault(name, Figure(figsize=size)).subplots(*grid, **kw)
    # accuracy matrix: row t = evaluation after task t, column j = dataset j
    ax = new("accuracy.png", (1.5 + 0.7 * len(names), 1.2 + 0.5 * len(acc)))
    im = ax.imshow(acc, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    for (t, j), a in np.ndenumerate(acc):
        ax.text(j, t, f"{a:.0f}", ha="center", va="center", size=8, color="w" if a < 60 else "k")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set(yticks=range(len(acc)), yticklabels=done, xlabel="evaluated on", ylabel="after task",
           title="top-1 accuracy (%)")
    ax.figure.colorbar(im, ax=ax)
    # rank allocation: one panel per encoder (rows) and task (columns), module type x layer
    if reports and reports[0]["ranks"]:
        encoders, top = list(reports[0]["ranks"]["grid"]), reports[0]["ranks"]["of"]
        axes = new("ranks.png", (1.0 + 1.9 * len(reports), 0.6 + 1.9 * len(encoders)),
                   len(encoders), len(reports), squeeze=False)
        for i, t in np.ndindex(axes.shape):
            cells = np.array(reports[t]["ranks"]["grid"][encoders[i]], dtype=float).T
            ax, layers = axes[i, t], range(cells.shape[1])  # cells (types, layers), None -> nan
            im = ax.imshow(cells, vmin=0, vmax=top, cmap="magma", aspect="auto")
            ax.set_yticks(range(len(TYPES)), TYPES if t == 0 else [""] * len(TYPES), fontsize=7)
            ax.set_xticks(layers, [str(x) if x % 2 == 0 else "" for x in layers], fontsize=7)
            ax.set_title(done[t] if i == 0 else "", fontsize=9)
            ax.set(ylabel=encoders[i] if t == 0 else "", xlabel="layer" * (i == len(encoders) - 1))
        figs["ranks.png"].colorbar(im, ax=axes, label=f"active ranks (of {top})")
    # drift from the pretrained weights after each task, and each task's own update
    left, right = new("drift.png", (11, 3.8), 1, 2)
    x, rel = range(1, len(reports) + 1), [rep["drift"]["relative"] for rep in reports]
    for e, t in [(e, t) for e in ENCODERS for t in TYPES if t in rel[0].get(e, {})]:
        left.plot(x, [100 * r[e][t] for r in rel], "--" if e == "text" else "-",
                  color=f"C{TYPES.index(t)}", label=f"{e} {t}")
    left.plot(x, [100 * r["total"] for r in rel], "k-", lw=2.5, label="all")
    left.set_ylabel("||W_t - W_pre||_F / ||W_pre||_F (%)")
    left.legend(fontsize=7, ncol=2)
    right.bar(x, [rep["update"]["total"] for rep in reports], color="C0")
    right.set_ylabel("||dW||_F of the task (all matrices)", color="C0")
    amp = right.twinx()
    amp.plot(x, [rep["amplification"]["pooled"] or np.nan for rep in reports], "o-", color="C3")
    amp.set_ylabel("amplification (pooled)", color="C3")
    for ax, title in ((left, "drift from the pretrained weights"), (right, "each task's update")):
        ax.set_xticks(list(x), done, rotation=45, ha="right")
        ax.set(xlabel="after task", title=title)
    for name, fig in figs.items() if out else ():
        fig.savefig(f"{out}/{name}", dpi=120, bbox_inches="tight")
    return figs


def main():
    p = argparse.ArgumentParser(description="Print what changed from CLIP model A to model B.")
    for name in ("A", "B"):
        p.add_argument(name, help="a model name (ViT-B/16), an OpenAI weight file or a checkpoint")
    p.add_argument("--amp-rank", type=int, help="r of the amplification (default: the rank)")
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
