"""The tiny world: a small CLIP pretrained on generated captioned images, and a sequence of
generated downstream domains, so that the method can be watched working offline on a CPU.

    python tiny_world.py              # pretrain (first time only, cached), print zero-shot per domain

Pretraining scenes: 1-4 filled shapes of one shape, colour and size on a dark plain or
low-contrast patterned background, captioned with a random subset of their attributes
("a photo of three small red circles on a striped background."). No digits ever appear.
Downstream domains are drawn in other styles (noisy or tinted backgrounds, blobs, full-image
patterns, pen strokes), so zero-shot works only partly and training helps; `digits` is new.
"""
import hashlib
import json
import math
import os
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import clip_model
from data import ImageSet, Task

# -----------------------------------------------------------------------------
# tiny world: image generator

RES = 32   # image side in pixels
SS = 2     # supersampling factor per side: every mask is drawn at RES*SS and averaged (anti-aliasing)

COLOURS = {"red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (235, 220, 40), "green": (40, 170, 60),
           "blue": (40, 90, 230), "purple": (140, 50, 200), "pink": (245, 130, 200), "white": (245, 245, 245)}
SHAPES = ["circle", "square", "triangle", "diamond", "star", "cross", "ring", "heart"]
COUNTS = ["one", "two", "three", "four", "five", "six"]
PATTERNS = ["striped", "checkered", "dotted", "grid", "zigzag"]
PRETRAIN_PATTERNS = ["striped", "checkered", "dotted"]  # grid and zigzag are never seen in pretraining
PRETRAIN_MAX_COUNT = 4                                   # "five" and "six" are never seen in pretraining
_yx = (np.mgrid[0:RES * SS, 0:RES * SS].astype(np.float32) + 0.5) / SS  # (2, RES*SS, RES*SS) pixel coords


def _downsample(m):
    """(RES*SS, RES*SS) 0/1 mask -> (RES, RES) coverage in [0, 1]."""
    return m.reshape(RES, SS, RES, SS).mean(axis=(1, 3), dtype=np.float32)


def _inside(shape, u, v):
    """Is the point (u, v) (unit radius, v pointing down) inside the shape?"""
    r2 = u * u + v * v
    if shape == "circle":
        return r2 <= 1
    if shape == "square":
        return np.maximum(abs(u), abs(v)) <= 0.8
    if shape == "triangle":  # equilateral, pointing up
        return (v <= 0.5) & (np.sqrt(3) * u - v <= 1) & (-np.sqrt(3) * u - v <= 1)
    if shape == "diamond":
        return abs(u) / 0.8 + abs(v) <= 1
    if shape == "star":  # 5 points; radius falls linearly from 1 at a tip to 0.45 between tips
        frac = ((np.arctan2(u, -v) / (2 * np.pi / 5)) % 1.0 - 0.5) * 2  # -1..1 across a sector, 0 between tips
        return np.sqrt(r2) <= 0.45 + 0.55 * abs(frac)
    if shape == "cross":
        return ((abs(u) <= 1) & (abs(v) <= 0.3)) | ((abs(u) <= 0.3) & (abs(v) <= 1))
    if shape == "ring":
        return (r2 <= 1) & (r2 >= 0.55 ** 2)
    if shape == "heart":
        x, y = 1.25 * u, -1.25 * v + 0.25
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    raise ValueError(shape)


def shape_mask(shape, cx, cy, radius, angle=0.0):
    """Coverage (RES, RES) of a shape centred at (cx, cy) pixels, rotated by angle (radians)."""
    dy, dx = (_yx[0] - cy) / radius, (_yx[1] - cx) / radius
    c, s = np.cos(angle), np.sin(angle)
    return _downsample(_inside(shape, c * dx + s * dy, -s * dx + c * dy))


def pattern(kind, period, angle, phase):
    """Coverage (RES, RES) of a full-image pattern; period in pixels."""
    c, s = np.cos(angle), np.sin(angle)
    u = (c * _yx[1] + s * _yx[0]) / period + phase
    v = (-s * _yx[1] + c * _yx[0]) / period + phase
    fu, fv = u % 1.0, v % 1.0
    if kind == "striped":
        m = fu < 0.5
    elif kind == "checkered":
        m = (np.floor(u) + np.floor(v)) % 2 == 0
    elif kind == "dotted":
        m = (fu - 0.5) ** 2 + (fv - 0.5) ** 2 < 0.22 ** 2
    elif kind == "grid":
        m = (fu < 0.2) | (fv < 0.2)
    elif kind == "zigzag":
        m = (v + 0.5 * abs(2 * fu - 1)) % 1.0 < 0.4
    else:
        raise ValueError(kind)
    return _downsample(m)


