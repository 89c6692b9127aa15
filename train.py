"""Continual learning of CLIP with CoDyRA: learn each task of a setting in turn, merge the
surviving ranks into the weights, evaluate on every dataset, print the paper's tables.

    python train.py                                   # the offline tiny world (CPU, minutes)
    python train.py --setting mtil --shots 5          # paper Table 2 (ViT-B/16, GPU)
    python train.py --setting xtail --shots 16        # paper Table 1
    python train.py --setting mtil --method lora      # same adapters, no rank selection
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import analysis
import clip_model
import codyra
import data
from eval import (add_common_args, check_common_args, class_features, compile_encoders, compute_metrics,
                  evaluate, format_matrix, format_table, load_model, pick_device, prepare_test_sets, write_json)

# -----------------------------------------------------------------------------
# config

p = argparse.ArgumentParser(description="Continual learning of CLIP with CoDyRA.")
groups = add_common_args(p, extra_groups=("adapter", "optimisation"))
g = groups["data"]
g.add_argument("--shots", type=int, help="training images per class (default: the setting's, 5 MTIL, 16 X-TAIL)")
g = groups["adapter"]
g.add_argument("--method", choices=["codyra", "lora", "full"], default="codyra",
               help="codyra: LoRA with proximal rank selection; lora: the same adapters without it; "
                    "full: full fine-tuning")
g.add_argument("--rank", type=int, default=16, help="LoRA rank r per adapted matrix")
g.add_argument("--encoders", choices=["vision", "text", "both"], default="both", help="encoders to adapt")
g.add_argument("--layers", default="q,k,v,out,c_fc,c_proj", help="comma-separated linear types to adapt")
g.add_argument("--kappa-max", type=float, default=0.005, help="final soft-threshold tau (absolute units of g)")
g.add_argument("--dense-ratio", type=float, help="fraction of iterations before thresholding starts "
                                                   "(default: the setting's, 0.7 MTIL, 0.5 X-TAIL)")
g = groups["optimisation"]
g.add_argument("--iterations", type=int, help="optimizer steps per task (default 500; the tiny world's own)")
g.add_argument("--batch-size", type=int, help="images per step (default 64; the tiny world's own)")
g.add_argument("--lr", type=float, help="peak learning rate, cosine to 0 per task (default 5e-4, 1e-5 for full; the tiny world's own)")
g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
g = groups["system"]
g.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished task")
g.add_argument("--plot", action="store_true", help="write PNG figures into --out after each task (needs matplotlib)")
args = p.parse_args()
check_common_args(p, args)
setting = data.SETTINGS[args.setting]
for name, default in (("shots", None), ("dense_ratio", None), ("iterations", 500), ("batch_size", 64)):
    if getattr(args, name) is None:  # the setting's own default, else the paper's
        setattr(args, name, setting.get(name, default))
if args.lr is None:  # the paper's 5e-4 for adapters; ZSCL's 1e-5 for full fine-tuning (5e-4 wrecks CLIP)
    args.lr = setting.get("lr_full", 1e-5) if args.method == "full" else setting.get("lr", 5e-4)
if min(args.shots, args.rank, args.iterations, args.batch_size) < 1:
    p.error("--shots, --rank, --iterations and --batch-size must be >= 1")
if not 0 <= args.dense_ratio <= 1:
    p.error(f"--dense-ratio must lie in [0, 1], got {args.dense_ratio}")
if args.kappa_max < 0 or args.lr <= 0:
    p.error("--kappa-max must be >= 0 and --lr > 0")
try:
    placement = codyra.clip_placement(args.encoders, tuple(args.layers.split(",")))
except ValueError as e:
    p.error(str(e))

results_path, ckpt_path = os.path.join(args.out, "results.json"), os.path.join(args.out, "checkpoint.pt")
if os.path.exists(results_path) and not (args.resume or args.overwrite):
    p.error(f"{results_path} holds another run; pass --resume to continue it, --overwrite to replace it, "
            "or choose another --out")
if args.resume and not os.path.exists(ckpt_path):
    p.error(f"--resume: no checkpoint at {ckpt_path}")
if args.plot and not analysis.can_plot():
    print("--plot: matplotlib is not installed (pip install matplotlib), so no figures will be written")
    args.plot = False
os.makedirs(args.out, exist_ok=True)
device = pick_device(args.device)
autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")

# -----------------------------------------------------------------------------
# data and model

try:
    # every dataset of the run is checked here, so a run never dies at task 9 after hours
    tasks = data.load_tasks(args.setting, args.data_dir, shots=args.shots, seed=args.seed,
                            datasets=args.datasets, download=args.download)
    model = load_model(ckpt_path if args.resume else args.model, args.setting)
    original = load_model(args.model, args.setting) if args.resume else model
except (data.DataError, clip_model.CLIPLoadError) as e:
    sys.exit(f"error: {e}")
model = model.to(device)
pretrained = analysis.weights(original.to(device), placement)  # W_pre, for the drift of every task
del original
names = [t.name for t in tasks]
resolution = model.visual.input_resolution
for task in tasks:
    task.train.transform = clip_model.transform(True, resolution)
prepare_test_sets(tasks, resolution, args.cache_dir, args.workers)  # decoded once, reused by every evaluation
if args.compile:
    compile_encoders(model)
union = args.eval_style == "union"

# -----------------------------------------------------------------------------
# one task: inject fresh adapters, train, merge


def batches(dataset, seed):
    """Endless shuffled batches; the order depends only on (seed, task), never on what ran before."""
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        generator=torch.Generator().manual_seed(seed), pin_memory=device.type == "cuda",
                        persistent_workers=args.workers > 0)
    while True:
        yield from loader


def train_task(t, task, seen_text):
    """Learn one task (SPEC section 1). seen_text: (P, E) features of earlier tasks' classes."""
    torch.manual_seed(args.seed + 1000 * t)
    before = None
    if args.method == "full":
        before = analysis.weights(model, placement)  # the update of this task is measured against it
        for name, param in model.named_parameters():
            param.requires_grad = name != "logit_scale"
    else:
        codyra.inject(model, args.rank, where=placement)
    g_init = analysis.gates(model)  # which ranks survive is largely decided by |g| at init (SPEC section 1)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.9999), eps=1e-8,
                                  weight_decay=args.weight_decay)
    cosine = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * i / args.iterations)))
    # the current classes' prompts go through the text encoder WITH gradients: its adapters learn too
    tokens = clip_model.tokenize([task.templates[0].format(c) for c in task.classnames]).to(device)
    stream = batches(task.train, args.seed + 1000 * t)
    model.train()
    start, shown, tau = time.time(), 0.0, 0.0
    for it in range(args.iterations):
        images, labels = next(stream)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast:
            img = F.normalize(model.encode_image(images).float(), dim=-1)  # (B, E)
            txt = F.normalize(model.encode_text(tokens).float(), dim=-1)   # (C, E)
        scale = model.logit_scale.exp()
        ce_i = F.cross_entropy(scale * img @ txt.T, labels)                # image -> current classes
        classes = torch.cat([seen_text, txt])                              # (P + C, E)
        targets = F.one_hot(labels + len(seen_text), len(classes)).T.float()  # (P + C, B)
        ce_t = F.cross_entropy(scale * classes @ img.T, targets)           # class -> its images
        loss = ce_i + ce_t
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        cosine.step()
        if args.method == "codyra":  # Eq. 7: proximal step on every g, right after the optimizer
            tau = codyra.threshold_schedule(it, args.iterations, args.dense_ratio, args.kappa_max)
            codyra.proximal_step(model, tau)
        now = time.time()
        if now - shown > (1 if sys.stdout.isatty() else 30) or it == args.iterations - 1:
            shown = now
            ranks = codyra.rank_stats(model)
            rank = f"ranks {sum(ranks.values()) / len(ranks):.1f}/{args.rank} | " if ranks else ""
            speed = (it + 1) * args.batch_size / (now - start)
            left = (args.iterations - it - 1) * (now - start) / (it + 1)
            print(f"\rtask {t + 1}/{len(tasks)} {task.name} | it {it + 1}/{args.iterations} | "
                  f"loss {loss.item():.3f} | tau {tau:.4f} | {rank}{speed:.0f} img/s | {left:.0f}s left ",
                  end="" if sys.stdout.isatty() else "\n", flush=True)
    if sys.stdout.isatty():
        print()
    report = analysis.task_report(model, g_init, pretrained, before)  # needs the adapters: before merge
    codyra.merge(model)  # W0 <- W0 + B diag(g) A: the next task starts from these weights
    return report

