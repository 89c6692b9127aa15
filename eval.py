"""Evaluate CLIP on a continual-learning setting, and the paper's metrics.

    python eval.py --setting mtil --data-dir ~/data               # OpenAI CLIP zero-shot
    python eval.py --setting xtail --model out/checkpoint.pt      # a model trained by train.py
    python eval.py --compare ViT-B/16 out/checkpoint.pt           # what training changed in the weights

A[t, j] is the top-1 accuracy (%) on dataset j after training task t. MTIL evaluates
task-aware (each image among its own dataset's classes, template ensemble); X-TAIL
evaluates task-agnostic (each image among the union of every dataset's classes).
train.py imports the functions below; run alone, this script writes one row.
"""
import argparse
import copy
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import transforms

import analysis
import clip_model
import data

# -----------------------------------------------------------------------------
# metrics (ZSCL / RAIL definitions; SPEC section 3). acc: rows = tasks finished, columns = datasets


def transfer(acc):
    """Zero-shot transfer: for each dataset j > 0, the mean of A[t, j] over the rows t < j."""
    per = [sum(row[j] for row in acc[:j]) / len(acc[:j]) for j in range(1, len(acc[0]))]
    return (sum(per) / len(per) if per else None), [None] + per  # one dataset: nothing to transfer to


def average(acc):
    """For each dataset, the mean over all rows (every evaluation of the sequence)."""
    per = [sum(col) / len(col) for col in zip(*acc)]
    return sum(per) / len(per), per


def last(acc):
    """The accuracy on each dataset after the last task."""
    per = list(acc[-1])
    return sum(per) / len(per), per


def compute_metrics(acc):
    return {name: dict(zip(("mean", "per_dataset"), fn(acc)))
            for name, fn in (("transfer", transfer), ("average", average), ("last", last))}


def format_row(label, values, width=7):
    cells = "".join(f"{'-' if v is None else f'{v:.1f}':>{width}}" for v in values)
    return f"{label:<10}{cells}"


def format_header(datasets, label=""):
    return f"{label:<10}" + "".join(f"{d[:6]:>7}" for d in datasets) + "   mean"


def format_matrix(acc, datasets):
    """The accuracy matrix so far, one row per finished task, with each row's mean."""
    lines = [format_header(datasets, "after")]
    for t, row in enumerate(acc):
        lines.append(format_row(datasets[t][:9], row + [sum(row) / len(row)]))
    return "\n".join(lines)


def format_table(metrics, datasets):
    """The paper's table: Transfer, Average and Last rows, one column per dataset, plus the mean."""
    lines = [format_header(datasets)]
    for name in ("transfer", "average", "last"):
        m = metrics[name]
        lines.append(format_row(name.capitalize(), m["per_dataset"] + [m["mean"]]))
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def class_features(model, classnames, templates, device):
    """(C, E) normalised text features, each the normalised mean over the template ensemble."""
    tokens = clip_model.tokenize([t.format(c) for c in classnames for t in templates]).to(device)
    feats = torch.cat([model.encode_text(chunk) for chunk in tokens.split(1024)]).float()
    feats = F.normalize(feats, dim=-1).view(len(classnames), len(templates), -1).mean(1)  # (C, E)
    return F.normalize(feats, dim=-1)


