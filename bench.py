"""Speed, on random weights and generated images (no data, no download), two ways.

The speed table, every row measured in this run: the plain path (the released code: fp32,
77-token text, every test JPEG decoded at every evaluation) against the fast one (this project:
text cut to the longest prompt, test images from the uint8 cache; in fp32, train.py's default
--precision, and on CUDA also bf16 autocast). Peak MB: CUDA, the row's own; CPU, the process's.

    python bench.py                        # ViT-B/16: batch 64 (CUDA), 4 (CPU, ~3 min)
    python bench.py --model-size tiny      # the tiny world's CLIP shape, seconds
    python bench.py --compile              # adds torch.compile rows, compile time included

The dry run (dryrun.py): `train.py --setting mtil` (or xtail) end to end on a synthetic copy of
the benchmark with random weights; a table of every phase.

    python bench.py --sequence mtil                    # CUDA: all of it (scale 1)
    python bench.py --sequence mtil --scale 0.01       # 1% of the images and iterations, projected
"""
import argparse
import contextlib
import copy
import functools
import os
import sys
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

import clip_model
import codyra
import data
import dryrun
import eval as evaluation
import loop

SIZES = {**clip_model.CONFIGS, "micro": {  # one block per tower, 64 wide: for the dry run's test
    **clip_model.CONFIGS["tiny"], "embed_dim": 64, "vision_layers": 1, "vision_width": 64,
    "transformer_width": 64, "transformer_heads": 1, "transformer_layers": 1}}
p = argparse.ArgumentParser(description="Time training and evaluation: the plain path against "
                                        "the fast one, or a dry run of a whole sequence.")
p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
p.add_argument("--model-size", choices=list(SIZES), help="default ViT-B/16; the dry run "
               "on a CPU: tiny (ViT-B/16 at --scale 0.01 needs over an hour on two cores)")
p.add_argument("--batch-size", type=int, help="images per step and batch (default 64 CUDA, 4 CPU; "
               "the dry run: train.py's, 64)")
p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader processes")
group = p.add_argument_group("the speed table")
group.add_argument("--iters", type=int,
                   help="timed iterations a row, after a warm-up (20 CUDA, 2 CPU)")
group.add_argument("--classes", type=int, help="class prompts per task (default 100 CUDA, 10 CPU)")
group.add_argument("--test-images", type=int, help="JPEGs to evaluate (default 4096 CUDA, 32 CPU)")
group.add_argument("--compile", action="store_true", help="also time torch.compile'd encoders")
group = p.add_argument_group("the dry run")
group.add_argument("--sequence", choices=list(data.BENCHMARKS), help="run the dry run of it")
group.add_argument("--scale", type=float, help="share of the images (at least one per class and "
                   "split) and of the iterations, in (0, 1]; default 1 on CUDA, 0.01 on a CPU")
group.add_argument("--iterations", type=int, help="per task (default: 500 x scale, at least 1)")
group.add_argument("--root", default="~/.cache/codyra/dryrun",
                   help="where the synthetic benchmarks, weights and test-image caches are kept")
group.add_argument("--out", help="train.py's --out (default: in the benchmark's folder)")
args = p.parse_args()
device = evaluation.pick_device(args.device)
cuda = device.type == "cuda"
if args.sequence:  # NOTE: `not 0 < scale <= 1` refuses NaN too (every comparison with it fails)
    args.scale = (1.0 if cuda else 0.01) if args.scale is None else args.scale
    if not 0 < args.scale <= 1 or any(n is not None and n < 1
                                      for n in (args.iterations, args.batch_size)):
        p.error("--scale must lie in (0, 1], --iterations and --batch-size be >= 1")
    size = args.model_size or ("ViT-B/16" if cuda else "tiny")
    sys.exit(dryrun.main(args, device, size, SIZES[size]))

# --- the speed table: model, prompts, a batch of images, a test set of generated JPEGs
size = args.model_size or "ViT-B/16"
B, iters = args.batch_size or (64 if cuda else 4), args.iters or (20 if cuda else 2)
C, N = args.classes or (100 if cuda else 10), args.test_images or (4096 if cuda else 32)
if args.workers < 0 or any(n is not None and n < 1 for n in (  # 0 is not "the default"
        args.batch_size, args.iters, args.classes, args.test_images)):
    p.error("--batch-size, --iters, --classes and --test-images must be >= 1, --workers >= 0")
AMP = {"fp32": False, "bf16": True} if cuda else {"fp32": False}  # a fast row each: autocast?
autocast = functools.partial(torch.autocast, device.type, torch.bfloat16)  # autocast(enabled=...)
rows = []  # (what, path, items/s, seconds per call, peak MB, plain seconds for the ratio)

torch.manual_seed(0)
model = clip_model.CLIP(**SIZES[size]).to(device).eval()
R = model.visual.input_resolution
words = "red blue green small large round square old new dark".split() * C
tokens = clip_model.tokenize([f"a photo of a {w}, a type of object." for w in words[:C]]).to(device)
L = int(tokens.argmax(-1).max()) + 1
pixels = torch.randint(0, 256, (B, 3, R, R), dtype=torch.uint8, device=device)  # one batch
tmp, rng = tempfile.mkdtemp(prefix="codyra_bench_"), np.random.default_rng(0)
paths = [os.path.join(tmp, f"{i}.jpg") for i in range(N)]
for path in paths:
    dryrun.jpeg(rng, (500, 375), Path(path))
