"""The tiny world, to run the method offline on a CPU: generated domains (`tasks()`, and a held-out
one, HOLDOUT) and a small CLIP pretrained on generated scenes (`pretrained()`: the one shipped in
assets/, which `python tiny_world.py --ship` makes again): 1-4 equal shapes on dark or light,
grey or tinted, plain or patterned backgrounds, captioned with some of their attributes, never a
digit. The domains are drawn in other styles, so zero-shot works only partly; `digits` is new."""
import argparse
import hashlib
import json
import math
import os
import platform
import time
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import clip_model
from data import ImageSet, Task

# --- the world: image size, vocabulary, pretraining captions and recipe
RES = 32  # image side in pixels (clip_model.CONFIGS["tiny"] takes 32 px images)
COLOURS = {"red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (235, 220, 40),
           "green": (40, 170, 60), "blue": (40, 90, 230), "purple": (140, 50, 200),
           "pink": (245, 130, 200), "white": (245, 245, 245)}
SHAPES = ["circle", "square", "triangle", "diamond", "star", "cross", "ring", "heart"]
COUNTS = ["one", "two", "three", "four", "five", "six"]
PATTERNS = ["striped", "checkered", "dotted", "grid", "zigzag"]
PRETRAIN_PATTERNS = ["striped", "checkered", "dotted"]  # grid and zigzag: downstream only
PRETRAIN_MAX_COUNT = 4                                   # "five" and "six": downstream only
MENTION = dict(shape=0.9, colour=0.6, size=0.4, position=0.6, background=0.6)  # P(captioned)
CAPTIONS = ["a photo of {}.", "a picture of {}.", "a drawing of {}.", "{}.", "there is {}.",
            "an image showing {}."]  # templates
_POSITION_NAMES = [["top left", "top", "top right"], ["left", "center", "right"],
                   ["bottom left", "bottom", "bottom right"]]
WORLD_VERSION = 2  # NOTE: bump when the generator or the recipe changes: stale caches go unused
PRETRAIN = dict(steps=5000, batch_size=64, lr=1e-3, warmup=50, weight_decay=0.1)
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny_clip.pt")
# --- drawing: every mask is a float coverage (RES, RES) in [0, 1], alpha-blended onto a canvas
SUPERSAMPLE = 2  # masks are drawn at RES * SUPERSAMPLE per side and averaged (anti-aliasing)
_HI = RES * SUPERSAMPLE
_PIXEL_CENTRES = (np.mgrid[0:_HI, 0:_HI].astype(np.float32) + 0.5) / SUPERSAMPLE  # (y/x, _HI, _HI)


def _downsample(m):  # (_HI, _HI) 0/1 mask -> (RES, RES) coverage
    return m.reshape(RES, SUPERSAMPLE, RES, SUPERSAMPLE).mean(axis=(1, 3), dtype=np.float32)