# -----------------------------------------------------------------------------
# the sequence: train task t, evaluate on every dataset (row t of the accuracy matrix), save

results = {"setting": args.setting, "datasets": names, "acc": [], "analysis": [], "seconds": [], "args": vars(args)}
if args.resume:
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    # a resumed run must be the same experiment; only how it runs may change
    how = {"resume", "overwrite", "device", "workers", "cache_dir", "compile", "plot", "eval_batch_size"}
    changed = [k for k, v in ckpt["results"]["args"].items() if k not in how and vars(args).get(k) != v]
    if changed:
        p.error(f"--resume: {', '.join('--' + k.replace('_', '-') for k in changed)} differ from the run "
                f"in {args.out}; pass the same values, or start a new run with another --out")
    results.update(acc=ckpt["results"]["acc"], analysis=ckpt["results"]["analysis"],
                   seconds=ckpt["results"]["seconds"])
    print(f"resuming after task {len(results['acc'])}/{len(tasks)} from {ckpt_path}")
for t in range(len(results["acc"]), len(tasks)):
    task = tasks[t]
    start = time.time()
    with autocast:  # the earlier classes' prompts, fixed during this task (no gradient)
        seen_text = torch.cat([class_features(model, s.classnames, s.templates[:1], device) for s in tasks[:t]]
                              or [torch.zeros(0, model.text_projection.shape[1], device=device)])
    report = train_task(t, task, seen_text)
    trained = time.time()
    with autocast:
        row = evaluate(model, tasks, union, device, args.eval_batch_size, args.workers)
    results["acc"].append(row)
    results["analysis"].append(report)
    results["seconds"].append({"train": trained - start, "eval": time.time() - trained})
    # checkpoint first (it holds the results too), then the readable copy; both atomic
    torch.save({"model": model.state_dict(), "task": t + 1, "results": results}, ckpt_path + ".tmp")
    os.replace(ckpt_path + ".tmp", ckpt_path)
    write_json(results_path, results)
    print(format_matrix(results["acc"], names))
    print(analysis.format_report(report))
    if args.plot:
        analysis.plot(results, args.out)

# -----------------------------------------------------------------------------
# report

results["metrics"] = compute_metrics(results["acc"])
write_json(results_path, results)
print(f"\n{args.method} on {args.setting}: accuracy (%) after the whole sequence")
print(format_table(results["metrics"], names))
if args.method != "full":
    kept = [r["ranks"]["mean"] for r in results["analysis"]]
    print("mean active rank per task: " + " ".join(f"{k:.1f}" for k in kept) + f"  (of {args.rank})")
print(f"wrote {results_path}")
