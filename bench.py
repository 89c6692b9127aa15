"""Speed, on random weights and generated images (no data, no download), two ways.

The speed table: training and evaluation, the plain path against the fast one, every row
measured in this run.

    python bench.py                        # ViT-B/16: batch 64 (CUDA), 4 (CPU, ~3 min)
    python bench.py --model-size tiny      # the tiny world's CLIP shape, seconds
    python bench.py --compile              # adds torch.compile rows, compile time included

plain = the released code: fp32, 77-token text, every test JPEG decoded at every evaluation;
fast = this project: text cut to the longest prompt, test images from the uint8 cache, in fp32
(train.py's default --precision) and, on CUDA, also in bf16 autocast (--precision bf16).
Peak MB: CUDA, the row's own; CPU, the process's so far.

The dry run: `train.py --setting mtil` (or xtail) end to end on a synthetic copy of the benchmark
(its real on-disk layout, class counts and split sizes, JPEGs of each dataset's typical size,
written once) with random weights in OpenAI's archive format; a table of every phase.

    python bench.py --sequence mtil                    # CUDA: all of it (scale 1)
    python bench.py --sequence mtil --scale 0.01       # 1% of the images and iterations, projected
"""
import argparse
import contextlib
import copy
import functools
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path
from unittest import mock

import numpy as np
import scipy.io  # the Flowers102 and StanfordCars .mat files of the dry run
import torch
import torch.nn.functional as F
from PIL import Image

import clip_model
import codyra
import data
import eval as evaluation

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
                   "split) and of the iterations; default 1 on CUDA, 0.01 on a CPU")
group.add_argument("--iterations", type=int, help="per task (default: 500 x scale, at least 1)")
group.add_argument("--root", default="~/.cache/codyra/dryrun",
                   help="where the synthetic benchmarks, weights and test-image caches are kept")
group.add_argument("--out", help="train.py's --out (default: in the benchmark's folder)")
args = p.parse_args()
device = evaluation.pick_device(args.device)
cuda = device.type == "cuda"
sync = torch.cuda.synchronize if cuda else (lambda: None)  # wait for the GPU before a clock read


def peak_mb():
    return (torch.cuda.max_memory_allocated() / 2**20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # maxrss: kB on Linux


# --- the dry run (--sequence): a synthetic benchmark on disk, train.py on it, every phase timed
PIXELS = dict(aircraft=(1000, 700), caltech101=(300, 200), dtd=(500, 500), eurosat=(64, 64),
              flowers=(500, 667), food=(512, 384), pets=(500, 375), cars=(700, 480),
              sun397=(500, 375))  # a typical JPEG's (width, height) in each dataset
ITERATIONS, BATCH = 500, 64  # train.py's recipe for MTIL and X-TAIL


def sizes(sequence, scale):
    """{dataset: (classes, train images, test images)}: the real ones (data.SIZES, in the
    sequence's default layout) times scale, each split at least one image per class."""
    known = data.SIZES[data.BENCHMARKS[sequence]["layout"]]
    return {name: (C, *(max(C, round(n * scale)) for n in (train, test)))
            for name, (C, train, test) in ((n, known[n]) for n in
                                           data.BENCHMARKS[sequence]["datasets"])}


def class_names(name, C):
    """(folder names, names) of a dataset's classes: the real ones where the assets list them."""
    entry, generic = data.ASSETS["mtil"].get(name, {}), [f"{name}_{c:03d}" for c in range(C)]
    return entry.get("folders", generic)[:C], entry.get("classnames", generic)[:C]


def jpeg(rng, size, path):
    """A JPEG of `size` (w, h) that compresses (~0.4 byte per pixel at quality 90) and decodes
    like a photo: random colours smoothly upsampled, plus noise."""
    small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    pixels = np.asarray(small.resize(size, Image.BICUBIC), np.float32)
    pixels += rng.normal(0, 12, pixels.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)


def idx(array):
    """An MNIST idx file: 0, 0, 0x08 (uint8), ndim, big-endian sizes, data."""
    return bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">u4").tobytes() + array.tobytes()


