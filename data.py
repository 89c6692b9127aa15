"""The benchmark datasets of MTIL and X-TAIL, on torchvision's folder layouts or CoOp's splits.

Every dataset becomes a `Task`: class names, prompt templates, and train/test sets indexing image
files (CIFAR-100, MNIST: uint8 arrays) without decoding any. `load_tasks` finds every dataset of a
run before reading any: a missing one is reported in one line before training, not at task 9.

    tasks = load_tasks("xtail", "~/data", shots=16)   # 10 Tasks in order, train sets 16-shot
    prepare(tasks, 224, "~/.cache/codyra/eval")       # CLIP's preprocessing, test images cached

Which image lands where (SPEC section 3): caltech101, eurosat and sun397 have no official test set
in torchvision's layout; as ZSCL, random_split 80/20 with seed 42 over torchvision's order (class
folders and files sorted; sun397 by path: file-system order is not portable). Few-shot: k indices
per class (with replacement only when a class has fewer), seeded by (seed, crc32 of the name) only.
"""
import hashlib
import json
import os
import pickle
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import clip_model

# --- the benchmarks (plain data)
BENCHMARKS = {  # datasets in task order: (classes, test images) of the real data
    # paper Table 2, order I; task-aware: each image among its own dataset's classes
    "mtil": {"eval_style": "task-aware", "layout": "torchvision", "datasets": {
        "aircraft": (100, 3333), "caltech101": (101, 1736), "cifar100": (100, 10000),
        "dtd": (47, 1880), "eurosat": (10, 5400), "flowers": (102, 6149), "food": (101, 25250),
        "mnist": (10, 10000), "pets": (37, 3669), "cars": (196, 8041), "sun397": (397, 21751)}},
    # paper Table 1: MTIL without cifar100; union: among all 1,100 classes at once
    "xtail": {"eval_style": "union", "layout": "coop", "datasets": {
        "aircraft": (100, 3333), "caltech101": (100, 2465), "dtd": (47, 1692),
        "eurosat": (10, 8100), "flowers": (102, 2463), "food": (101, 30300), "mnist": (10, 10000),
        "pets": (37, 3669), "cars": (196, 8041), "sun397": (397, 19850)}},
}
ASSETS = json.loads((Path(__file__).parent / "assets" / "classnames_templates.json").read_text())
MNIST_CLASSES = [f"{i} - {w}" for i, w in enumerate(
    "zero one two three four five six seven eight nine".split())]  # torchvision MNIST.classes


class DataError(Exception):
    """A dataset is missing or unreadable; the message is one line saying what to do."""


# --- image sets, the test-image cache, splits, few-shot
@dataclass
class Task:
    name: str
    classnames: list  # index = label
    templates: list   # evaluation ensemble (MTIL) or the single template (X-TAIL); train uses [0]
    train: "ImageSet"
    test: "ImageSet"


class ImageSet(torch.utils.data.Dataset):
    """Labelled images: file paths decoded on access, or a uint8 array (N, H, W[, 3]). Labels are
    plain ints known up front, so samplers and few-shot selection never open a file."""

    def __init__(self, images, labels, transform=None):
        self.images = images  # list[str] or np.ndarray
        self.labels = [int(y) for y in labels]
        self.transform = transform  # PIL RGB image -> anything (clip_model.preprocess)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = self.images[i]
        with (Image.fromarray(image) if isinstance(image, np.ndarray) else Image.open(image)) as f:
            img = f.convert("RGB")
        return (self.transform(img) if self.transform else img), self.labels[i]

    def subset(self, indices):
        idx = list(indices)
        images = (self.images[idx] if isinstance(self.images, np.ndarray)
                  else [self.images[i] for i in idx])
        return ImageSet(images, [self.labels[i] for i in idx], self.transform)

    def batches(self, batch_size, workers=0, pin=False):
        """(images, labels) batches in order, decoded in `workers` loader processes."""
        return torch.utils.data.DataLoader(self, batch_size, num_workers=workers, pin_memory=pin)

    def decoded(self, workers=0):
        """This set with its files decoded once, in `workers` processes, into RGB uint8 arrays:
        a few-shot set is read about a hundred times a task, and the decode cost more than the
        random crop that still happens at every read. Same pixels, so the same crops follow."""
        if isinstance(self.images, np.ndarray):
            return self
        rgb = ImageSet(self.images, self.labels, np.asarray)  # its own generator: no global draw
        loader = torch.utils.data.DataLoader(rgb, batch_size=None, num_workers=workers,
                                             generator=torch.Generator())
        return ImageSet([np.array(image) for image, _ in loader], self.labels, self.transform)

    def cached(self, name, cache_dir, workers=0):
        """This set, transformed once, as CachedImages: a .npy file built atomically on first use,
        named by `name`, item shape and a hash of the paths. NOTE: not bytes: delete it on edits."""
        first = self[0][0]
        key = (str(self.images.shape).encode() + self.images.tobytes()
               if isinstance(self.images, np.ndarray) else "\n".join(self.images).encode())
        h = hashlib.sha1(str(first.shape).encode() + key).hexdigest()[:16]
        path = os.path.join(cache_dir, f"{name}_{first.shape[-1]}px_{h}.npy")
        if not os.path.exists(path):
            os.makedirs(cache_dir, exist_ok=True)
            with clip_model.atomic(path) as tmp:
                out = np.lib.format.open_memmap(tmp, "w+", np.uint8, (len(self), *first.shape))
                for b, (images, _) in enumerate(self.batches(64, workers)):
                    out[64 * b:64 * b + len(images)] = images.numpy()
                del out  # flushes it and closes the file before atomic renames it
        return CachedImages(path, self.labels)