test = data.ImageSet(paths, [i % C for i in range(N)], clip_model.preprocess(False, R))


def encode_text_full(m, toks):  # the plain path: every one of the 77 positions through the tower
    x = m.ln_final(m.transformer(m.token_embedding(toks) + m.positional_embedding))  # (N, 77, D)
    return x[torch.arange(len(x), device=x.device), toks.argmax(-1)] @ m.text_projection


def full_text(m, on=True):  # within it, when on, m.encode_text takes the plain path
    return (mock.patch.object(m, "encode_text", functools.partial(encode_text_full, m)) if on
            else contextlib.nullcontext())


def inference(fn, *args, amp=False, full=False):  # fn(*args) as a call to time, no autograd
    def run():
        with torch.no_grad(), autocast(enabled=amp), full_text(model, full):
            return fn(*args)
    return run


def row(what, path, items, fn, n=iters):
    """Time fn's n calls after a warm-up, a row: its group's plain one if `what` names a group."""
    warm, timed = (dryrun.clock(f, cuda) for f in (fn, lambda: [fn() for _ in range(n)]))
    s = timed[1] / n  # per call; the peak memory of both
    plain = s if what else next(r[3] for r in reversed(rows) if r[0])
    rows.append((what, path, items / s, s, max(warm[2], timed[2]), plain))


def evaluate(images):  # the whole evaluate() of one test set, as a call to time
    task = data.Task("bench", [f"class {c}" for c in range(C)], ["{}"], None, images)
    return lambda: evaluation.evaluate(model, [task], False, device, B, args.workers)


# --- training: one CoDyRA step (train.py's loss), rank 16, all placements
def train_step(m, amp, full):
    opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-5,
                            betas=(0.9, 0.9999))
    labels = torch.randint(0, C, (B,), device=device)
    def step():
        with autocast(enabled=amp), full_text(m, full):
            img = F.normalize(m.encode_image(clip_model.normalize(pixels)).float(), dim=-1)
            txt = F.normalize(m.encode_text(tokens).float(), dim=-1)
        loss = loop.contrastive_loss(img, txt, labels, m.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        codyra.proximal_step(m, 1e-3)
    return step


trainee = codyra.inject(copy.deepcopy(model), 16, where=codyra.clip_placement()).train()
row("training, rank 16, all placements", "plain: fp32, 77-token text", B,
    train_step(trainee, False, True))
for prec, amp in AMP.items():
    row("", f"fast: {prec}, text cut to {L}", B, train_step(trainee, amp, False))
if args.compile:
    trainee.visual.compile()
    trainee.transformer.compile()
    first = dryrun.clock(train_step(trainee, False, False), cuda)[1]
    row("", f"fast: fp32 + compile (first step {first:.0f}s)", B, train_step(trainee, False, False))
del trainee

# --- evaluation: the whole evaluate() of one test set (text features, loader, forward passes)
row(f"evaluation, {N} JPEGs 500x375", "plain: fp32, 77 tokens, decode", N,
    inference(evaluate(test), amp=False, full=True), n=1)
cached, build_s, mb = dryrun.clock(lambda: test.cached("bench", f"{tmp}/cache", args.workers), cuda)
for prec, amp in AMP.items():
    row("", f"fast: {prec}, cut, uint8 cache", N, inference(evaluate(cached), amp=amp), n=1)
rows.append(("", "  (building the cache, once)", N / build_s, build_s, mb, None))

# --- text tower: cut vs 77 tokens; image inference: never-injected vs injected vs merged
row(f"text tower, {C} prompts", "plain: fp32, 77 tokens", C,
    inference(encode_text_full, model, tokens, amp=False))
for prec, amp in AMP.items():
    row("", f"fast: {prec}, cut to {L}", C, inference(model.encode_text, tokens, amp=amp))
with torch.no_grad():
    same = torch.allclose(encode_text_full(model, tokens), model.encode_text(tokens), atol=1e-4)
injected = codyra.inject(copy.deepcopy(model), 16, where=codyra.clip_placement()).eval()
for _, layer in codyra.adapters(injected):
    torch.nn.init.normal_(layer.lora_B, std=1e-3)  # so that merging changes the weights
for what, path, m in (("image inference", "never-injected CLIP", model),
                      ("", "adapters live (before merge)", injected),
                      ("", "merged", codyra.merge(copy.deepcopy(injected)))):
    row(what, path, B, inference(m.encode_image, clip_model.normalize(pixels)))

# --- report
name = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
print(f"bench: CLIP {size} (random weights, {R} px), {name}, torch {torch.__version__}, "
      f"batch {B}, {iters} timed iterations (+1 warm-up), {C} class prompts")
print(f"{'':36}{'path':40}{'items/s':>10}{'ms/call':>10}{'peak MB':>10}{'vs plain':>10}")
for what, path, rate, s, mem, base in rows:
    ratio = f"{base / s:.2f}x" if base else ""
    print(f"{what:36}{path:40}{rate:>10.1f}{1000 * s:>10.0f}{mem:>10.0f}{ratio:>10}")
print("items: images (training, evaluation, inference), prompts (text tower); vs plain: plain "
      f"time / this time. Cut and 77-token text features equal: {same}")