def write_dataset(root, sequence, name, C, counts, rng):
    """One dataset of the synthetic benchmark under root, in the layout data.LAYOUTS reads; its
    image files are hard links to a pool of 8 JPEGs of the dataset's size. counts: images per split
    ({"train": n, "test": n}); image i of a split has class i % C."""
    layout = data.BENCHMARKS[sequence]["layout"]
    folders, needs, _ = data.LAYOUTS[layout][name]
    d, (folder, names) = root / folders[0], class_names(name, C)
    split = {s: [(i, i % C) for i in range(n)] for s, n in counts.items()}  # (index, class)
    pool = [root.parent / "pool" / f"{name}_{k}.jpg" for k in range(8)]

    def images(paths):  # hard links (a copy where the file system has none) to the pool
        if not pool[0].exists():
            for path in pool:
                jpeg(rng, PIXELS[name], path)
        for i, path in enumerate(paths):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(pool[i % len(pool)], path)
            except OSError:
                shutil.copyfile(pool[i % len(pool)], path)

    def rows(pattern, s):  # pattern formatted for each image of split s
        return [pattern.format(s=s, i=i, c=c + 1, f=folder[c]) for i, c in split[s]]

    if name == "mnist":
        for s, prefix in (("train", "train"), ("test", "t10k")):
            labels = np.array([c for _, c in split[s]], np.uint8)
            write(d / f"{prefix}-labels-idx1-ubyte", idx(labels))
            write(d / f"{prefix}-images-idx3-ubyte",
                  idx(rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)))
    elif name == "cifar100":
        write(d / "meta", pickle.dumps({"fine_label_names": folder}))
        for s in split:
            pixels = rng.integers(0, 256, (len(split[s]), 3072), np.uint8)  # rows of 3 x 32 x 32
            write(d / s, pickle.dumps({"data": pixels, "fine_labels": [c for _, c in split[s]]}))
    elif layout == "coop" and name != "aircraft":  # CoOp's split file: [path, label, classname]
        image_dir = "" if name == "cars" else needs[1]
        pattern = {"flowers": "image_{s}{i:05d}.jpg", "pets": "{f}_{s}{i}.jpg",
                   "cars": "cars_{s}/{i:05d}.jpg"}.get(name, "{f}/{s}_{i}.jpg")
        items = {s: [[path, c, names[c]] for path, (_, c) in zip(rows(pattern, s), split[s])]
                 for s in split}
        write(d / needs[0], json.dumps({"train": items["train"], "val": [], "test": items["test"]}))
        images([d / image_dir / path for s in split for path, _, _ in items[s]])
    elif name == "aircraft":
        write(d / "variants.txt", "".join(f + "\n" for f in folder))
        for s in split:
            lines = rows("{s}{i:07d} {f}", s)
            write(d / f"images_variant_{s}.txt", "\n".join(lines))
            images([d / "images" / f"{line.split()[0]}.jpg" for line in lines])
    elif name in ("caltech101", "eurosat", "sun397"):  # class folders, split 80/20 by the reader
        pattern = {"caltech101": "101_ObjectCategories/{f}/image_{s}{i:05d}.jpg",
                   "eurosat": "2750/{f}/{f}_{s}{i}.jpg", "sun397": "s/{f}/sun_{s}{i}.jpg"}[name]
        if name == "sun397":
            write(d / "ClassName.txt", "".join(f"/s/{f}\n" for f in folder))
        if name == "caltech101":  # skipped by the reader, as torchvision does
            images([d / "101_ObjectCategories/BACKGROUND_Google/image_0001.jpg"])
        images([d / path for s in split for path in rows(pattern, s)])
    elif name == "dtd":
        for s in split:
            lines = rows("{f}/{f}_{s}{i}.jpg", s)
            write(d / f"labels/{s}1.txt", "\n".join(lines))
            images([d / "images" / line for line in lines])
    elif name == "flowers":  # images 1..N, the train split first; labels by image id
        n = len(split["train"])
        ids = {"trnid": range(1, n + 1), "tstid": range(n + 1, n + len(split["test"]) + 1)}
        labels = [c + 1 for s in split for _, c in split[s]]
        d.mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(d / "imagelabels.mat", {"labels": np.array([labels], np.uint8)})
        scipy.io.savemat(d / "setid.mat", {k: np.array([list(v)], np.uint16)
                                           for k, v in ids.items()})
        images([d / "jpg" / f"image_{i:05d}.jpg" for v in ids.values() for i in v])
    elif name == "food":
        for s in split:
            meta = {f: [] for f in folder}
            for i, c in split[s]:
                meta[folder[c]].append(f"{folder[c]}/{s}{i}")
            write(d / f"meta/{s}.json", json.dumps(meta))
            images([d / "images" / f"{path}.jpg" for paths in meta.values() for path in paths])
    elif name == "pets":  # "<breed>_<n> <class id> <species> <breed id>"
        for s, f in (("train", "trainval"), ("test", "test")):
            lines = rows("{f}_{s}{i} {c} 1 {c}", s)
            write(d / f"annotations/{f}.txt", "\n".join(lines))
            images([d / "images" / f"{line.split()[0]}.jpg" for line in lines])
    elif name == "cars":
        (d / "devkit").mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(d / "devkit/cars_meta.mat", {"class_names": np.array([names], object)})
        for s, mat in (("train", "devkit/cars_train_annos.mat"),
                       ("test", "cars_test_annos_withlabels.mat")):
            annos = np.zeros((1, len(split[s])), [("class", "O"), ("fname", "O")])
            for i, c in split[s]:
                annos[0, i] = (np.array([[c + 1]], np.uint16), f"{i:05d}.jpg")
            scipy.io.savemat(d / mat, {"annotations": annos})
            images([d / f"cars_{s}/{i:05d}.jpg" for i, _ in split[s]])


