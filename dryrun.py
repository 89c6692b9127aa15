"""The dry run (`python bench.py --sequence mtil|xtail`): `train.py` end to end on a synthetic copy
of the benchmark (its real on-disk layout, class counts and split sizes, JPEGs of each dataset's
typical size, written once) with random fp16 weights; a table of every phase. Its dataset writer
also makes the tests' fake datasets (tests/)."""
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import scipy.io  # the Flowers102 and StanfordCars .mat files
import torch
from PIL import Image

import clip_model
import data
import eval as evaluation

PIXELS = dict(aircraft=(1000, 700), caltech101=(300, 200), dtd=(500, 500), eurosat=(64, 64),
              flowers=(500, 667), food=(512, 384), pets=(500, 375), cars=(700, 480),
              sun397=(500, 375))  # a typical JPEG's (width, height) in each dataset
ITERATIONS, BATCH = 500, 64  # train.py's recipe for MTIL and X-TAIL


# --- the writers: a dataset in either layout
def jpeg(rng, size, path):
    """A (w, h) JPEG that compresses (~0.4 byte/pixel at quality 90) and decodes like a photo."""
    small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    pixels = np.asarray(small.resize(size, Image.BICUBIC), np.float32)  # smooth colours
    pixels += rng.normal(0, 12, pixels.shape)  # plus noise
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def write(path, content):  # bytes, text or a list of lines into path, its folders made
    path.parent.mkdir(parents=True, exist_ok=True)
    content = "".join(row + "\n" for row in content) if isinstance(content, list) else content
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)


def write_dataset(root, layout, name, folders, names, counts, rng, pixels=(8, 8)):
    """One dataset under root, in `layout` as data.LAYOUTS reads it. folders: its classes' names on
    disk; names: the same in CoOp's split files; counts: {"train": n, "test": n} images. Image i of
    a split has class (-1 - i) % C: files list the classes out of label order. NOTE: image files are
    hard links to a pool of JPEGs (size `pixels`) in root/.pool: to corrupt one, unlink it first."""
    C, (dirs, needs, _) = len(folders), data.LAYOUTS[layout][name]
    d, split = root / dirs[0], {s: [(i, (-1 - i) % C) for i in range(n)] for s, n in counts.items()}
    pool = [root / ".pool" / f"{name}_{k}.jpg" for k in range(8)]
    def rows(pattern, *splits):  # pattern formatted for each image of those splits
        return [pattern.format(s=s, i=i, c=c + 1, f=folders[c])
                for s in splits for i, c in split[s]]
    def images(paths):  # under d: hard links (a copy where the file system has none) to the pool
        for path in pool:
            path.exists() or jpeg(rng, pixels, path)
        for k, path in enumerate(d / p for p in paths):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(pool[k % len(pool)], path)
            except OSError:
                shutil.copyfile(pool[k % len(pool)], path)
    if name == "mnist":  # idx files: 0, 0, 0x08 (uint8), ndim, big-endian sizes, data
        for s, prefix in (("train", "train"), ("test", "t10k")):
            for part, array in (("labels-idx1", np.array([c for _, c in split[s]], np.uint8)),
                                ("images-idx3", rng.integers(0, 256, (len(split[s]), 28, 28),
                                                             dtype=np.uint8))):
                write(d / f"{prefix}-{part}-ubyte", bytes([0, 0, 8, array.ndim])
                      + np.array(array.shape, ">u4").tobytes() + array.tobytes())
    elif name == "cifar100":
        write(d / "meta", pickle.dumps({"fine_label_names": folders}))
        for s in split:
            pixels = rng.integers(0, 256, (len(split[s]), 3072), np.uint8)  # rows of 3 x 32 x 32
            write(d / s, pickle.dumps({"data": pixels, "fine_labels": [c for _, c in split[s]]}))
    elif layout == "coop" and name != "aircraft":  # CoOp's split file: [path, label, classname]
        pattern = {"flowers": "image_{s}{i:05d}.jpg", "pets": "{f}_{s}{i}.jpg",
                   "cars": "cars_{s}/{i:05d}.jpg"}.get(name, "{f}/{s}_{i}.jpg")
        items = {s: [[path, c, names[c]] for path, (_, c) in zip(rows(pattern, s), split[s])]
                 for s in split}
        write(d / needs[0], json.dumps({"train": items["train"], "val": [], "test": items["test"]}))
        images(rows(("" if name == "cars" else needs[1] + "/") + pattern, *split))
    elif name in ("aircraft", "dtd", "pets"):  # an index file a split: (its name, line, image)
        index, line, image = {  # pets: "<breed>_<n> <class id> <species> <breed id>"
            "aircraft": ("images_variant_{s}.txt", "{s}{i:07d} {f}", "images/{s}{i:07d}.jpg"),
            "dtd": ("labels/{s}1.txt", "{f}/{f}_{s}{i}.jpg", "images/{f}/{f}_{s}{i}.jpg"),
            "pets": ("annotations/{v}.txt", "{f}_{s}{i} {c} 1 {c}", "images/{f}_{s}{i}.jpg")}[name]
        if name == "aircraft":
            write(d / "variants.txt", list(folders))
        for s in split:
            write(d / index.format(s=s, v={"train": "trainval"}.get(s, s)), rows(line, s))
            images(rows(image, s))
    elif name in ("caltech101", "eurosat", "sun397"):  # class folders, split 80/20 by the reader
        if name == "sun397":
            write(d / "ClassName.txt", ["/" + f for f in folders])
        if name == "caltech101":  # skipped by the reader, as torchvision does
            images(["101_ObjectCategories/BACKGROUND_Google/image_0001.jpg"])
        images(rows({"caltech101": "101_ObjectCategories/{f}/image_{s}{i:05d}.jpg",
                     "eurosat": "2750/{f}/{f}_{s}{i}.jpg", "sun397": "{f}/sun_{s}{i}.jpg"}[name],
                    *split))
    elif name == "flowers":  # images 1..N, the train split first; labels by image id
        n, ids = len(split["train"]), np.arange(1, sum(counts.values()) + 1, dtype=np.uint16)[None]
        labels = [c + 1 for s in split for _, c in split[s]]
        d.mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(d / "imagelabels.mat", {"labels": np.array([labels], np.uint8)})
        scipy.io.savemat(d / "setid.mat", {"trnid": ids[:, :n], "tstid": ids[:, n:]})
        images([f"jpg/image_{i:05d}.jpg" for i in ids[0]])
    elif name == "food":
        for s in split:
            meta = {}  # its classes in order of first appearance: out of label order
            for i, c in split[s]:
                meta.setdefault(folders[c], []).append(f"{folders[c]}/{s}{i}")
            write(d / f"meta/{s}.json", json.dumps(meta))
            images([f"images/{path}.jpg" for paths in meta.values() for path in paths])
    elif name == "cars":
        (d / "devkit").mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(d / "devkit/cars_meta.mat", {"class_names": np.array([folders], object)})
        for s, mat in zip(split, needs[1:3]):  # devkit/cars_train_annos.mat, cars_test_annos_...
            annos = [(np.array([[c + 1]], np.uint16), f"{i:05d}.jpg") for i, c in split[s]]
            scipy.io.savemat(d / mat, {"annotations": np.array(
                [annos], [("class", "O"), ("fname", "O")])})
            images(rows("cars_{s}/{i:05d}.jpg", s))