class CachedImages(torch.utils.data.Dataset):
    """A test set as (3, R, R) uint8 tensors, resized and cropped, in a memory-mapped .npy file, so
    memory stays bounded by the OS page cache (MTIL's ~100k test images are ~15 GB at 224 px)."""

    def __init__(self, path, labels):
        self.path, self.labels = path, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(np.load(self.path, mmap_mode="r")[i])), self.labels[i]

    def batches(self, batch_size, workers=0, pin=False):
        """(B, 3, R, R) uint8, (B,) labels, in order: file slices read here (workers cost more)."""
        images = np.load(self.path, mmap_mode="r")
        for i in range(0, len(self), batch_size):
            x = torch.from_numpy(np.array(images[i:i + batch_size]))
            yield (x.pin_memory() if pin else x), torch.tensor(self.labels[i:i + batch_size])


def split_80_20(paths, labels):
    """ZSCL's split of a dataset without a test set: (train ImageSet, test ImageSet)."""
    perm = torch.randperm(len(paths), generator=torch.Generator().manual_seed(42)).tolist()
    full, cut = ImageSet(paths, labels), int(0.8 * len(paths))
    return full.subset(perm[:cut]), full.subset(perm[cut:])


def few_shot(labels, k, seed, name):
    """Indices of k examples per class, seeded by (seed, name) only; sorted."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])  # hash() is salted per process
    labels = np.asarray(labels)
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        picked += rng.choice(members, size=k, replace=len(members) < k).tolist()
    return sorted(picked)


def union_offsets(tasks):
    """X-TAIL: each task's first label in the union of all tasks' classes, in task order."""
    return [sum(len(t.classnames) for t in tasks[:i]) for i in range(len(tasks))]


# --- readers: folder -> (class names, train ImageSet, test ImageSet), from file lists only
def _lines(path):
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def _labelled(train, test, classes):
    """classes, and the ImageSets of (path, name) pairs labelled by the name's index in classes."""
    index = {c: i for i, c in enumerate(classes)}
    return classes, *(ImageSet([str(p) for p, _ in pairs], [index[c] for _, c in pairs])
                      for pairs in (train, test))


def _class_folders(name, subdir, skip=()):
    """A torchvision LAYOUTS entry without a test set: name/subdir/<class>/<file>, sorted, 80/20."""
    def read(folder):
        root, entry = folder / subdir, ASSETS["mtil"][name]
        classes = sorted(c for c in os.listdir(root) if c not in skip and (root / c).is_dir())
        paths, labels = [], []
        for label, c in enumerate(classes):
            files = sorted(f for f in os.listdir(root / c)  # not macOS's "._x.jpg" companions
                           if f.lower().endswith((".jpg", ".jpeg", ".png")) and f[0] != ".")
            paths += [str(root / c / f) for f in files]
            labels += [label] * len(files)
        names = dict(zip(entry["folders"], entry["classnames"]))
        return [names[c] for c in classes], *split_80_20(paths, labels)
    return (name,), (subdir,), read


def _loadmat(name):
    # scipy reads Flowers102's and StanfordCars' .mat files (as for torchvision): imported only then
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError(f"{name}: reading its .mat files needs scipy: pip install scipy") from None
    return lambda path: loadmat(str(path), squeeze_me=True)


