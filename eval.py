"""Evaluate CLIP on a continual-learning setting, and the paper's metrics: train.py evaluates
with these after every task; run alone (python eval.py --setting mtil --data-dir ~/data, --model
out/xtail-codyra/checkpoint.pt), this script writes one row: zero-shot, or a checkpoint's."""
import argparse
import fcntl
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import clip_model
import data
import tiny_world

SETTINGS = {**data.BENCHMARKS, "tiny": tiny_world.BENCHMARK, "folders": data.FOLDERS}


# --- metrics (ZSCL and RAIL's). acc[t][j]: top-1 accuracy (%) on dataset j after training task t
def compute_metrics(acc):
    """Transfer (over the rows above the diagonal), Average (all rows), Last: mean, per dataset."""
    per = {"transfer": [sum(r[j] for r in acc[:j]) / len(acc[:j]) for j in range(1, len(acc[0]))],
           "average": [sum(col) / len(col) for col in zip(*acc)], "last": list(acc[-1])}
    return {name: {"mean": sum(v) / len(v) if v else None,
                   "per_dataset": [None] * (name == "transfer") + v} for name, v in per.items()}


def format_row(label, values):
    return f"{label:<10}" + "".join(f"{'-' if v is None else f'{v:.1f}':>7}" for v in values)


def format_rows(datasets, rows, label=""):
    """A header, then each (name, accuracy per dataset) row with its mean."""
    return "\n".join([f"{label:<10}" + "".join(f"{d[:6]:>7}" for d in datasets) + "   mean"] + [
        format_row(name, row + [sum(row) / len(row)]) for name, row in rows])


def format_matrix(acc, datasets, zero_shot=None):
    """The accuracy matrix so far: the zero-shot row if given, then one row per finished task."""
    named = [("zero-shot", zero_shot)] if zero_shot else []
    return format_rows(datasets, named + [(d[:9], row) for d, row in zip(datasets, acc)], "after")


def format_table(metrics, datasets, zero_shot=None):
    """The paper's table of the metrics; beside, the zero-shot row's means (as the paper's)."""
    return "\n".join([format_rows(datasets, [])] + [
        format_row(name.capitalize(), metrics[name]["per_dataset"] + [metrics[name]["mean"]])
        + (f"   (zero-shot {zero_shot[name]['mean']:.1f})"
           if zero_shot and zero_shot[name]["mean"] is not None else "")
        for name in ("transfer", "average", "last")])


# --- evaluation
@torch.no_grad()
def class_features(model, classnames, templates, device):
    """(C, E) normalised text features, each the normalised mean over the template ensemble."""
    tokens = clip_model.tokenize([t.format(c) for c in classnames for t in templates]).to(device)
    feats = torch.cat([model.encode_text(chunk) for chunk in tokens.split(1024)]).float()
    feats = F.normalize(feats, dim=-1).view(len(classnames), len(templates), -1).mean(1)
    return F.normalize(feats, dim=-1)  # (C, E)