# --- the dry run: the synthetic benchmark on disk, train.py on it, every phase timed
def sizes(sequence, scale):
    """{dataset: (classes, train images, test images)}: the real ones (data.SIZES, in the
    sequence's default layout) times scale, each split at least one image per class."""
    known = data.SIZES[data.BENCHMARKS[sequence]["layout"]]
    return {name: (C, *(max(C, round(n * scale)) for n in known[name][1:]))
            for name in data.BENCHMARKS[sequence]["datasets"] for C in [known[name][0]]}


def class_names(name, C):
    """(folder names, names) of a dataset's classes: the real ones where the assets list them."""
    entry, generic = data.ASSETS["mtil"].get(name, {}), [  # SUN397's: a folder per initial
        f"{'s/' * (name == 'sun397')}{name}_{c:03d}" for c in range(C)]
    return entry.get("folders", generic)[:C], entry.get("classnames", generic)[:C]


def write_benchmark(home, sequence, scale):
    """The synthetic copy of a sequence at a scale, as home/data (written beside, then renamed)."""
    tmp, rng = home / f"data.{os.getpid()}.tmp", np.random.default_rng(0)
    shutil.rmtree(tmp, ignore_errors=True)
    for name, (C, n_train, n_test) in sizes(sequence, scale).items():
        write_dataset(tmp, data.BENCHMARKS[sequence]["layout"], name, *class_names(name, C),
                      {"train": n_train, "test": n_test}, rng, PIXELS.get(name, (8, 8)))
    os.replace(tmp, home / "data")