def write_benchmark(home, sequence, scale):
    """The synthetic copy of a sequence at a scale, as home/data (written beside, then renamed)."""
    tmp, rng = home / f"data.{os.getpid()}.tmp", np.random.default_rng(0)
    shutil.rmtree(tmp, ignore_errors=True)
    for name, (C, n_train, n_test) in sizes(sequence, scale).items():
        write_dataset(tmp, sequence, name, C, {"train": n_train, "test": n_test}, rng)
    os.replace(tmp, home / "data")


class Holder(torch.nn.Module):  # a TorchScript module that only holds tensors
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def write_weights(path, size):
    """Random CLIP weights saved as OpenAI ships theirs (clip_model.load reads it the same way): a
    TorchScript archive of fp16 tensors, q, k and v packed into in_proj, three integer entries."""
    torch.manual_seed(0)
    cfg = SIZES[size]
    sd = clip_model.CLIP(**cfg).state_dict()
    for q in [k for k in sd if ".q_proj." in k]:
        prefix, kind = q.split(".q_proj.")
        sd[f"{prefix}.in_proj_{kind}"] = torch.cat([sd.pop(f"{prefix}.{x}_proj.{kind}")
                                                    for x in "qkv"])
    sd = {k: v.half() for k, v in sd.items()}
    sd.update(input_resolution=torch.tensor(cfg["image_resolution"]),
              context_length=torch.tensor(cfg["context_length"]),
              vocab_size=torch.tensor(cfg["vocab_size"]))
    holder = Holder()
    for key, value in sd.items():
        *parents, leaf = key.split(".")
        module = holder
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, Holder())
            module = getattr(module, name)
        module.register_buffer(leaf, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), clip_model.atomic(str(path)) as tmp:
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript: deprecated, OpenAI's format
        torch.jit.save(torch.jit.script(holder), tmp)


def clock(fn, host=False):
    """(fn(), seconds, peak MB: on CUDA the call's GPU memory unless host; else the process's)."""
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    result = fn()
    sync()
    host_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result, time.perf_counter() - began, host_mb if host else peak_mb()


