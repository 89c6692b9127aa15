"""Speed of training and evaluation, plain path against the fast one, on random weights and
generated images (no data, no download). Prints one table, all rows measured in this run.

    python bench.py                        # CUDA: ViT-B/16, batch 64; CPU: ViT-B/16, batch 4 (~2-3 min on 2 cores)
    python bench.py --model-size tiny      # the tiny world's CLIP shape, seconds
    python bench.py --compile              # adds torch.compile rows, compile time included

plain = what the released code does: fp32, text on all 77 tokens, every test JPEG decoded at
every evaluation. fast = this project: bf16 autocast on CUDA (fp32 on CPU, as train.py), text cut
to the longest prompt, test images from the uint8 cache. Peak memory: CUDA, the row's own peak
(torch.cuda.max_memory_allocated); CPU, the process's peak so far (maxrss), which never goes down.
"""
import argparse
import contextlib
import copy
import os
import resource
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import clip_model
import codyra
import data
import eval as ev

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
p.add_argument("--model-size", choices=["B/16", "tiny"], default="B/16", help="ViT-B/16 or the tiny world's shape")
p.add_argument("--batch-size", type=int, help="images per step and per evaluation batch (default 64 CUDA, 4 CPU)")
p.add_argument("--iters", type=int, help="timed iterations per row, after one warm-up (default 20 CUDA, 2 CPU)")
p.add_argument("--classes", type=int, help="class prompts per task (default 100 CUDA, 10 CPU)")
p.add_argument("--test-images", type=int, help="generated JPEGs in the evaluation rows (default 4096 CUDA, 32 CPU)")
p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loader processes")
p.add_argument("--compile", action="store_true", help="also time torch.compile'd encoders (compile time included)")
args = p.parse_args()
device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
cuda = device.type == "cuda"
B = args.batch_size or (64 if cuda else 4)
iters = args.iters or (20 if cuda else 2)
C = args.classes or (100 if cuda else 10)
N = args.test_images or (4096 if cuda else 32)
if min(B, iters, C, N) < 1 or args.workers < 0:
    p.error("--batch-size, --iters, --classes and --test-images must be >= 1, --workers >= 0")

# -----------------------------------------------------------------------------
# model, prompts, a test set of generated JPEGs

torch.manual_seed(0)
if args.model_size == "B/16":
    make = lambda: clip_model.CLIP(512, 224, 12, 768, 16, 77, 49408, 512, 8, 12)  # noqa: E731
else:
    import tiny_world
    make = lambda: clip_model.CLIP(**tiny_world.TINY_CLIP)  # noqa: E731
model = make().to(device).eval()
R = model.visual.input_resolution
tokens = clip_model.tokenize([f"a photo of a {w}, a type of object." for w in
                              ("red blue green small large round square old new dark".split() * C)[:C]]).to(device)
L = int(tokens.argmax(-1).max()) + 1
tmp = tempfile.mkdtemp(prefix="codyra_bench_")
rng = np.random.default_rng(0)
paths = []
for i in range(N):  # smooth random images compress and decode like photos, not like noise
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    path = os.path.join(tmp, f"{i}.jpg")
    Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(path, quality=90)
    paths.append(path)
test = data.ImageSet(paths, [i % C for i in range(len(paths))])


def sync():
    if cuda:
        torch.cuda.synchronize()


def encode_text_full(m, toks):
    """The plain path: every one of the 77 positions through the text tower."""
    x = m.token_embedding(toks) + m.positional_embedding  # (N, 77, D)
    x = m.ln_final(m.transformer(x))
    return x[torch.arange(len(x), device=x.device), toks.argmax(-1)] @ m.text_projection  # (N, E)


@contextlib.contextmanager
def full_text(m):
    m.encode_text = lambda toks: encode_text_full(m, toks)
    try:
        yield
    finally:
        del m.encode_text


def peak_mb():
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def timed(fn, n=iters):
    """Seconds per call of fn over n calls after one warm-up, and the peak memory."""
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - start) / n, peak_mb()


def autocast(on):
    return torch.autocast(device.type, torch.bfloat16, enabled=on)

# -----------------------------------------------------------------------------
# training: one CoDyRA step (SPEC section 1 loss), rank 16, all placements


def train_step_fn(m, amp, full):
    params = [q for q in m.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.9999))
    images = torch.randn(B, 3, R, R, device=device)
    labels = torch.randint(0, C, (B,), device=device)

    def step():
        with autocast(amp), (full_text(m) if full else contextlib.nullcontext()):
            img = F.normalize(m.encode_image(images).float(), dim=-1)
            txt = F.normalize(m.encode_text(tokens).float(), dim=-1)
        logits = m.logit_scale.exp() * img @ txt.T
        loss = F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, F.one_hot(labels, C).T.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        codyra.proximal_step(m, 1e-3)
    return step