def normalize(images):
    """(B, 3, R, R) uint8 -> float: the arithmetic of ToTensor + Normalize, so the same bits, run on
    the images' device (a uint8 batch is also a quarter of the bytes to copy there)."""
    mean = torch.tensor(clip_model.MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(clip_model.STD, device=images.device).view(3, 1, 1)
    return images.float().div(255).sub(mean).div(std)


@torch.no_grad()
def image_features(model, dataset, device, batch_size, workers):
    """(N, E) normalised image features and (N,) labels of a whole test set (float or uint8 images)."""
    if isinstance(dataset, CachedImages):  # one copy per batch: loader processes would cost more than they save
        loader = dataset.batches(batch_size, pin=device.type == "cuda")
    else:
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    feats, labels = [], []
    for images, y in loader:
        images = images.to(device, non_blocking=True)
        if images.dtype == torch.uint8:  # from the cache: normalised here
            images = normalize(images)
        feats.append(F.normalize(model.encode_image(images).float(), dim=-1))
        labels.append(y.to(device))
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def evaluate(model, tasks, union, device, batch_size=None, workers=2):
    """Top-1 accuracy (%) on every task's test set: one row of the accuracy matrix.

    union=False: task-aware, each image among its own task's classes (MTIL).
    union=True: task-agnostic, each image among all tasks' classes; its target is its
    local label plus the number of classes of the tasks before it (X-TAIL).
    batch_size None: 1024 on CUDA, 256 on CPU.
    """
    batch_size = batch_size or (1024 if device.type == "cuda" else 256)
    was_training = model.training
    model.eval()
    texts = [class_features(model, t.classnames, t.templates, device) for t in tasks]
    every_class = torch.cat(texts)  # (sum of C, E): the union label space
    row = []
    for task, text, offset in zip(tasks, texts, data.union_offsets(tasks)):
        img, labels = image_features(model, task.test, device, batch_size, workers)
        with torch.autocast(device.type, enabled=False):  # NOTE: bf16 scores would tie near classes
            pred = (img @ every_class.T).argmax(-1) - offset if union else (img @ text.T).argmax(-1)
        row.append(100.0 * (pred == labels).float().mean().item())
    model.train(was_training)
    return row

# -----------------------------------------------------------------------------
# test images decoded once per run: a uint8 cache on disk, reused by every evaluation


class CachedImages(torch.utils.data.Dataset):
    """A test set as (3, R, R) uint8 tensors, already resized and cropped, read from a .npy file.
    The file is memory-mapped, so memory stays bounded by what the OS keeps in its page cache
    (MTIL's ~100k test images are ~15 GB at 224 px; in RAM they would not fit most machines)."""

    def __init__(self, path, labels):
        self.path, self.labels, self.images = path, labels, None

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        if self.images is None:  # opened lazily, in each loader process
            self.images = np.load(self.path, mmap_mode="r")  # (N, 3, R, R) uint8
        return torch.from_numpy(np.array(self.images[i])), self.labels[i]

    def batches(self, batch_size, pin=False):
        """(B, 3, R, R) uint8 and (B,) labels, in order: one slice of the file each."""
        images = np.load(self.path, mmap_mode="r")
        for i in range(0, len(self), batch_size):
            x = torch.from_numpy(np.array(images[i:i + batch_size]))
            yield (x.pin_memory() if pin else x), torch.tensor(self.labels[i:i + batch_size])

    def __getstate__(self):  # NOTE: a pickled memmap is a full copy; workers reopen the file instead
        return {**self.__dict__, "images": None}


def uint8_transform(resolution):
    """The deterministic steps of the evaluation transform (resize, crop, RGB) -> (3, R, R) uint8."""
    steps = clip_model.transform(False, resolution).transforms
    assert isinstance(steps[-2], transforms.ToTensor) and isinstance(steps[-1], transforms.Normalize)
    return transforms.Compose(steps[:-2] + [transforms.PILToTensor()])


def _fingerprint(images):
    """A short hash of an ImageSet's image list: its file paths, or its pixels."""
    h = hashlib.sha1()
    if isinstance(images, np.ndarray):
        h.update(str(images.shape).encode())
        h.update(np.ascontiguousarray(images).data)
    else:
        h.update("\n".join(images).encode())
    return h.hexdigest()[:16]


def cache_test_set(name, dataset, resolution, cache_dir, workers=2):
    """`dataset` as CachedImages; the file is built on first use, decoding in `workers` loader
    processes, and written atomically. Its name holds the dataset name, the resolution and a hash of
    the image list. NOTE: images replaced in place under the same paths are not noticed; delete the
    file (or the folder) then."""
    path = os.path.join(cache_dir, f"{name}_{resolution}px_{_fingerprint(dataset.images)}.npy")
    if not os.path.exists(path):
        os.makedirs(cache_dir, exist_ok=True)
        source = copy.copy(dataset)
        source.transform = uint8_transform(resolution)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            out = np.lib.format.open_memmap(tmp, "w+", np.uint8, (len(dataset), 3, resolution, resolution))
            i = 0
            for images, _ in DataLoader(source, batch_size=64, num_workers=workers):
                out[i:i + len(images)] = images.numpy()
                i += len(images)
            out.flush()
            del out
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return CachedImages(path, dataset.labels)


def prepare_test_sets(tasks, resolution, cache_dir, workers):
    """Give every task's test set the evaluation transform, or (cache_dir not "none") replace it
    by its uint8 cache, so that evaluations after every task cost forward passes, not decoding."""
    for task in tasks:
        task.test.transform = clip_model.transform(False, resolution)
        if cache_dir == "none":
            continue
        start = time.time()
        try:
            task.test = cache_test_set(task.name, task.test, resolution, os.path.expanduser(cache_dir), workers)
        except OSError as e:  # a full or read-only disk: evaluate from the images instead
            print(f"{task.name}: no test-image cache ({e}); decoding at every evaluation")
            continue
        if time.time() - start > 1:
            print(f"{task.name}: {len(task.test)} test images cached in {time.time() - start:.0f}s")

# -----------------------------------------------------------------------------
# shared by train.py and eval.py


def load_model(name, setting):
    """An OpenAI model name or weight file, a checkpoint of this project, or the tiny world's CLIP."""
    if setting == "tiny" and name in (None, "tiny"):
        import tiny_world  # one pretrained model whatever the run's seed, as CLIP's weights are one
        return tiny_world.pretrained_tiny_clip(seed=0)
    return clip_model.load(name or "ViT-B/16")


def write_json(path, obj):
    """Write atomically: an interrupted run never leaves a half-written file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def compile_encoders(model):
    """torch.compile the two towers in place (state-dict keys unchanged); inject and merge swap
    modules inside them, which makes torch recompile once per task."""
    model.visual.compile()
    model.transformer.compile()


def pick_device(name):
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"device: {device}" + (" (bf16 autocast, fp32 weights)" if device.type == "cuda" else " (fp32)"))
    return device


def add_common_args(p, extra_groups=()):
    """The flags of both scripts; returns the argument groups by title (extra_groups are made empty,
    between model and system, for train.py to fill)."""
    groups = {title: p.add_argument_group(title) for title in ("data", "model", *extra_groups, "system")}
    g = groups["data"]
    g.add_argument("--setting", choices=["tiny", "mtil", "xtail"], default="tiny",
                   help="task sequence: the offline tiny world, MTIL (Table 2) or X-TAIL (Table 1)")
    g.add_argument("--data-dir", default="data", help="folder holding the datasets (see README)")
    g.add_argument("--datasets", help="comma-separated datasets, in order (default: the setting's order)")
    g.add_argument("--download", action="store_true", help="download the datasets torchvision can fetch")
    g.add_argument("--eval-style", choices=["task-aware", "union"], help="each image among its own dataset's "
                   "classes (MTIL) or among all datasets' classes (X-TAIL); default: the setting's")
    g = groups["model"]
    g.add_argument("--model", help="OpenAI model name (default ViT-B/16), OpenAI weight file, or a "
                                   "checkpoint.pt of this project; the tiny setting has its own")
    g = groups["system"]
    g.add_argument("--out", default="out", help="output folder for results.json (and checkpoints)")
    g.add_argument("--overwrite", action="store_true", help="replace another run's results in --out")
    g.add_argument("--seed", type=int, default=8, help="random seed (the released code's is 8)")
    g.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    g.add_argument("--eval-batch-size", type=int,
                   help="images per evaluation batch (default 1024 on CUDA, 256 on CPU)")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="data-loader processes (default: the CPU cores, at most 8)")
    g.add_argument("--cache-dir", default="~/.cache/codyra/eval",
                   help="folder for the test images, resized and stored as uint8 once (~150 KB per image "
                        "at 224 px, ~15 GB for MTIL); 'none' decodes them at every evaluation")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile both encoders; off by default: not shown to be faster including "
                        "its compile time (see bench.py --compile)")
    return groups


def check_common_args(p, args):
    if args.datasets:
        args.datasets = args.datasets.split(",")
        known = data.SETTINGS.get(args.setting, {}).get("datasets", [])
        unknown = [d for d in args.datasets if d not in known]
        if unknown:
            p.error(f"unknown dataset(s) {','.join(unknown)} for --setting {args.setting}; "
                    f"choose from {','.join(known)}")
    args.eval_style = args.eval_style or data.SETTINGS[args.setting]["eval"]
    if (args.eval_batch_size is not None and args.eval_batch_size < 1) or args.workers < 0:
        p.error("--eval-batch-size must be >= 1 and --workers >= 0")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    g = p.add_argument_group("analysis")
    g.add_argument("--compare", nargs=2, metavar=("A", "B"), help="print what changed from model A to model B "
                   "(model names, OpenAI weight files or checkpoints): drift, ||W_B - W_A||_F, amplification")
    g.add_argument("--amp-rank", type=int, help="r of the amplification factor, in singular vectors "
                                                "(default: the rank of each W_B - W_A)")
    args = p.parse_args()
    check_common_args(p, args)
    if args.amp_rank is not None and args.amp_rank < 1:
        p.error("--amp-rank must be >= 1")
    if args.compare:
        device = pick_device(args.device)
        try:
            a, b = [clip_model.load(path, device) for path in args.compare]
            print(analysis.format_comparison(analysis.compare(a, b, args.amp_rank)))
        except (clip_model.CLIPLoadError, ValueError) as e:
            sys.exit(f"error: {e}")
        return
    results_path = os.path.join(args.out, "results.json")
    if os.path.exists(results_path) and not args.overwrite:
        p.error(f"{results_path} exists; pass --overwrite or choose another --out")
    os.makedirs(args.out, exist_ok=True)
    device = pick_device(args.device)
    try:
        tasks = data.load_tasks(args.setting, args.data_dir, shots=0, seed=args.seed,
                                datasets=args.datasets, download=args.download)
        model = load_model(args.model, args.setting).to(device)
    except (data.DataError, clip_model.CLIPLoadError) as e:
        sys.exit(f"error: {e}")
    prepare_test_sets(tasks, model.visual.input_resolution, args.cache_dir, args.workers)
    if args.compile:
        compile_encoders(model)
    union = args.eval_style == "union"
    start = time.time()
    with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
        row = evaluate(model, tasks, union, device, args.eval_batch_size, args.workers)
    names = [t.name for t in tasks]
    metrics = compute_metrics([row])
    print(format_header(names))
    print(format_row("accuracy", row + [metrics["average"]["mean"]]))
    if len(row) > 1:
        print(f"transfer (columns 2..{len(row)} of this row): {metrics['transfer']['mean']:.1f}")
    write_json(results_path, {"setting": args.setting, "datasets": names, "acc": [row],
                              "metrics": metrics, "seconds": time.time() - start, "args": vars(args)})
    print(f"wrote {results_path}")


if __name__ == "__main__":
    main()