def dry_run():
    """Write what is missing, time indexing and the cache build, run train.py, report."""
    size = args.model_size or ("ViT-B/16" if cuda else "tiny")
    scale = args.scale or (1.0 if cuda else 0.01)
    iterations = args.iterations or max(1, round(ITERATIONS * scale))
    if not 0 < scale <= 1 or iterations < 1 or args.batch_size is not None and args.batch_size < 1:
        p.error("--scale must lie in (0, 1], --iterations and --batch-size be >= 1")
    root, tag = Path(args.root).expanduser(), size.replace("/", "-")
    shape = zlib.crc32(json.dumps(SIZES[size], sort_keys=True).encode())  # a new shape, new weights
    home, weights = root / f"{args.sequence}-{scale:g}", root / f"random-{tag}-{shape:08x}.pt"
    out = Path(args.out or home / f"run-{tag}").expanduser()
    once = []  # (what, seconds): written once per machine, outside the totals
    if not (home / "data").exists():
        once.append(("synthetic benchmark", clock(
            lambda: write_benchmark(home, args.sequence, scale), host=True)[1]))
    if not weights.exists():
        once.append((f"random {size} weights", clock(lambda: write_weights(weights, size))[1]))

    # what train.py's set-up does but does not time apart: indexing, the test-image cache build
    tasks, *index = clock(lambda: data.load_tasks(args.sequence, home / "data"), host=True)
    shutil.rmtree(home / "eval-cache", ignore_errors=True)  # so that the build is timed each time
    _, *cache = clock(lambda: data.prepare(tasks, SIZES[size]["image_resolution"],
                                           str(home / "eval-cache"), args.workers), host=True)

    # train.py itself, its output in a log
    cmd = [sys.executable, str(Path(__file__).with_name("train.py")), "--setting", args.sequence,
           "--data-dir", str(home / "data"), "--model", str(weights), "--out", str(out),
           "--iterations", str(iterations), "--cache-dir", str(home / "eval-cache"),
           "--workers", str(args.workers), "--device", str(device), "--overwrite"]
    cmd += ["--batch-size", str(args.batch_size)] if args.batch_size else []
    out.mkdir(parents=True, exist_ok=True)
    print("$ " + " ".join(cmd[1:]) + f"\n  (its output: {out / 'train.log'})", flush=True)
    with open(out / "train.log", "w") as log:
        run, wall, _ = clock(lambda: subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT))
    if run.returncode:
        sys.exit("error: train.py failed; the end of its output:\n"
                 + (out / "train.log").read_text()[-3000:])
    res = json.loads((out / "results.json").read_text())
    report(res, tasks, {"index": index, "cache": cache}, wall, out)
    print(f"model: CLIP {size}, random weights, loaded from a TorchScript archive in OpenAI's "
          f"format; {'written once (outside the totals): ' if once else 'already on disk: '}"
          + (", ".join(f"{what} {s:.0f} s" for what, s in once) or f"data and weights in {root}"))