def _arc(cx, cy, rx, ry, a0, a1, n=10):
    """Points of an elliptic arc from angle a0 to a1 (degrees; 0 = right, 90 = down)."""
    a = np.radians(np.linspace(a0, a1, n))
    return [(cx + rx * np.cos(t), cy + ry * np.sin(t)) for t in a]


# digits as pen strokes (polylines) in the unit box, x right, y down
DIGIT_STROKES = {
    "0": [_arc(.5, .5, .28, .4, 0, 360, 16)],
    "1": [[(.35, .25), (.52, .1), (.52, .9)]],
    "2": [_arc(.5, .32, .24, .22, 180, 380) + [(.25, .9), (.78, .9)]],
    "3": [_arc(.5, .3, .22, .2, -160, 90), _arc(.5, .7, .24, .2, -90, 160)],
    "4": [[(.65, .9), (.65, .1), (.2, .65), (.8, .65)]],
    "5": [[(.75, .1), (.32, .1), (.3, .45)] + _arc(.5, .66, .24, .23, -125, 150)],
    "6": [[(.68, .1), (.3, .58)], _arc(.5, .68, .22, .22, 0, 360, 14)],
    "7": [[(.2, .1), (.8, .1), (.42, .9)]],
    "8": [_arc(.5, .29, .2, .19, 0, 360, 12), _arc(.5, .7, .24, .21, 0, 360, 14)],
    "9": [_arc(.5, .32, .22, .22, 0, 360, 14), [(.72, .32), (.62, .9)]],
}