@torch.no_grad()
def image_features(encode, images, device, batch_size, workers):
    """(N, E) normalised features (encode: images -> (B, E)) and (N,) labels of a test set."""
    feats, labels = [], []
    batch_size = batch_size or (1024 if device.type == "cuda" else 256)  # --eval-batch-size's
    for x, y in images.batches(batch_size, workers, pin=device.type == "cuda"):
        x = clip_model.normalize(x.to(device, non_blocking=True))  # (B, 3, R, R)
        feats.append(F.normalize(encode(x).float(), dim=-1))
        labels.append(y.to(device))
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def evaluate(model, tasks, union, device, batch_size=None, workers=0, times=None, keep=None):
    """Top-1 accuracy (%) on every task's test set (a row of the accuracy matrix), each image among
    all tasks' classes if union (X-TAIL), else its own task's. times: gets the text's seconds
    ("eval_text"); keep: per task the (N,) predictions (CPU) and (N, E) image features, and
    "texts": per task its classes' (C, E) text features."""
    was_training, began = model.training, time.time()
    model.eval()
    texts = [class_features(model, t.classnames, t.templates, device) for t in tasks]
    if times is not None:
        if device.type == "cuda":
            torch.cuda.synchronize()  # the GPU's work too
        times["eval_text"] = time.time() - began
    every_class, row = torch.cat(texts), []  # (sum of C, E): the union label space
    for task, text, offset in zip(tasks, texts, data.union_offsets(tasks)):
        img, labels = image_features(model.encode_image, task.test, device, batch_size, workers)
        with torch.autocast(device.type, enabled=False):  # NOTE: bf16 scores would tie near classes
            pred = (img @ (every_class if union else text).T).argmax(-1) - (offset if union else 0)
        row.append(100.0 * (pred == labels).float().mean().item())
        if keep is not None:
            keep.setdefault("predictions", []).append(pred.cpu())
            keep.setdefault("features", []).append(img)
            keep["texts"] = texts
    model.train(was_training)
    return row


# --- what train.py and this script share: flags, the setting's tasks and model, device, files
class _DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)": such help says what it means
        hidden = action.default is None or action.default is False
        return action.help if hidden else super()._get_help_string(action)


def parser(description):
    """argparse of both scripts' flags and its groups by title; shows defaults, errors in a line."""
    p = argparse.ArgumentParser(description=description, formatter_class=_DefaultsShown)
    p.error = lambda message: p.exit(2, f"error: {message} (see --help)\n")
    groups = {title: p.add_argument_group(title) for title in ("data", "model", "system")}
    group = groups["data"]
    group.add_argument("--setting", choices=sorted(SETTINGS), default="tiny", help="task sequence:"
                       " the offline tiny world, MTIL (Table 2), X-TAIL (Table 1) or your folders")
    group.add_argument("--data-dir", default="data", help="folder of the datasets "
                       "(docs/benchmarks.md) or of your tasks (docs/own_tasks.md)")
    group.add_argument("--datasets", help="comma-separated datasets in order (default: all)")
    group.add_argument("--download", action="store_true", help="let torchvision fetch what it can")
    group.add_argument("--layout", choices=sorted(data.LAYOUTS), help="the datasets' folders and "
                       "splits (docs/benchmarks.md); default: the setting's (data.BENCHMARKS)")
    group.add_argument("--prompts", choices=data.PROMPTS, help="class prompts (docs/benchmarks.md);"
                       " training uses the first of each class; default: the setting's")
    group.add_argument("--eval-style", choices=["task-aware", "union"],
                       help="each image among its own dataset's classes (MTIL) or among all "
                            "datasets' classes (X-TAIL); default: the setting's")
    group.add_argument("--holdout", help="comma-separated datasets never trained, evaluated before "
                       f"the first task and after the last (Table 4): {','.join(data.HOLDOUT)}; "
                       f"'none'; default: tiny {','.join(tiny_world.HOLDOUT)}, others none")
    groups["model"].add_argument("--model", help="OpenAI model name (default ViT-B/16), weight "
                                 "file, checkpoint.pt, transformers or open_clip folder, "
                                 "hf-hub:<id> (docs/checkpoints.md), or tiny: the shipped 32 px "
                                 "CLIP (tiny's default)")
    group = groups["system"]
    group.add_argument("--out", help="output folder (default: out/<setting>-<method>)")
    group.add_argument("--overwrite", action="store_true", help="replace the results in --out")
    group.add_argument("--seed", type=int, default=8, help="random seed (the released code's)")
    group.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    group.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: "
                       "autocast, fp32 weights, CUDA only (why not default: docs/benchmarks.md)")
    group.add_argument("--eval-batch-size", type=int,
                       help="images per evaluation batch (default 1024 on CUDA, 256 on CPU)")
    group.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                       help="loader processes decoding image files (the cores, at most 8)")
    group.add_argument("--cache-dir", default="~/.cache/codyra/eval", help="test images decoded "
                       "once as uint8 (150 KB each, ~15 GB for MTIL); 'none': at every evaluation")
    return p, groups