def report(res, tasks, apart, wall, out):
    """The table of phases (projected to the real sequence when scaled down), a row per task,
    and the run's own results.json. apart: {phase: (seconds, peak MB)} timed in this process."""
    times, T = res["seconds"], len(res["seconds"])
    its, B = res["args"]["iterations"], res["args"]["batch_size"]
    real = sizes(res["setting"], 1.0).values()
    n_test, n_files = sum(len(t.test) for t in tasks), sum(len(t.train) for t in tasks)
    n_files += n_test
    real_files, real_test = sum(tr + te for _, tr, te in real), sum(te for *_, te in real)
    prompts = sum(len(t.classnames) * len(t.templates) for t in tasks)
    total = {k: sum(s.get(k, 0) for s in times)
             for k in ("text", "steps", "train", "eval_text", "eval", "routing", "checkpoint")}
    zero_shot_s = res.get("zero_shot_seconds", 0)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # train.py's whole run
    peak = {k: max(s[f"{k}_peak_mb"] for s in times) if cuda else rss
            for k in ("text", "steps", "train", "eval", "checkpoint")}
    ckpt_mb = os.path.getsize(out / "checkpoint.pt") / 2**20
    setup_s = res["setup_seconds"]
    rows = [  # (phase, count, seconds, peak MB, the count in the real sequence; None: the same)
        ("test-image cache build (timed in bench)", n_test, *apart["cache"], real_test),
        (f"set-up: indexing {T} datasets (timed in bench)", n_files, *apart["index"], real_files),
        ("set-up: weights, test-image cache look-up", None,
         max(0.0, setup_s - apart["index"][0]), None, None),
        ("earlier tasks' class text, no gradient", sum(sum(res["classes"][:t]) for t in range(T)),
         total["text"], peak["text"], None),
        (f"training steps ({T} x {its} x {B} images)", T * its * B, total["steps"],
         peak["steps"], T * ITERATIONS * BATCH),
        (f"training: inject, analysis, merge ({T} tasks)", None, total["train"] - total["steps"],
         peak["train"], None),
        (f"evaluation: class text features ({T} x {prompts:,})", T * prompts,
         total["eval_text"], peak["eval"], None),
        (f"evaluation: test images ({T} x {n_test:,})", T * n_test,
         total["eval"] - total["eval_text"], peak["eval"], T * real_test),
        (f"zero-shot evaluation, before task 1 ({n_test:,} images)", n_test, zero_shot_s, None,
         real_test),
        (f"second rows: auto-encoders, routing ({T} tasks)", None, total["routing"], None, None),
        (f"checkpoint writes ({T} x {ckpt_mb:.0f} MB)", round(T * ckpt_mb), total["checkpoint"],
         peak["checkpoint"], None),
        ("train.py's start, imports, printing", None, max(0.0, wall - setup_s - zero_shot_s - sum(
            total[k] for k in ("text", "train", "eval", "routing", "checkpoint"))), None, None)]
    measured = sum(r[2] for r in rows)
    projected = [s * n_real / count if n_real else s for _, count, s, _, n_real in rows]
    scaled = (n_test, its, B) != (real_test, ITERATIONS, BATCH)
    number = lambda n: "-" if n is None else f"{n:,.0f}"  # noqa: E731
    where = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"\ndry run of train.py --setting {res['setting']} on {where}, torch "
          f"{torch.__version__}: {n_test:,} test images ({n_test / real_test:.2%} of "
          f"{real_test:,}), {n_files:,} indexed, {its} of {ITERATIONS} steps per task at batch {B}")
    print(f"{'phase':52}{'count':>10}{'s':>8}{'per s':>9}{'peak MB':>9}{'share':>7}"
          + (f"{'real count':>12}{'proj. s':>9}{'share':>7}" if scaled else ""))
    for (what, count, s, mb, n_real), proj in zip(rows, projected):
        rate = count / s if count and s else None
        print(f"{what:52}{number(count):>10}{s:>8.1f}{number(rate):>9}{number(mb):>9}"
              f"{s / measured:>7.1%}" + (f"{number(n_real or count):>12}{proj:>9.0f}"
                                         f"{proj / sum(projected):>7.1%}" if scaled else ""))
    print(f"{'total':52}{'':10}{measured:>8.1f}{'':25}"
          + (f"{'':12}{sum(projected):>9.0f}" if scaled else ""))
    print(f"= train.py end to end {wall:.1f} s + the test-image cache build "
          f"{apart['cache'][0]:.1f} s ({measured / 60:.1f} min)")
    if scaled:
        print(f"PROJECTION, not a measurement: the real sequence ({real_test:,} test images, "
              f"{ITERATIONS} steps of {BATCH}) would take {sum(projected) / 60:.1f} min here: each "
              "row's seconds times real count / count; rows without a count do not grow")
    print("peak MB: " + ("GPU memory allocated in the phase (rows 1-2: bench's peak RSS)" if cuda
                         else "peak RSS, of bench (rows 1-2) and of train.py's whole run"))
    print(f"\nper task, seconds: {'classes':>8}{'test':>7}{'text':>7}{'steps':>7}{'img/s':>7}"
          f"{'rest':>7}{'eval: text':>12}{'images':>8}{'img/s':>7}{'ckpt':>7}")
    for name, C, task, s in zip(res["datasets"], res["classes"], tasks, times):
        images_s = s["eval"] - s["eval_text"]
        print(f"{name:18}{C:>8}{len(task.test):>7}{s['text']:>7.2f}{s['steps']:>7.2f}"
              f"{its * B / s['steps']:>7.0f}{s['train'] - s['steps']:>7.2f}{s['eval_text']:>12.2f}"
              f"{images_s:>8.2f}{n_test / images_s:>7.0f}{s['checkpoint']:>7.2f}")
    print(f"\nthe run's results.json ({out / 'results.json'}; random weights: chance accuracy)")
    print("classes: " + ", ".join(f"{d} {c}" for d, c in zip(res["datasets"], res["classes"]))
          + f" ({sum(res['classes']):,} in all)")
    print(evaluation.format_table(res["metrics"], res["datasets"]))


if args.sequence:
    dry_run()
    sys.exit()

# --- the speed table: model, prompts, a batch of images, a test set of generated JPEGs
size = args.model_size or "ViT-B/16"
B, iters = args.batch_size or (64 if cuda else 4), args.iters or (20 if cuda else 2)
C, N = args.classes or (100 if cuda else 10), args.test_images or (4096 if cuda else 32)
if min(B, iters, C, N) < 1 or args.workers < 0:
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
for path in paths:  # smooth random images compress and decode like photos, not like noise
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(path, quality=90)
test = data.ImageSet(paths, [i % C for i in range(N)], clip_model.preprocess(False, R))