def _aircraft(folder):  # torchvision fgvc-aircraft-2013b/data/ == CoOp fgvc_aircraft/
    classes = _lines(folder / "variants.txt")
    rows = [[line.split(" ", 1) for line in _lines(folder / f"images_variant_{split}.txt")]
            for split in ("train", "test")]
    pairs = [[(folder / "images" / f"{r[0]}.jpg", r[1]) for r in rs] for rs in rows]
    return _labelled(*pairs, classes)


def _cifar100(folder):
    def read(split):
        entry = pickle.loads((folder / split).read_bytes(), encoding="latin1")
        images = np.asarray(entry["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return ImageSet(np.ascontiguousarray(images), entry["fine_labels"])  # (N, 32, 32, 3)
    classes = pickle.loads((folder / "meta").read_bytes(), encoding="latin1")["fine_label_names"]
    return classes, read("train"), read("test")


def _dtd(folder):  # partition 1
    rows = [_lines(folder / "labels" / f"{split}1.txt") for split in ("train", "test")]
    pairs = [[(folder / "images" / r, r.split("/")[0]) for r in rs] for rs in rows]
    return _labelled(*pairs, sorted({c for _, c in pairs[0]}))


def _flowers(folder):
    loadmat = _loadmat("flowers")
    labels = np.atleast_1d(loadmat(folder / "imagelabels.mat")["labels"]).astype(int) - 1
    setid, sets = loadmat(folder / "setid.mat"), []
    for key in ("trnid", "tstid"):  # image ids are 1-based
        ids = np.atleast_1d(setid[key]).astype(int).tolist()
        sets.append(ImageSet([str(folder / "jpg" / f"image_{i:05d}.jpg") for i in ids],
                             [labels[i - 1] for i in ids]))
    return ASSETS["mtil"]["flowers"]["classnames"][:labels.max() + 1], *sets


def _food(folder):
    metas = [json.loads((folder / "meta" / f"{s}.json").read_text()) for s in ("train", "test")]
    pairs = [[(folder / "images" / f"{rel}.jpg", c) for c, rels in meta.items() for rel in rels]
             for meta in metas]
    return _labelled(*pairs, sorted(metas[0]))


def _mnist(folder):  # MNIST/raw, both layouts
    def idx(name):  # a uint8 idx file: 0, 0, 0x08, ndim, ndim big-endian sizes, the data
        data = (folder / name).read_bytes()
        if data[:3] != b"\x00\x00\x08":
            raise ValueError(f"{folder / name} is not a uint8 idx file")
        shape = struct.unpack(f">{data[3]}I", data[4:4 + 4 * data[3]])
        return np.frombuffer(data, np.uint8, offset=4 + 4 * data[3]).reshape(shape)
    return MNIST_CLASSES, *(ImageSet(idx(f"{p}-images-idx3-ubyte"), idx(f"{p}-labels-idx1-ubyte"))
                            for p in ("train", "t10k"))  # images (N, 28, 28)


def _pets(folder):
    breeds, sets = {}, []
    for split in ("trainval", "test"):
        rows = [line.split() for line in _lines(folder / "annotations" / f"{split}.txt")]
        for r in rows:  # torchvision's names: "great_pyrenees_12" -> "Great Pyrenees"
            breeds[int(r[1]) - 1] = " ".join(p.title() for p in r[0].rsplit("_", 1)[0].split("_"))
        sets.append(ImageSet([str(folder / "images" / f"{r[0]}.jpg") for r in rows],
                             [int(r[1]) - 1 for r in rows]))
    return [breeds[i] for i in range(len(breeds))], *sets


def _cars(folder):
    loadmat, sets = _loadmat("cars"), []
    classes = np.atleast_1d(loadmat(folder / "devkit" / "cars_meta.mat")["class_names"]).tolist()
    for mat, images in (("devkit/cars_train_annos.mat", "cars_train"),
                        ("cars_test_annos_withlabels.mat", "cars_test")):
        annos = np.atleast_1d(loadmat(folder / mat)["annotations"])
        sets.append(ImageSet([str(folder / images / str(a["fname"])) for a in annos],
                             [int(a["class"]) - 1 for a in annos]))
    return classes, *sets


def _sun397(folder):
    lines = [line.lstrip("/") for line in _lines(folder / "ClassName.txt")]  # "a/abbey"
    # sorted by path components, the order of sorted(Path); see the module docstring
    entries = sorted(((*rel.split("/"), f), label) for label, rel in enumerate(lines)
                     for f in os.listdir(folder / rel)
                     if f.startswith("sun_") and f.endswith(".jpg"))
    paths = [str(folder.joinpath(*parts)) for parts, _ in entries]
    return [rel[2:] for rel in lines], *split_80_20(paths, [y for _, y in entries])


def _coop(folders, dataset, image_dir, needs=()):
    """A CoOp entry of LAYOUTS: folders (CoOp's name first), what one must hold, and the reader of
    split_zhou_{dataset}.json: {"train"|"val"|"test": [[relpath, label, classname], ...]}."""
    split_file = f"split_zhou_{dataset}.json"

    def read(folder):
        try:
            split = json.loads((folder / split_file).read_text())
            names = {label: name for key in ("train", "test") for _, label, name in split[key]}
        except (ValueError, TypeError, KeyError) as e:  # not JSON, or not lists of triples
            raise ValueError(f"{split_file} is not a CoOp split file ({e})") from None
        if sorted(names) != list(range(len(names))):
            raise ValueError(f"{split_file}: labels are not 0..{len(names) - 1}")
        sets = [ImageSet([str(folder / image_dir / path) for path, _, _ in split[key]],
                         [label for _, label, _ in split[key]]) for key in ("train", "test")]
        return [names[i] for i in range(len(names))], *sets
    return folders, (split_file, *([image_dir] if image_dir else []), *needs), read


# --- layouts: name -> (folders to try under --data-dir, what one must hold, its reader)
_AIRCRAFT = ("variants.txt", "images_variant_train.txt", "images_variant_test.txt", "images")
_MNIST = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
          "t10k-labels-idx1-ubyte")
_CARS = ("devkit/cars_meta.mat", "devkit/cars_train_annos.mat", "cars_test_annos_withlabels.mat",
         "cars_train", "cars_test")

LAYOUTS = {
    "torchvision": {  # the folders torchvision 0.29's dataset classes create under their root
        "aircraft": (("fgvc-aircraft-2013b/data",), _AIRCRAFT, _aircraft),
        "caltech101": _class_folders("caltech101", "101_ObjectCategories", ("BACKGROUND_Google",)),
        "cifar100": (("cifar-100-python",), ("train", "test", "meta"), _cifar100),
        "dtd": (("dtd/dtd",), ("labels/train1.txt", "labels/test1.txt", "images"), _dtd),
        "eurosat": _class_folders("eurosat", "2750"),
        "flowers": (("flowers-102",), ("imagelabels.mat", "setid.mat", "jpg"), _flowers),
        "food": (("food-101",), ("meta/train.json", "meta/test.json", "images"), _food),
        "mnist": (("MNIST/raw",), _MNIST, _mnist),
        "pets": (("oxford-iiit-pet",), ("annotations/trainval.txt", "annotations/test.txt",
                                        "images"), _pets),
        "cars": (("stanford_cars",), _CARS, _cars),
        "sun397": (("SUN397",), ("ClassName.txt",), _sun397),
    },
    "coop": {  # CoOp's DATASETS.md
        "aircraft": (("fgvc_aircraft", "fgvc-aircraft-2013b/data"), _AIRCRAFT, _aircraft),
        "caltech101": _coop(("caltech-101", "caltech101"), "Caltech101", "101_ObjectCategories"),
        "dtd": _coop(("dtd", "dtd/dtd"), "DescribableTextures", "images"),
        "eurosat": _coop(("eurosat", "EuroSAT"), "EuroSAT", "2750"),
        "flowers": _coop(("oxford_flowers", "flowers-102"), "OxfordFlowers", "jpg"),
        "food": _coop(("food-101", "food101"), "Food101", "images"),
        "mnist": (("MNIST/raw",), _MNIST, _mnist),
        "pets": _coop(("oxford_pets", "oxford-iiit-pet"), "OxfordPets", "images"),
        # its paths start with cars_{train,test}/
        "cars": _coop(("stanford_cars",), "StanfordCars", "", ("cars_train", "cars_test")),
        "sun397": _coop(("sun397",), "SUN397", "SUN397"),
    },
}

_TORCHVISION_CLASS = {"aircraft": "FGVCAircraft", "caltech101": "Caltech101",
                      "cifar100": "CIFAR100", "dtd": "DTD", "eurosat": "EuroSAT",
                      "flowers": "Flowers102", "food": "Food101", "mnist": "MNIST",
                      "pets": "OxfordIIITPet", "sun397": "SUN397"}  # cars: none
_DOWNLOADABLE = {"torchvision": set(_TORCHVISION_CLASS), "coop": {"aircraft", "mnist"}}


def _missing(name, layout, data_dir, download_error=None):
    """The one line that says what was expected where, and how to get it."""
    folders, needs, _ = LAYOUTS[layout][name]
    where = " or ".join(f"{data_dir / f}/" for f in folders)
    msg = f"{name}: expected {where} with {', '.join(needs)}; "
    if name == "cars":
        return msg + "torchvision can no longer download StanfordCars: put its files there"
    if name not in _DOWNLOADABLE[layout]:
        return msg + (f"put CoOp's {needs[0]} (github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md)"
                      f" next to the images in {needs[1]}/ there")
    msg += (f"torchvision's download failed ({download_error})" if download_error
            else "rerun with --download to fetch it with torchvision")
    if name == "caltech101":  # its download link breaks often
        msg += ("; or get caltech-101.zip from https://data.caltech.edu/records/mzrjq-6wc02 and "
                f"extract its 101_ObjectCategories.tar.gz into {data_dir / 'caltech101'}/")
    return msg


def _download(name, data_dir):
    """Let torchvision download into data_dir; returns the error text if it raised."""
    import torchvision.datasets
    try:
        getattr(torchvision.datasets, _TORCHVISION_CLASS[name])(str(data_dir), download=True)
    except Exception as e:  # noqa: BLE001  NOTE: Flowers102 downloads, then fails without scipy
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


# --- the one entry point
def load_tasks(benchmark, data_dir, shots=None, seed=0, datasets=None, download=False):
    """The tasks of a benchmark in order, train sets `shots`-shot (None: full). Finds every dataset
    (downloading what torchvision can if asked), then indexes each; a problem raises DataError."""
    cfg = BENCHMARKS[benchmark]
    layout, names = cfg["layout"], list(datasets or cfg["datasets"])
    data_dir = Path(data_dir).expanduser()

    def find(name):  # the first folder that has everything, else None
        where, needs, _ = LAYOUTS[layout][name]
        return next((data_dir / f for f in where
                     if all((data_dir / f / p).exists() for p in needs)), None)

    # 1. every dataset is there
    folders, missing = {}, []
    for name in names:
        folders[name], error = find(name), None
        if folders[name] is None and download and name in _DOWNLOADABLE[layout]:
            error = _download(name, data_dir)
            folders[name] = find(name)
        if folders[name] is None:
            missing.append(_missing(name, layout, data_dir, error))
    if missing:
        also = ", ".join(m.split(":")[0] for m in missing[1:])
        raise DataError(missing[0] + (f" (also missing: {also})" if also else ""))

    # 2. every dataset indexes (file lists, split files, label arrays; no image is decoded)
    tasks = []
    for name in names:
        folder = folders[name]
        try:
            classnames, train, test = LAYOUTS[layout][name][2](folder)
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            detail = " ".join(f"{type(e).__name__}: {e}".split())
            raise DataError(f"{name}: cannot index {folder}: {detail}") from e
        for part, s in (("train", train), ("test", test)):
            if len(s) == 0:
                raise DataError(f"{name}: no {part} images found in {folder}")
            # a cheap completeness check: the first and the last file listed
            for p in [] if isinstance(s.images, np.ndarray) else [s.images[0], s.images[-1]]:
                if not os.path.exists(p):
                    raise DataError(f"{name}: {p} is listed but missing; {folder} is incomplete")
        entry = ASSETS[benchmark][name]
        classnames = [c.replace("_", " ") + entry.get("classname_suffix", "") for c in classnames]
        templates = entry["templates"] if benchmark == "mtil" else [entry["template"]]
        if shots:
            train = train.subset(few_shot(train.labels, shots, seed, name))
        tasks.append(Task(name, classnames, list(templates), train, test))
    return tasks


def prepare(tasks, resolution, cache_dir=None, workers=0):
    """Set CLIP's preprocessing on all tasks; with a cache_dir, decode each test set once there."""
    for task in tasks:
        if task.train is not None:
            task.train.transform = clip_model.preprocess(True, resolution)
        task.test.transform = clip_model.preprocess(False, resolution)
        if cache_dir is None:
            continue
        start = time.time()
        try:
            task.test = task.test.cached(task.name, os.path.expanduser(cache_dir), workers)
        except OSError as e:  # a full or read-only disk: evaluate from the images instead
            print(f"{task.name}: no test-image cache ({e}); decoding at every evaluation")
        if time.time() - start > 1:
            print(f"{task.name}: {len(task.test)} test images cached in {time.time() - start:.0f}s")