def check_arguments(p, args, run):
    """Validate the shared flags; fill in --out (out/<setting>-<run>) and the setting's defaults."""
    args.out = args.out or os.path.join("out", f"{args.setting}-{run}")
    known = (cfg := SETTINGS[args.setting])["datasets"]  # cfg: where no flag says otherwise
    args.datasets = None if args.datasets is None else args.datasets.split(",")
    if args.datasets is not None and sorted(set(args.datasets) - {""}) != sorted(args.datasets):
        p.error(f"--datasets {','.join(args.datasets)!r}: expected names, none empty or twice")
    if known and any(d not in known for d in args.datasets or ()):  # folders: when read
        p.error(f"--datasets {','.join(args.datasets)}: --setting {args.setting} has "
                f"{','.join(known)}")
    if args.setting in ("tiny", "folders") and (args.layout or args.prompts):
        p.error(f"--layout and --prompts are for mtil and xtail, not {args.setting}")
    args.holdout = [] if args.holdout == "none" else args.holdout.split(",") if args.holdout else (
        list(tiny_world.HOLDOUT) if args.setting == "tiny" else [])
    held = {"tiny": tiny_world.DOMAINS, "folders": args.holdout}.get(args.setting, data.HOLDOUT)
    if bad := [d for d in args.holdout if d not in held or d in (args.datasets or known)]:
        p.error(f"--holdout {bad[0]}: the run trains it too; leave it out of --datasets" if
                bad[0] in held else f"--holdout {bad[0]}: expected one of {','.join(held)}")
    args.eval_style = args.eval_style or cfg["eval_style"]
    args.layout, args.prompts = args.layout or cfg.get("layout"), args.prompts or cfg.get("prompts")
    if min(args.workers, args.seed, args.eval_batch_size or 1) < 0 or args.eval_batch_size == 0:
        p.error("--eval-batch-size must be >= 1, --workers and --seed >= 0")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is a file; choose a folder")


def load_setting(args, shots=None):
    """(tasks, held-out tasks, model), the tasks prepared for the model; shots None: no training."""
    try:  # the data first: a run without it stops before downloading any weights
        if args.setting == "folders":  # --holdout: task folders never trained
            tasks, holdout = data.load_folders(args.data_dir, shots, args.seed, args.datasets,
                                               args.holdout)
        else:
            def load(shots, names):  # tiny: generated in memory
                return (tiny_world.tasks(shots, args.seed, names) if args.setting == "tiny" else
                        data.load_tasks(args.setting, args.data_dir, shots, args.seed, names,
                                        args.download, args.layout, args.prompts))
            tasks = load(shots, args.datasets)
            holdout = load(None, args.holdout) if args.holdout else []
            for task in holdout:  # CIFAR100's training arrays: not needed
                task.train = None
        # tiny: one model whatever the seed, as CLIP's weights are
        tiny = args.model == "tiny" or (args.setting == "tiny" and args.model is None)
        model = tiny_world.pretrained() if tiny else clip_model.load(args.model or "ViT-B/16")
        cache = None if args.cache_dir == "none" else args.cache_dir
        data.prepare(tasks + holdout, model.visual.input_resolution, cache, args.workers)
    except (data.DataError, clip_model.CLIPLoadError) as e:
        sys.exit(f"error: {e}")
    return tasks, holdout, model


def claim(out):  # make and lock `out` while this process lives: a second run into it stops
    try:
        os.makedirs(out, exist_ok=True)
        lock = open(os.path.join(out, ".lock"), "w")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        sys.exit(f"error: another run is writing to {out}; wait for it or choose another --out")
    except OSError as e:
        sys.exit(f"error: cannot write to --out {out} ({e.strerror}); choose another folder")
    return lock  # held until the process ends