def clock(fn, cuda, host=False):
    """(fn(), seconds, peak MB: on CUDA the call's GPU memory unless host; else the process's)."""
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda and not host
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # maxrss: kB on Linux
    return result, time.perf_counter() - began, peak


def main(args, device, size, config):
    """Write what is missing, time indexing and the cache build, run train.py, report. args:
    bench.py's, validated; config: the shape of the CLIP named size."""
    cuda = device.type == "cuda"
    iterations = args.iterations or max(1, round(ITERATIONS * args.scale))
    root, tag = Path(args.root).expanduser(), size.replace("/", "-")
    shape = zlib.crc32(json.dumps(config, sort_keys=True).encode())  # a new shape, new weights
    home, weights = root / f"{args.sequence}-{args.scale:g}", root / f"random-{tag}-{shape:08x}.pt"
    out = Path(args.out or home / f"run-{tag}").expanduser()
    once = []  # (what, seconds): written once per machine, outside the totals
    if not (home / "data").exists():
        once.append(("synthetic benchmark", clock(
            lambda: write_benchmark(home, args.sequence, args.scale), cuda, host=True)[1]))
    if not weights.exists():
        def write_weights():  # a state dict in fp16, as OpenAI ships CLIP
            torch.manual_seed(0)
            sd = clip_model.CLIP(**config).state_dict()
            weights.parent.mkdir(parents=True, exist_ok=True)
            with clip_model.atomic(str(weights)) as tmp:
                torch.save({k: v.half() for k, v in sd.items()}, tmp)
        once.append((f"random {size} weights", clock(write_weights, cuda)[1]))
    # what train.py's set-up does but does not time apart: indexing, the test-image cache build
    tasks, *index = clock(lambda: data.load_tasks(args.sequence, home / "data"), cuda, host=True)
    shutil.rmtree(home / "eval-cache", ignore_errors=True)  # so that the build is timed each time
    _, *cache = clock(lambda: data.prepare(tasks, config["image_resolution"],
                                           str(home / "eval-cache"), args.workers), cuda, True)
    cmd = [sys.executable, str(Path(__file__).with_name("train.py")), "--setting", args.sequence,
           "--data-dir", str(home / "data"), "--model", str(weights), "--out", str(out),
           "--iterations", str(iterations), "--cache-dir", str(home / "eval-cache"),
           "--workers", str(args.workers), "--device", str(device), "--overwrite"]
    cmd += ["--batch-size", str(args.batch_size)] if args.batch_size else []
    out.mkdir(parents=True, exist_ok=True)
    print("$ " + " ".join(cmd[1:]) + f"\n  (its output: {out / 'train.log'})", flush=True)
    with open(out / "train.log", "w") as log:
        run, wall, _ = clock(lambda: subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT),
                             cuda)
    if run.returncode:
        sys.exit("error: train.py failed; the end of its output:\n"
                 + (out / "train.log").read_text()[-3000:])
    res = json.loads((out / "results.json").read_text())
    report(res, tasks, {"index": index, "cache": cache}, wall, out, cuda)
    print(f"model: CLIP {size}, random weights; "
          f"{'written once (outside the totals): ' if once else 'already on disk: '}"
          + (", ".join(f"{what} {s:.0f} s" for what, s in once) or f"data and weights in {root}"))


def report(res, tasks, apart, wall, out, cuda):
    """The table of phases (projected to the real sequence when scaled down), a row per task,
    and the run's own results.json. apart: {phase: (seconds, peak MB)} timed in this process."""
    times, T, setup_s = res["seconds"], len(res["seconds"]), res["setup_seconds"]
    its, B = res["args"]["iterations"], res["args"]["batch_size"]
    real = sizes(res["setting"], 1.0).values()
    n_test = sum(len(t.test) for t in tasks)
    n_files = n_test + sum(len(t.train) for t in tasks)
    real_files, real_test = sum(tr + te for _, tr, te in real), sum(te for *_, te in real)
    prompts = sum(len(t.classnames) * len(t.templates) for t in tasks)
    total = {k: sum(s.get(k, 0) for s in times)
             for k in ("text", "steps", "train", "eval_text", "eval", "routing", "checkpoint")}
    zero_shot_s = res.get("zero_shot_seconds", 0)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # train.py's whole run
    peak = {k: max(s[f"{k}_peak_mb"] for s in times) if cuda else rss
            for k in ("text", "steps", "train", "eval", "checkpoint")}
    ckpt_mb = os.path.getsize(out / "checkpoint.pt") / 2**20
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