def shape_mask(shape, cx, cy, radius, angle=0.0):
    """A shape (one of SHAPES) centred at (cx, cy) pixels, rotated by angle (radians)."""
    dy, dx = (_PIXEL_CENTRES[0] - cy) / radius, (_PIXEL_CENTRES[1] - cx) / radius
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy  # in radii, v pointing down
    r2 = u * u + v * v
    if shape == "circle":
        return _downsample(r2 <= 1)
    if shape == "square":
        return _downsample(np.maximum(abs(u), abs(v)) <= 0.8)
    if shape == "triangle":  # equilateral, pointing up
        return _downsample((v <= 0.5) & (np.sqrt(3) * u - v <= 1) & (-np.sqrt(3) * u - v <= 1))
    if shape == "diamond":
        return _downsample(abs(u) / 0.8 + abs(v) <= 1)
    if shape == "star":  # 5 points; radius falls linearly from 1 at a tip to 0.45 between tips
        frac = ((np.arctan2(u, -v) / (2 * np.pi / 5)) % 1.0 - 0.5) * 2  # -1..1, 0 between tips
        return _downsample(np.sqrt(r2) <= 0.45 + 0.55 * abs(frac))
    if shape == "cross":
        return _downsample(((abs(u) <= 1) & (abs(v) <= 0.3)) | ((abs(u) <= 0.3) & (abs(v) <= 1)))
    if shape == "ring":
        return _downsample((r2 <= 1) & (r2 >= 0.55 ** 2))
    if shape == "heart":
        x, y = 1.25 * u, -1.25 * v + 0.25
        return _downsample((x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0)
    raise ValueError(shape)


def pattern(kind, period, angle, phase):  # a full-image pattern (one of PATTERNS); period in pixels
    c, s = np.cos(angle), np.sin(angle)
    y, x = _PIXEL_CENTRES
    u, v = (c * x + s * y) / period + phase, (-s * x + c * y) / period + phase
    fu, fv = u % 1.0, v % 1.0  # where in its period each pixel is
    return _downsample({"striped": fu < 0.5,  # all five are cheap: compute them, keep one
                        "checkered": (np.floor(u) + np.floor(v)) % 2 == 0,
                        "dotted": (fu - 0.5) ** 2 + (fv - 0.5) ** 2 < 0.22 ** 2,
                        "grid": (fu < 0.2) | (fv < 0.2),
                        "zigzag": (v + 0.5 * abs(2 * fu - 1)) % 1.0 < 0.4}[kind])


def _arc(cx, cy, rx, ry, a0, a1, n=10):  # points of an elliptic arc; degrees, 0 right, 90 down
    return [(cx + rx * np.cos(t), cy + ry * np.sin(t)) for t in np.radians(np.linspace(a0, a1, n))]


def _paint(canvas, mask, rgb):  # a float (RES, RES, 3) canvas with a colour alpha-blended in
    return canvas + mask[..., None] * (np.asarray(rgb, dtype=np.float32) - canvas)


def _to_uint8(canvas, rng=None, noise=0):  # rounded to pixels, after Gaussian noise of std noise
    noisy = canvas + rng.normal(0, noise, canvas.shape).astype(np.float32) if noise else canvas
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _jitter(rng, rgb, amount):  # a colour plus Gaussian noise of std amount, kept in 0..255
    return np.clip(np.asarray(rgb, dtype=np.float32) + rng.normal(0, amount, 3), 0, 255)


def _positions(rng, k, radius):  # k centres in distinct cells of a 3x3 grid, jittered in them
    cells, cell = rng.choice(9, size=k, replace=False), RES / 3
    slack = max(cell / 2 - radius, 0)
    return [((c % 3 + 0.5) * cell + rng.uniform(-slack, slack),
             (c // 3 + 0.5) * cell + rng.uniform(-slack, slack)) for c in cells]


# --- pretraining scenes and their captions
def _count(rng):  # one object half the time: a ViT learns shapes slowly, and best from large ones
    return 1 if rng.random() < 0.5 else int(rng.integers(2, PRETRAIN_MAX_COUNT + 1))


def pretrain_example(rng, shape=None, colour=None, k=None):
    """One scene: (uint8 image (RES, RES, 3), caption); attributes not given are drawn."""
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    colour = colour or list(COLOURS)[rng.integers(len(COLOURS))]
    k = k or _count(rng)
    large = k == 1 and rng.random() < 0.6
    radius = rng.uniform(9, 12) if large else rng.uniform(4, 5.5)
    # a broad "web": dark scenes mostly, light ones too, grey or tinted, half of them noisy
    light = rng.random() < 0.3
    low, high = (150, 240) if light else (0, 80)
    tint = rng.uniform(low, high, 3) if rng.random() < 0.3 else (rng.uniform(low, high),) * 3
    canvas = np.full((RES, RES, 3), _jitter(rng, tint, 12), np.float32)
    background = None
    if rng.random() < 0.35:
        background = PRETRAIN_PATTERNS[rng.integers(len(PRETRAIN_PATTERNS))]
        m = pattern(background, rng.uniform(5, 9), rng.choice([0, np.pi / 2, np.pi / 4]),
                    rng.random())
        ink = (canvas[0, 0] + rng.uniform(40, 70) * (-1 if light else 1) if rng.random() < 0.5
               else rng.uniform(0, 255, 3))  # a shade of the background, or any colour
        canvas = _paint(canvas, m, ink)
    centres = ([(RES / 2 + rng.uniform(-3, 3), RES / 2 + rng.uniform(-3, 3))] if large
               else _positions(rng, k, radius))
    rgb = _jitter(rng, COLOURS[colour], 10)
    for cx, cy in centres:
        canvas = _paint(canvas, shape_mask(shape, cx, cy, radius, rng.normal(0, 0.1)), rgb)
    # the caption names a random subset of the attributes (always the shape or the colour)
    say_shape, say_colour = rng.random() < MENTION["shape"], rng.random() < MENTION["colour"]
    say_number = rng.random() < (0.2 if k == 1 else 0.8)  # else "a" or "some"
    words = [COUNTS[k - 1] if say_number else "a" if k == 1 else "some"]
    if rng.random() < MENTION["size"]:
        words.append("large" if large else "small")
    noun = shape if say_shape or not say_colour else "object"
    noun += ("es" if noun == "cross" else "s") if k > 1 else ""
    words += [colour, noun] if say_colour else [noun]
    if k == 1 and not large and rng.random() < MENTION["position"]:
        column, row = (min(int(c // (RES / 3)), 2) for c in centres[0])  # in a 3x3 grid
        words.append("at the " + _POSITION_NAMES[row][column])
    if background and rng.random() < MENTION["background"]:
        words.append(f"on a {background} " + ("background" if rng.random() < 0.5 else "pattern"))
    words[0] = "an" if words[0] == "a" and words[1][0] in "aeiou" else words[0]
    caption = CAPTIONS[rng.integers(len(CAPTIONS))].format(" ".join(words))
    return _to_uint8(canvas, rng, rng.uniform(0, 20) if rng.random() < 0.5 else 0), caption


def pretrain_batch(rng, n):
    """n scenes (uint8 (n, RES, RES, 3), captions) in pairs that differ in one attribute, mostly the
    shape: hard negatives, as colour alone tells most scenes apart and would be learned first."""
    pairs, colours = [], list(COLOURS)
    while len(pairs) < n:
        shape, colour = SHAPES[rng.integers(len(SHAPES))], colours[rng.integers(len(COLOURS))]
        k = _count(rng)
        pairs.append(pretrain_example(rng, shape, colour, k))
        change = rng.random()
        if change < 0.6:
            shape = SHAPES[(SHAPES.index(shape) + rng.integers(1, len(SHAPES))) % len(SHAPES)]
        elif change < 0.8:
            colour = colours[(colours.index(colour) + rng.integers(1, len(colours))) % len(colours)]
        else:
            k = k % PRETRAIN_MAX_COUNT + 1
        pairs.append(pretrain_example(rng, shape, colour, k))
    return np.stack([p[0] for p in pairs[:n]]), [p[1] for p in pairs[:n]]


# --- downstream domains: draw(rng, label) -> uint8 (RES, RES, 3)
def draw_shapes(rng, label):
    """One shape, any colour but white, rotated, on a noisy background."""
    canvas = np.full((RES, RES, 3), _jitter(rng, (rng.uniform(20, 100),) * 3, 20), np.float32)
    rgb = _jitter(rng, list(COLOURS.values())[rng.integers(len(COLOURS) - 1)], 25)
    r = rng.uniform(7, 12)
    cx, cy = RES / 2 + rng.uniform(-16 + r, 16 - r), RES / 2 + rng.uniform(-16 + r, 16 - r)
    canvas = _paint(canvas, shape_mask(SHAPES[label], cx, cy, r, rng.normal(0, 0.2)), rgb)
    return _to_uint8(canvas, rng, noise=20)


def draw_colours(rng, label):
    """One or two irregular blobs of a colour (shade varies) on a mid-grey noisy canvas."""
    canvas = np.full((RES, RES, 3), _jitter(rng, (rng.uniform(90, 150),) * 3, 10), np.float32)
    rgb = np.asarray(list(COLOURS.values())[label], dtype=np.float32) * rng.uniform(0.7, 1.05)
    for _ in range(int(rng.integers(1, 3))):
        cx, cy, size = rng.uniform(8, 24), rng.uniform(8, 24), rng.uniform(4, 7)
        discs = [shape_mask("circle", cx + rng.normal(0, size / 2), cy + rng.normal(0, size / 2),
                            rng.uniform(size / 2, size)) for _ in range(int(rng.integers(3, 6)))]
        canvas = _paint(canvas, np.max(discs, axis=0), _jitter(rng, rgb, 15))  # a blob: their union
    return _to_uint8(canvas, rng, noise=12)


def draw_counts(rng, label):
    """label+1 small discs, squares or diamonds of one colour on a tinted, noisy table."""
    canvas = np.full((RES, RES, 3), _jitter(rng, rng.uniform(30, 90, 3), 5), np.float32)
    shape = ["circle", "square", "diamond"][rng.integers(3)]
    rgb = _jitter(rng, list(COLOURS.values())[rng.integers(len(COLOURS))], 20)
    r = rng.uniform(3.5, 4.5)
    for cx, cy in _positions(rng, label + 1, r):
        canvas = _paint(canvas, shape_mask(shape, cx, cy, r), rgb)
    return _to_uint8(canvas, rng, noise=10)


def draw_patterns(rng, label):
    """A full-image pattern in two random colours, random scale, orientation and phase."""
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    while np.abs(c1 - c2).sum() < 200:  # keep enough contrast to see the pattern
        c2 = rng.uniform(0, 255, 3)
    m = pattern(PATTERNS[label], rng.uniform(5, 10), rng.uniform(0, np.pi), rng.random())
    return _to_uint8(_paint(np.full((RES, RES, 3), c1, np.float32), m, c2), rng, noise=8)


def draw_digits(rng, label):
    """A pen-drawn digit (random affine, pen width), white on black, MNIST-like: its strokes
    (DIGIT_STROKES) mapped by p -> matrix @ p + offset, each pixel inked near enough to one."""
    angle, shear, scale = rng.normal(0, 0.15), rng.normal(0, 0.15), rng.uniform(18, 24)
    c, s = np.cos(angle), np.sin(angle)
    matrix = scale * np.array([[c, -s], [s, c]]) @ np.array([[1, shear], [0, 1]]) \
        @ np.diag([rng.uniform(0.8, 1.1), 1.0])
    offset = np.array([RES / 2, RES / 2]) - matrix @ np.array([0.5, 0.5]) + rng.uniform(-2, 2, 2)
    p = _PIXEL_CENTRES[::-1].reshape(2, -1).T  # (P, 2) as (x, y)
    best = np.full(len(p), np.inf, dtype=np.float32)  # distance to the nearest stroke
    for line in DIGIT_STROKES[str(label)]:
        line = [(x + rng.normal(0, .02), y + rng.normal(0, .02)) for x, y in line]
        q = np.asarray(line, dtype=np.float32) @ np.float32(matrix).T + np.float32(offset)
        a, ab = q[:-1], q[1:] - q[:-1]                                # segments (K-1, 2)
        t = ((p[:, None] - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-6)
        closest = a + np.clip(t, 0, 1)[..., None] * ab                # (P, K-1, 2)
        best = np.minimum(best, np.sqrt(((p[:, None] - closest) ** 2).sum(-1)).min(1))
    m = _downsample((best <= rng.uniform(2, 3.2) / 2).reshape(_HI, _HI))
    return _to_uint8(_paint(np.zeros((RES, RES, 3), np.float32), m, (rng.uniform(200, 255),) * 3))


def draw_positions(rng, label):
    """One small shape of any kind and colour in cell `label` of a 3x3 grid, on a light canvas."""
    canvas = np.full((RES, RES, 3), _jitter(rng, (rng.uniform(150, 220),) * 3, 15), np.float32)
    r, cell = rng.uniform(3.5, 5), RES / 3
    cx = (label % 3 + 0.5) * cell + rng.uniform(-cell / 2 + r, cell / 2 - r)
    cy = (label // 3 + 0.5) * cell + rng.uniform(-cell / 2 + r, cell / 2 - r)
    rgb = _jitter(rng, list(COLOURS.values())[rng.integers(len(COLOURS) - 1)], 20)
    canvas = _paint(canvas, shape_mask(SHAPES[rng.integers(len(SHAPES))], cx, cy, r), rgb)
    return _to_uint8(canvas, rng, noise=10)


DIGIT_STROKES = {  # pen strokes (polylines) in the unit box, x right, y down
    "0": [_arc(.5, .5, .28, .4, 0, 360, 16)], "1": [[(.35, .25), (.52, .1), (.52, .9)]],
    "2": [_arc(.5, .32, .24, .22, 180, 380) + [(.25, .9), (.78, .9)]],
    "3": [_arc(.5, .3, .22, .2, -160, 90), _arc(.5, .7, .24, .2, -90, 160)],
    "4": [[(.65, .9), (.65, .1), (.2, .65), (.8, .65)]],
    "5": [[(.75, .1), (.32, .1), (.3, .45)] + _arc(.5, .66, .24, .23, -125, 150)],
    "6": [[(.68, .1), (.3, .58)], _arc(.5, .68, .22, .22, 0, 360, 14)],
    "7": [[(.2, .1), (.8, .1), (.42, .9)]],
    "8": [_arc(.5, .29, .2, .19, 0, 360, 12), _arc(.5, .7, .24, .21, 0, 360, 14)],
    "9": [_arc(.5, .32, .22, .22, 0, 360, 14), [(.72, .32), (.62, .9)]]}
DOMAINS = {  # in task order: name -> (classnames, templates, draw)
    "shapes": (SHAPES, ["a drawing of a {}."], draw_shapes),
    "digits": ([str(i) for i in range(10)], ['a photo of the number: "{}".'], draw_digits),
    "colours": (list(COLOURS)[:-1], ["a photo of a {} object."], draw_colours),
    "patterns": (PATTERNS, ["a photo of a {} pattern."], draw_patterns),
    "counts": (COUNTS, ["a photo of {} objects."], draw_counts),
    "positions": ([p for row in _POSITION_NAMES for p in row], ["a photo of an object at the {}."],
                  draw_positions)}
HOLDOUT = ("positions",)  # never trained, only evaluated (retention, the paper's Table 4)
BENCHMARK = {"datasets": tuple(n for n in DOMAINS if n not in HOLDOUT), "eval_style": "task-aware"}
TEST_SEED = 12345  # test sets are fixed, like a benchmark's; the run seed only draws the shots


def _rng(*key):  # a generator seeded by a key of integers and strings (crc32), not by global RNGs
    return np.random.default_rng([k if isinstance(k, int) else zlib.crc32(k.encode()) for k in key])


def generate(name, per_class, rng, train):  # per_class images of each class, class-major
    classnames, _, draw = DOMAINS[name]
    labels = [c for c in range(len(classnames)) for _ in range(per_class)]
    return ImageSet(np.stack([draw(rng, c) for c in labels]), labels,
                    clip_model.preprocess(train, RES))


def tasks(shots=16, seed=0, datasets=None, test_per_class=40):
    """The tiny setting's Tasks, in order: `shots` training images per class drawn from the seed
    (None: train is None) and a fixed test set, both of uint8 (3, RES, RES) tensors."""
    if unknown := [n for n in datasets or () if n not in DOMAINS]:
        raise ValueError(f"unknown datasets {unknown} for tiny; choose from {list(DOMAINS)}")
    return [Task(name, DOMAINS[name][0], DOMAINS[name][1],  # classnames, templates
                 None if shots is None else generate(name, shots, _rng(seed, name, "train"), True),
                 generate(name, test_per_class, _rng(TEST_SEED, name, "test"), False))
            for name in datasets or BENCHMARK["datasets"]]


# --- the tiny CLIP (clip_model.CONFIGS["tiny"]): pretrained on generated scenes, cached on disk
def pretraining_loss(model, images, captions):  # CLIP's symmetric InfoNCE; equal captions match
    logits = model(images, clip_model.tokenize(captions))  # (B, B) image-to-caption
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
    target = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def pretrain(seed=0, clip_config=clip_model.CONFIGS["tiny"], steps=PRETRAIN["steps"],
             batch_size=PRETRAIN["batch_size"], lr=PRETRAIN["lr"], warmup=PRETRAIN["warmup"],
             weight_decay=PRETRAIN["weight_decay"], log=print):
    """A CLIP trained from scratch on fresh scenes (AdamW, warmup, cosine): (model, step losses)."""
    torch.manual_seed(seed)
    model = clip_model.CLIP(**clip_config).train()
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)
    preprocess = clip_model.preprocess(False, clip_config["image_resolution"])
    rng, t0, losses = _rng(seed, "pretrain"), time.time(), []
    for step in range(steps):
        for g in opt.param_groups:  # linear warmup, then cosine decay
            g["lr"] = lr * min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / steps)))
        arrays, captions = pretrain_batch(rng, batch_size)
        images = torch.stack([preprocess(Image.fromarray(a)) for a in arrays])  # uint8
        loss = pretraining_loss(model, clip_model.normalize(images), captions)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if log and (step % 50 == 0 or step == steps - 1):
            log(f"pretrain step {step:4d}/{steps}  loss {loss.item():.3f}  "
                f"scale {model.logit_scale.exp().item():5.1f}  {time.time() - t0:4.0f}s")
    return model.eval(), losses


def _recipe(seed):  # what fixes the pretrained weights; a file made by another recipe goes unused
    return json.dumps([WORLD_VERSION, clip_model.CONFIGS["tiny"], PRETRAIN, seed], sort_keys=True)


def make(path, seed=0, log=print):
    """Pretrain the tiny CLIP and write it to path in fp16 (15 MB; exact in fp32, so every machine
    starts from the same numbers) with its recipe and platform; the file is opened first."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with clip_model.atomic(path) as tmp, open(tmp, "wb") as f:
        began = time.time()
        model, _ = pretrain(seed, clip_model.CONFIGS["tiny"], **PRETRAIN, log=log)  # as they are
        cpu = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
               if line.startswith("model name")][:1] if os.path.exists("/proc/cpuinfo") else []
        made_on = {"machine": platform.machine(), "cpu": (cpu or [platform.processor()])[0],
                   "threads": torch.get_num_threads(), "torch": str(torch.__version__),
                   "numpy": np.__version__, "seconds": round(time.time() - began)}
        torch.save({"recipe": _recipe(seed), "made_on": made_on,
                    "state_dict": {k: v.half() for k, v in model.state_dict().items()}}, f)


def load(path, seed=0):
    """The tiny CLIP at path (fp32, eval mode); None if missing, unreadable or of another recipe."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["recipe"] == _recipe(seed):  # else None, as for a missing file
            return clip_model.build_model(saved["state_dict"]).eval()  # fp16 values, in fp32
    except Exception:  # noqa: BLE001  missing, truncated or foreign: made again by the caller
        return None


def cache_path(seed=0, cache_dir=None):  # a pretraining's cache file: named by its recipe
    key = hashlib.sha1(_recipe(seed).encode()).hexdigest()[:12]
    return os.path.join(cache_dir or os.path.expanduser("~/.cache/codyra"), f"tiny_clip_{key}.pt")


def pretrained(seed=0, cache_dir=None, log=print, shipped=SHIPPED):
    """The pretrained tiny CLIP (eval mode): the shipped one (seed 0), else pretrained once here and
    cached under a hash of its recipe (another seed or recipe: this machine's floats decide)."""
    path = cache_path(seed, cache_dir)
    if model := load(shipped, seed) or load(path, seed):
        return model
    if log:
        why = (f"{shipped} is unreadable or of another recipe (`git checkout assets/tiny_clip.pt` "
               "restores it); " if seed == 0 and os.path.exists(shipped) else "")
        log(f"{why}pretraining the tiny CLIP once: about 22 min on 2 CPU cores (cached in {path});"
            " the numbers will differ from the README's")
    make(path, seed, log)
    return load(path, seed)  # rounded to fp16 like the shipped one


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Pretrain the tiny CLIP (about 22 min on 2 CPU cores) "
                                "into ~/.cache/codyra, used if assets/tiny_clip.pt is unreadable.")
    p.error = lambda message: p.exit(2, f"error: {message} (see --help)\n")  # one line
    p.add_argument("--seed", type=int, default=0, help="pretraining seed")
    p.add_argument("--ship", action="store_true", help="write assets/tiny_clip.pt instead, the "
                   "file every tiny run starts from (seed 0; another CPU gives other weights)")
    args = p.parse_args()
    if args.seed < 0 or (args.ship and args.seed):
        p.error(f"--seed {args.seed}: expected >= 0, and 0 with --ship")
    path = SHIPPED if args.ship else cache_path(args.seed)
    try:  # assets/ of a read-only checkout: said before the pretraining (make opens it first)
        make(path, args.seed)
    except OSError as e:
        p.exit(1, f"error: cannot write {path} ({e.strerror}); make its folder writable\n")
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MB)")