def encode_text_full(m, toks):
    """The plain path: every one of the 77 positions through the text tower."""
    x = m.ln_final(m.transformer(m.token_embedding(toks) + m.positional_embedding))  # (N, 77, D)
    return x[torch.arange(len(x), device=x.device), toks.argmax(-1)] @ m.text_projection


def full_text(m, on=True):
    """Within it, when on, m.encode_text takes the plain path."""
    plain = functools.partial(encode_text_full, m)
    return mock.patch.object(m, "encode_text", plain) if on else contextlib.nullcontext()


def inference(fn, *args, amp=False, full=False):
    """fn(*args) as a call to time: no autograd, under autocast(amp) and full_text(model, full)."""
    def run():
        with torch.no_grad(), autocast(enabled=amp), full_text(model, full):
            return fn(*args)
    return run


def row(what, path, items, fn, n=iters, plain=None):
    """Time fn over n calls after one warm-up, add its row; returns its seconds per call."""
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    s = (time.perf_counter() - start) / n
    rows.append((what, path, items / s, s, peak_mb(), plain or s))
    return s


def evaluate(images):
    """The whole evaluate() of one test set, as a call to time."""
    task = data.Task("bench", [f"class {c}" for c in range(C)], ["{}"], None, images)
    return lambda: evaluation.evaluate(model, [task], False, device, B, args.workers)


# --- training: one CoDyRA step (train.py's loss), rank 16, all placements
def train_step(m, amp, full):
    params = [q for q in m.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.9999))
    labels = torch.randint(0, C, (B,), device=device)

    def step():
        with autocast(enabled=amp), full_text(m, full):
            img = F.normalize(m.encode_image(clip_model.normalize(pixels)).float(), dim=-1)
            txt = F.normalize(m.encode_text(tokens).float(), dim=-1)
        loss = clip_model.contrastive_loss(img, txt, labels, m.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        codyra.proximal_step(m, 1e-3)
    return step


trainee = codyra.inject(copy.deepcopy(model), 16, where=codyra.clip_placement()).train()
plain = row("training, rank 16, all placements", "plain: fp32, 77-token text", B,
            train_step(trainee, False, True))
for prec, amp in AMP.items():
    row("", f"fast: {prec}, text cut to {L}", B, train_step(trainee, amp, False), plain=plain)
if args.compile:
    trainee.visual.compile()
    trainee.transformer.compile()
    start = time.perf_counter()
    train_step(trainee, False, False)()
    sync()
    row("", f"fast: fp32 + compile (first step {time.perf_counter() - start:.0f}s)", B,
        train_step(trainee, False, False), plain=plain)
del trainee

# --- evaluation: the whole evaluate() of one test set (text features, loader, forward passes)
plain = row(f"evaluation, {N} JPEGs 500x375", "plain: fp32, 77 tokens, decode", N,
            inference(evaluate(test), amp=False, full=True), n=1)
start = time.perf_counter()
cached = test.cached("bench", os.path.join(tmp, "cache"), args.workers)
build_s = time.perf_counter() - start
for prec, amp in AMP.items():
    row("", f"fast: {prec}, cut, uint8 cache", N, inference(evaluate(cached), amp=amp), n=1,
        plain=plain)
rows.append(("", "  (building the cache, once)", N / build_s, build_s, peak_mb(), None))

# --- text tower: cut vs 77 tokens; image inference: never-injected vs injected vs merged
plain = row(f"text tower, {C} prompts", "plain: fp32, 77 tokens", C,
            inference(encode_text_full, model, tokens, amp=False))
for prec, amp in AMP.items():
    row("", f"fast: {prec}, cut to {L}", C, inference(model.encode_text, tokens, amp=amp),
        plain=plain)
with torch.no_grad():
    same = torch.allclose(encode_text_full(model, tokens), model.encode_text(tokens), atol=1e-4)
images = clip_model.normalize(pixels)
injected = codyra.inject(copy.deepcopy(model), 16, where=codyra.clip_placement()).eval()
for _, layer in codyra.adapters(injected):
    torch.nn.init.normal_(layer.lora_B, std=1e-3)  # so that merging changes the weights
merged = codyra.merge(copy.deepcopy(injected))
plain = row("image inference", "never-injected CLIP", B, inference(model.encode_image, images))
row("", "adapters live (before merge)", B, inference(injected.encode_image, images), plain=plain)
row("", "merged", B, inference(merged.encode_image, images), plain=plain)

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