rows = []  # (what, path, images/s or None, seconds per call, peak MB, plain seconds for the ratio)
fast_amp = cuda
trainee = codyra.inject(copy.deepcopy(model), 16, where=codyra.clip_placement()).train()
s_plain, mem = timed(train_step_fn(trainee, False, True))
rows.append(("training, rank 16, all placements", "plain: fp32, 77-token text", B / s_plain, s_plain, mem, s_plain))
s, mem = timed(train_step_fn(trainee, fast_amp, False))
rows.append(("", f"fast: {'bf16' if fast_amp else 'fp32'}, text cut to {L}", B / s, s, mem, s_plain))
if args.compile:
    trainee.visual.compile()
    trainee.transformer.compile()
    start = time.perf_counter()
    train_step_fn(trainee, fast_amp, False)()
    sync()
    compile_s = time.perf_counter() - start
    s, mem = timed(train_step_fn(trainee, fast_amp, False))
    rows.append(("", f"fast + compile (first step {compile_s:.0f}s)", B / s, s, mem, s_plain))
del trainee

# -----------------------------------------------------------------------------
# evaluation: the whole evaluate() of one test set (text features, loader, forward passes)

task = data.Task("bench", [str(c) for c in range(C)], ["{}"], test, test)
task.classnames = [f"class {c}" for c in range(C)]
task.test = copy.copy(test)
task.test.transform = clip_model.transform(False, R)


def evaluate(dataset, amp, full):
    def run():
        t = copy.copy(task)
        t.test = dataset
        with autocast(amp), (full_text(model) if full else contextlib.nullcontext()):
            ev.evaluate(model, [t], False, device, B, args.workers)
    return run


s_plain, mem = timed(evaluate(task.test, False, True), n=1)
rows.append((f"evaluation, {N} JPEGs 500x375", "plain: fp32, 77 tokens, decode", N / s_plain, s_plain, mem, s_plain))
start = time.perf_counter()
cached = ev.cache_test_set("bench", task.test, R, os.path.join(tmp, "cache"), args.workers)
build_s = time.perf_counter() - start
s, mem = timed(evaluate(cached, fast_amp, False), n=1)
rows.append(("", f"fast: {'bf16' if fast_amp else 'fp32'}, cut, uint8 cache", N / s, s, mem, s_plain))
rows.append(("", "  (building the cache, once)", N / build_s, build_s, peak_mb(), None))


def pipeline(dataset):
    def run():
        for images, _ in torch.utils.data.DataLoader(dataset, batch_size=B, num_workers=args.workers):
            x = images.to(device, non_blocking=True)
            if x.dtype == torch.uint8:
                ev.normalize(x)
    return run


s_plain, mem = timed(pipeline(task.test), n=1)
rows.append(("test images only, no model", "decode + resize + normalise", N / s_plain, s_plain, mem, s_plain))
s, mem = timed(pipeline(cached), n=1)
rows.append(("", "uint8 cache + normalise on device", N / s, s, mem, s_plain))

# -----------------------------------------------------------------------------
# text tower: cut vs 77 tokens; inference: never-injected vs injected vs merged


@torch.no_grad()
def text(full, amp):
    def run():
        with autocast(amp):
            return encode_text_full(model, tokens) if full else model.encode_text(tokens)
    return run


s_plain, mem = timed(text(True, False))
rows.append((f"text tower, {C} prompts", "plain: fp32, 77 tokens", C / s_plain, s_plain, mem, s_plain))
s, mem = timed(text(False, fast_amp))
rows.append(("", f"fast: {'bf16' if fast_amp else 'fp32'}, cut to {L}", C / s, s, mem, s_plain))
same = torch.allclose(text(True, False)(), text(False, False)(), atol=1e-4)

images = torch.randn(B, 3, R, R, device=device)


@torch.no_grad()
def infer(m):
    def run():
        with autocast(fast_amp):
            m.encode_image(images)
    return run


injected = codyra.inject(copy.deepcopy(model), 16, where=codyra.clip_placement()).eval()
for _, layer in codyra._adapters(injected):
    torch.nn.init.normal_(layer.lora_B, std=1e-3)  # so that merging changes the weights
merged = codyra.merge(copy.deepcopy(injected))
s_plain, mem = timed(infer(model))
rows.append(("image inference", "never-injected CLIP", B / s_plain, s_plain, mem, s_plain))
s, mem = timed(infer(injected))
rows.append(("", "adapters live (before merge)", B / s, s, mem, s_plain))
s, mem = timed(infer(merged))
rows.append(("", "merged", B / s, s, mem, s_plain))

# -----------------------------------------------------------------------------
# report

flash = ""
if cuda:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.no_grad(), autocast(True):
            model.encode_image(images[:2])
            model.encode_text(tokens[:2])
        flash = ", flash attention: both towers"
    except RuntimeError as e:
        flash = f", flash attention: NOT usable ({str(e).splitlines()[0][:60]})"
name = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
print(f"bench: CLIP {args.model_size} (random weights, {R} px), {name}, torch {torch.__version__}, batch {B}, "
      f"{iters} timed iterations (+1 warm-up), {C} class prompts{flash}")
print(f"{'':36}{'path':40}{'items/s':>10}{'ms/call':>10}{'peak MB':>10}{'vs plain':>10}")
for what, path, rate, s, mem, base in rows:
    ratio = f"{base / s:.2f}x" if base else ""
    print(f"{what:36}{path:40}{rate:>10.1f}{1000 * s:>10.0f}{mem:>10.0f}{ratio:>10}")
print("items: images (training, evaluation, inference), prompts (text tower); vs plain: plain time / this time. "
      f"cut and 77-token text features equal: {same}")