def environment(device):  # where a run ran: versions, the device, the project's git commit if any
    git = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse",
                          "--short", "HEAD"], text=True, capture_output=True)
    return {"torch": str(torch.__version__), "python": platform.python_version(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
            f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
            "commit": git.stdout.strip() or None}


def pick_device(name, precision="fp32"):
    """The run's device, printed once: fp32 weights, bf16 autocast if asked (CUDA only)."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        sys.exit(f"error: --device {name}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"error: --device {name}: torch sees no CUDA GPU here; use --device cpu")
    if precision == "bf16" and device.type != "cuda":
        sys.exit(f"error: --precision bf16 needs CUDA; on {device}, use --precision fp32")
    print(f"device: {device} ({'bf16 autocast, ' * (precision == 'bf16')}fp32 weights)")
    return device


def write_json(path, obj):
    with clip_model.atomic(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)


# --- zero-shot (or any checkpoint's) accuracy: one row
def main():
    p, groups = parser("Evaluate CLIP (zero-shot, or a checkpoint) on every dataset of a setting.")
    groups["model"].add_argument("--export", nargs=2, metavar=("FORMAT", "FOLDER"), help="instead:"
                                 " write --model as a folder that transformers (FORMAT hf) or "
                                 "open_clip reads; over another model: with --overwrite")
    args = p.parse_args()
    if args.export:  # no data, no evaluation
        fmt, folder = args.export
        there = [f for f in sum(clip_model.FILES.values(), ()) if os.path.isfile(f"{folder}/{f}")]
        if fmt not in clip_model.FILES:
            p.error(f"--export {fmt}: expected {' or '.join(clip_model.FILES)}")
        if there and not args.overwrite:  # another model's, or an earlier export's
            p.error(f"--export {fmt} {folder} holds {there[0]}; pass --overwrite to replace it")
        made = not os.path.isdir(folder)  # then removed again if no model comes to fill it
        try:  # '', a file, no permission: said before the weights load
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            p.error(f"--export {fmt} {folder!r}: cannot make that folder ({e.strerror})")
        try:
            model = (tiny_world.pretrained() if args.model == "tiny" else  # as load_setting
                     clip_model.load(args.model or "ViT-B/16"))
            return print(f"wrote {clip_model.export(model, folder, fmt)}")
        except (clip_model.CLIPLoadError, OSError) as e:
            if made and not os.listdir(folder):
                os.rmdir(folder)
            sys.exit(f"error: {e}")
    check_arguments(p, args, "zeroshot")
    results_path = os.path.join(args.out, "results.json")
    if os.path.exists(results_path) and not args.overwrite:
        p.error(f"{results_path} exists; pass --overwrite or choose another --out")
    device = pick_device(args.device, args.precision)
    tasks, holdout, model = load_setting(args)
    lock = claim(args.out)  # noqa: F841
    start, batch, union = time.time(), args.eval_batch_size, args.eval_style == "union"
    with torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16"):
        row = evaluate(model.to(device), tasks, union, device, batch, args.workers)
        held = holdout and evaluate(model, holdout, False, device, batch, args.workers)  # Table 4
    metrics = compute_metrics([row])
    print(format_rows([t.name for t in tasks], [("accuracy", row)]))
    if len(row) > 1:
        print(f"transfer (columns 2..{len(row)} of this row): {metrics['transfer']['mean']:.1f}")
    results = {"setting": args.setting, "datasets": [t.name for t in tasks],
               "tasks": [t.describe() for t in tasks], "acc": [row], "metrics": metrics}
    if holdout:  # the zero-shot row of Table 4
        results["holdout"] = {"datasets": [t.name for t in holdout], "acc": held}
        print(format_rows(results["holdout"]["datasets"], [("accuracy", held)], "hold-out"))
    write_json(results_path, {**results, "seconds": time.time() - start, "args": vars(args),
                              "environment": environment(device)})
    print(f"wrote {results_path}")


if __name__ == "__main__":
    main()