def strokes_mask(strokes, matrix, offset, width):
    """Coverage (RES, RES) of polylines mapped by p -> matrix @ p + offset, pen width in pixels."""
    p = _yx[::-1].reshape(2, -1).T  # (P, 2) as (x, y)
    best = np.full(len(p), np.inf, dtype=np.float32)
    for line in strokes:
        q = np.asarray(line, dtype=np.float32) @ matrix.T + offset  # (K, 2)
        a, b = q[:-1], q[1:]                                          # segments (K-1, 2)
        ab = b - a
        t = ((p[:, None] - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-6)
        closest = a + np.clip(t, 0, 1)[..., None] * ab                # (P, K-1, 2)
        best = np.minimum(best, np.sqrt(((p[:, None] - closest) ** 2).sum(-1)).min(1))
    return _downsample((best <= width / 2).reshape(RES * SS, RES * SS))


def _paint(canvas, mask, rgb):
    """Alpha-blend a colour into a float (RES, RES, 3) canvas in place."""
    canvas += mask[..., None] * (np.asarray(rgb, dtype=np.float32) - canvas)


def _to_uint8(canvas):
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def _jitter(rng, rgb, amount):
    return np.clip(np.asarray(rgb, dtype=np.float32) + rng.normal(0, amount, 3), 0, 255)


def _positions(rng, k, radius):
    """k object centres in distinct cells of a 3x3 grid, jittered inside their cells."""
    cells = rng.choice(9, size=k, replace=False)
    cell = RES / 3
    slack = max(cell / 2 - radius, 0)
    return [((c % 3 + 0.5) * cell + rng.uniform(-slack, slack), (c // 3 + 0.5) * cell + rng.uniform(-slack, slack))
            for c in cells]


# --- pretraining distribution ---------------------------------------------------------------

SAY = dict(shape=0.9, colour=0.6, size=0.4, position=0.3, background=0.6)  # how often a caption names each
CAPTION_TEMPLATES = ["a photo of {}.", "a picture of {}.", "a drawing of {}.", "{}.", "there is {}.",
                     "an image showing {}."]
_POSITION_NAMES = [["top left", "top", "top right"], ["left", "center", "right"],
                   ["bottom left", "bottom", "bottom right"]]


def pretrain_example(rng, shape=None, colour=None, k=None):
    """One pretraining scene: (uint8 image (RES, RES, 3), caption); attributes not given are drawn."""
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    colour = colour or list(COLOURS)[rng.integers(len(COLOURS))]
    k = k or int(rng.integers(1, PRETRAIN_MAX_COUNT + 1))
    large = k == 1 and rng.random() < 0.5
    radius = rng.uniform(9, 12) if large else rng.uniform(4, 5.5)
    canvas = np.empty((RES, RES, 3), dtype=np.float32)
    canvas[:] = _jitter(rng, (rng.uniform(0, 70),) * 3, 12)  # dark, slightly tinted
    background = None
    if rng.random() < 0.35:
        background = PRETRAIN_PATTERNS[rng.integers(len(PRETRAIN_PATTERNS))]
        m = pattern(background, rng.uniform(5, 9), rng.choice([0, np.pi / 2, np.pi / 4]), rng.random())
        _paint(canvas, m, canvas[0, 0] + rng.uniform(40, 70))
    if large:
        centres = [(RES / 2 + rng.uniform(-3, 3), RES / 2 + rng.uniform(-3, 3))]
    else:
        centres = _positions(rng, k, radius)
    rgb = _jitter(rng, COLOURS[colour], 10)
    for cx, cy in centres:
        _paint(canvas, shape_mask(shape, cx, cy, radius, rng.normal(0, 0.1)), rgb)

    # the caption names a random subset of the attributes (always the shape or the colour)
    say_shape, say_colour = rng.random() < SAY["shape"], rng.random() < SAY["colour"]
    if not (say_shape or say_colour):
        say_shape = True
    words = []
    if k == 1:
        words.append("one" if rng.random() < 0.2 else "a")
    else:
        words.append(COUNTS[k - 1] if rng.random() < 0.8 else "some")
    if rng.random() < SAY["size"]:
        words.append("large" if large else "small")
    if say_colour:
        words.append(colour)
    noun = shape if say_shape else "object"
    words.append(noun + ("es" if noun == "cross" and k > 1 else "s" if k > 1 else ""))
    if k == 1 and not large and rng.random() < SAY["position"]:
        cx, cy = centres[0]
        words.append("at the " + _POSITION_NAMES[min(int(cy // (RES / 3)), 2)][min(int(cx // (RES / 3)), 2)])
    if background and rng.random() < SAY["background"]:
        words.append(f"on a {background} " + ("background" if rng.random() < 0.5 else "pattern"))
    desc = " ".join(words)
    if words[0] == "a" and words[1][0] in "aeiou":
        desc = "an" + desc[1:]
    return _to_uint8(canvas), CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))].format(desc)


def pretrain_batch(rng, n):
    """n pretraining scenes in pairs that differ in one attribute (mostly the shape): uint8 (n, RES, RES, 3),
    captions. NOTE: hard negatives: colour alone tells most random scenes apart and is learned first;
    a partner that differs only in shape makes the shape matter to the loss."""
    pairs = []
    while len(pairs) < n:
        shape, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
        k = int(rng.integers(1, PRETRAIN_MAX_COUNT + 1))
        pairs.append(pretrain_example(rng, shape, colour, k))
        change = rng.random()
        if change < 0.6:
            shape = SHAPES[(SHAPES.index(shape) + rng.integers(1, len(SHAPES))) % len(SHAPES)]
        elif change < 0.8:
            colour = list(COLOURS)[(list(COLOURS).index(colour) + rng.integers(1, len(COLOURS))) % len(COLOURS)]
        else:
            k = k % PRETRAIN_MAX_COUNT + 1
        pairs.append(pretrain_example(rng, shape, colour, k))
    return np.stack([p[0] for p in pairs[:n]]), [p[1] for p in pairs[:n]]


# --- downstream domains ---------------------------------------------------------------------

def _add_noise(rng, canvas, sigma):
    canvas += rng.normal(0, sigma, canvas.shape).astype(np.float32)
    return canvas


def draw_shapes(rng, label):
    """One shape, any colour but white, rotated, on a noisy background."""
    canvas = np.empty((RES, RES, 3), dtype=np.float32)
    canvas[:] = _jitter(rng, (rng.uniform(20, 100),) * 3, 20)
    rgb = _jitter(rng, list(COLOURS.values())[rng.integers(len(COLOURS) - 1)], 25)
    r = rng.uniform(7, 12)
    cx, cy = RES / 2 + rng.uniform(-16 + r, 16 - r), RES / 2 + rng.uniform(-16 + r, 16 - r)
    _paint(canvas, shape_mask(SHAPES[label], cx, cy, r, rng.normal(0, 0.2)), rgb)
    return _to_uint8(_add_noise(rng, canvas, 20))


def _blob_mask(rng, cx, cy, size):
    """An irregular paint blob: the union of a few random discs."""
    m = np.zeros((RES, RES), dtype=np.float32)
    for _ in range(int(rng.integers(3, 6))):
        m = np.maximum(m, shape_mask("circle", cx + rng.normal(0, size / 2), cy + rng.normal(0, size / 2),
                                     rng.uniform(size / 2, size)))
    return m


def draw_colours(rng, label):
    """One or two irregular blobs of a colour (shade varies) on a mid-grey noisy canvas."""
    canvas = np.empty((RES, RES, 3), dtype=np.float32)
    canvas[:] = _jitter(rng, (rng.uniform(90, 150),) * 3, 10)
    rgb = np.asarray(list(COLOURS.values())[label], dtype=np.float32) * rng.uniform(0.7, 1.05)
    for _ in range(int(rng.integers(1, 3))):
        _paint(canvas, _blob_mask(rng, rng.uniform(8, 24), rng.uniform(8, 24), rng.uniform(4, 7)),
               _jitter(rng, rgb, 15))
    return _to_uint8(_add_noise(rng, canvas, 12))


def draw_counts(rng, label):
    """label+1 small discs, squares or diamonds of one colour on a tinted, noisy table."""
    canvas = np.empty((RES, RES, 3), dtype=np.float32)
    canvas[:] = _jitter(rng, (rng.uniform(30, 90), rng.uniform(30, 90), rng.uniform(30, 90)), 5)
    shape = ["circle", "square", "diamond"][rng.integers(3)]
    rgb = _jitter(rng, list(COLOURS.values())[rng.integers(len(COLOURS))], 20)
    r = rng.uniform(3.5, 4.5)
    for cx, cy in _positions(rng, label + 1, r):
        _paint(canvas, shape_mask(shape, cx, cy, r), rgb)
    return _to_uint8(_add_noise(rng, canvas, 10))


def draw_patterns(rng, label):
    """A full-image pattern in two random colours, random scale, orientation and phase."""
    canvas = np.empty((RES, RES, 3), dtype=np.float32)
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    while np.abs(c1 - c2).sum() < 200:  # keep enough contrast to see the pattern
        c2 = rng.uniform(0, 255, 3)
    canvas[:] = c1
    _paint(canvas, pattern(PATTERNS[label], rng.uniform(5, 10), rng.uniform(0, np.pi), rng.random()), c2)
    return _to_uint8(_add_noise(rng, canvas, 8))


def draw_digits(rng, label):
    """A pen-drawn digit (random affine, pen width), white on black, MNIST-like."""
    angle, shear, scale = rng.normal(0, 0.15), rng.normal(0, 0.15), rng.uniform(18, 24)
    c, s = np.cos(angle), np.sin(angle)
    matrix = scale * np.array([[c, -s], [s, c]]) @ np.array([[1, shear], [0, 1]]) \
        @ np.diag([rng.uniform(0.8, 1.1), 1.0])
    offset = np.array([RES / 2, RES / 2]) - matrix @ np.array([0.5, 0.5]) + rng.uniform(-2, 2, 2)
    strokes = [[(x + rng.normal(0, .02), y + rng.normal(0, .02)) for x, y in line] for line in DIGIT_STROKES[str(label)]]
    m = strokes_mask(strokes, matrix.astype(np.float32), offset.astype(np.float32), rng.uniform(2, 3.2))
    canvas = np.zeros((RES, RES, 3), dtype=np.float32)
    _paint(canvas, m, (rng.uniform(200, 255),) * 3)
    return _to_uint8(canvas)


@dataclass
class Domain:
    name: str
    classnames: list
    templates: list  # templates[0] is used for training; all are averaged for evaluation
    draw: object     # draw(rng, label) -> uint8 (RES, RES, 3)


DOMAINS = [
    Domain("shapes", SHAPES, ["a drawing of a {}."], draw_shapes),
    Domain("digits", [str(i) for i in range(10)], ['a photo of the number: "{}".'], draw_digits),
    Domain("colours", list(COLOURS)[:-1], ["a photo of a {} object."], draw_colours),
    Domain("patterns", PATTERNS, ["a photo of a {} pattern."], draw_patterns),
    Domain("counts", COUNTS, ["a photo of {} objects."], draw_counts),
]


def _rng(*keys):
    """A generator seeded by integers and strings (crc32), independent of any global RNG."""
    return np.random.default_rng([k if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys])


def generate(domain, per_class, rng):
    """per_class images of every class of a domain, class-major order."""
    labels = [c for c in range(len(domain.classnames)) for _ in range(per_class)]
    return ImageSet(np.stack([domain.draw(rng, c) for c in labels]), labels)


TEST_PER_CLASS = 40
TEST_SEED = 12345  # test sets are fixed, like a benchmark's; the run seed only draws the shots


def tiny_tasks(shots=16, seed=0, test_per_class=TEST_PER_CLASS, domains=None):
    """The downstream sequence as Tasks: `shots` training images per class drawn from the seed,
    and a fixed test set."""
    by_name = {d.name: d for d in DOMAINS}
    unknown = [n for n in domains or () if n not in by_name]
    if unknown:
        raise ValueError(f"unknown datasets {unknown} for tiny; choose from {list(by_name)}")
    chosen = [by_name[n] for n in domains] if domains else DOMAINS
    return [Task(d.name, d.classnames, d.templates,
                 generate(d, shots, _rng(seed, d.name, "train")),
                 generate(d, test_per_class, _rng(TEST_SEED, d.name, "test"))) for d in chosen]

# -----------------------------------------------------------------------------
# tiny CLIP: contrastive pretraining on generated captioned scenes, cached on disk

WORLD_VERSION = 1  # NOTE: bump when the generator or the recipe changes, so stale caches are not reused
# NOTE: widths are multiples of 64: build_model infers heads = width / 64, so a saved run reloads as built
TINY_CLIP = dict(embed_dim=64, image_resolution=RES, vision_layers=3, vision_width=128, vision_patch_size=8,
                 context_length=77, vocab_size=49408, transformer_width=128, transformer_heads=2,
                 transformer_layers=3)
PRETRAIN = dict(steps=1000, batch_size=64, lr=1e-3, warmup=50, weight_decay=0.1)


def _pixels(arrays, tf):
    return torch.stack([tf(Image.fromarray(a)) for a in arrays])


def clip_loss(model, images, captions):
    """Symmetric InfoNCE of CLIP; identical captions in a batch all count as matches, not negatives."""
    img = F.normalize(model.encode_image(images), dim=-1)                        # (B, E)
    txt = F.normalize(model.encode_text(clip_model.tokenize(captions)), dim=-1)  # (B, E)
    logits = model.logit_scale.exp() * img @ txt.T               # (B, B)
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
    target = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def pretrain(seed=0, clip_config=TINY_CLIP, steps=PRETRAIN["steps"], batch_size=PRETRAIN["batch_size"],
             lr=PRETRAIN["lr"], warmup=PRETRAIN["warmup"], weight_decay=PRETRAIN["weight_decay"], log=print):
    """Train a CLIP from scratch on freshly generated scenes; returns (model in eval mode, loss per step)."""
    torch.manual_seed(seed)
    model = clip_model.CLIP(**clip_config)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    tf, rng, t0 = clip_model.transform(False, clip_config["image_resolution"]), _rng(seed, "pretrain"), time.time()
    losses = []
    model.train()
    for step in range(steps):
        for group in opt.param_groups:  # linear warmup, then cosine to 0
            group["lr"] = lr * min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / steps)))
        arrays, captions = pretrain_batch(rng, batch_size)
        loss = clip_loss(model, _pixels(arrays, tf), captions)
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


def cache_path(seed=0, cache_dir=None):
    key = json.dumps([WORLD_VERSION, TINY_CLIP, PRETRAIN, seed], sort_keys=True)
    name = f"tiny_clip_{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"
    return os.path.join(cache_dir or os.path.expanduser("~/.cache/codyra"), name)


def pretrained_tiny_clip(seed=0, cache_dir=None, log=print):
    """The tiny world's pretrained CLIP (fp32, eval mode): pretrained on first use, then loaded from the cache."""
    path = cache_path(seed, cache_dir)
    model = clip_model.CLIP(**TINY_CLIP)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, map_location="cpu")["state_dict"])
        return model.eval()
    if log:
        log(f"pretraining the tiny CLIP (once; cached in {path})")
    model, _ = pretrain(seed, TINY_CLIP, **PRETRAIN, log=log)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save({"clip_config": TINY_CLIP, "pretrain": PRETRAIN, "seed": seed, "world_version": WORLD_VERSION,
                "state_dict": model.state_dict()}, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache
    return model


if __name__ == "__main__":
    t0 = time.time()
    model = pretrained_tiny_clip(seed=0)
    print(f"tiny CLIP ready in {time.time() - t0:.0f}s, {sum(p.numel() for p in model.parameters()):,} parameters")
    import eval as evaluation  # the evaluation train.py runs after every task

    tasks = tiny_tasks(shots=1)
    for t in tasks:
        t.test.transform = clip_model.transform(False, model.visual.input_resolution)
    cpu = torch.device("cpu")
    aware, union = (evaluation.evaluate(model, tasks, union, cpu, workers=0) for union in (False, True))
    n_union = sum(len(t.classnames) for t in tasks)
    print(f"{'domain':10s} {'classes':>7s} {'chance':>7s} {'zero-shot':>9s} {'union chance':>12s} {'union':>6s}")
    for t, a, u in zip(tasks, aware, union):
        print(f"{t.name:10s} {len(t.classnames):7d} {100 / len(t.classnames):7.1f} {a:9.1f} {100 / n_union:12.1f} {u:6.1f}")
