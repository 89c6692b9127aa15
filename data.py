"""The benchmark datasets of MTIL and X-TAIL, on torchvision's folder layouts or CoOp's splits.

Every dataset becomes a `Task`: class names, prompt templates, and train/test sets that index
image files (or, for CIFAR-100 and MNIST, uint8 arrays) without decoding an image. `load_tasks`
finds every dataset of a run before it reads any, so a missing one is reported in one line
before training starts, not at task 9.

    tasks = load_tasks("xtail", "~/data", shots=16)   # 10 Tasks in order, train sets 16-shot
    prepare(tasks, 224, "~/.cache/codyra/eval")       # CLIP's preprocessing, test images cached

Which image lands where (SPEC section 3): caltech101, eurosat and sun397 have no official test
set in torchvision's layout; as ZSCL we split them with random_split 80/20 and
torch.Generator().manual_seed(42), over torchvision's order (class folders sorted, files
sorted; sun397 sorted by path, as torchvision's file-system order is not portable). Few-shot:
k indices per class (with replacement only when a class has fewer), from a generator seeded by
(seed, crc32 of the dataset name) and nothing else.
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

# ----------------------------------------------------------------------------------------------
# the benchmarks (plain data)

BENCHMARKS = {  # datasets in task order: (classes, test images) of the real data
    "mtil": {  # paper Table 2, order I; task-aware: each image among its own dataset's classes
        "datasets": {"aircraft": (100, 3333), "caltech101": (101, 1736), "cifar100": (100, 10000),
                     "dtd": (47, 1880), "eurosat": (10, 5400), "flowers": (102, 6149),
                     "food": (101, 25250), "mnist": (10, 10000), "pets": (37, 3669),
                     "cars": (196, 8041), "sun397": (397, 21751)},
        "eval_style": "task-aware", "layout": "torchvision"},
    "xtail": {  # paper Table 1: MTIL without cifar100; union: among all 1,100 classes at once
        "datasets": {"aircraft": (100, 3333), "caltech101": (100, 2465), "dtd": (47, 1692),
                     "eurosat": (10, 8100), "flowers": (102, 2463), "food": (101, 30300),
                     "mnist": (10, 10000), "pets": (37, 3669), "cars": (196, 8041),
                     "sun397": (397, 19850)},
        "eval_style": "union", "layout": "coop"},
}
ASSETS = json.loads((Path(__file__).parent / "assets" / "classnames_templates.json").read_text())
MNIST_CLASSES = [f"{i} - {w}" for i, w in enumerate(
    "zero one two three four five six seven eight nine".split())]  # torchvision MNIST.classes


class DataError(Exception):
    """A dataset is missing or unreadable; the message is one line saying what to do."""


# ----------------------------------------------------------------------------------------------
# image sets, the test-image cache, splits, few-shot

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
        if isinstance(self.images, np.ndarray):
            img = Image.fromarray(self.images[i]).convert("RGB")
        else:
            with Image.open(self.images[i]) as f:
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

    def cached(self, name, cache_dir, workers=0):
        """This set with its transform applied once: a CachedImages read from a .npy file, built on
        first use (atomically) and named by the set's name, its first item's shape and a hash of
        its image list. NOTE: images replaced in place under the same paths are not noticed;
        delete the file (or the folder) then."""
        first = self[0][0]
        h = hashlib.sha1(str(first.shape).encode())
        if isinstance(self.images, np.ndarray):
            h.update(str(self.images.shape).encode())
            h.update(np.ascontiguousarray(self.images).data)
        else:
            h.update("\n".join(self.images).encode())
        path = os.path.join(cache_dir, f"{name}_{first.shape[-1]}px_{h.hexdigest()[:16]}.npy")
        if not os.path.exists(path):
            os.makedirs(cache_dir, exist_ok=True)
            with clip_model.atomic(path) as tmp:
                out = np.lib.format.open_memmap(tmp, "w+", np.uint8, (len(self), *first.shape))
                i = 0
                for images, _ in self.batches(64, workers):
                    out[i:i + len(images)] = images.numpy()
                    i += len(images)
                out.flush()
                del out
        return CachedImages(path, self.labels)


class CachedImages(torch.utils.data.Dataset):
    """A test set as (3, R, R) uint8 tensors, already resized and cropped, in a .npy file. The
    file is memory-mapped, so memory stays bounded by what the OS keeps in its page cache
    (MTIL's ~100k test images are ~15 GB at 224 px; in RAM they would not fit most machines)."""

    def __init__(self, path, labels):
        self.path, self.labels = path, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(np.load(self.path, mmap_mode="r")[i])), self.labels[i]

    def batches(self, batch_size, workers=0, pin=False):
        """(B, 3, R, R) uint8 and (B,) labels, in order: one slice of the file each, in this
        process (loader processes would cost more than they save)."""
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
    # NOTE: crc32, not hash(): Python salts str hashes per process.
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    labels = np.asarray(labels)
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        picked += rng.choice(members, size=k, replace=len(members) < k).tolist()
    return sorted(picked)


def union_offsets(tasks):
    """X-TAIL: each task's first label in the union of all tasks' classes, in task order."""
    sizes = [len(t.classnames) for t in tasks]
    return [sum(sizes[:i]) for i in range(len(sizes))]


# ----------------------------------------------------------------------------------------------
# readers: folder -> (class names, train ImageSet, test ImageSet), from file lists only

def _lines(path):
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def _class_folders(name, root, skip=()):
    """torchvision's layout without a test set: a folder per class under root (its sorted order
    gives the labels; the names are in the assets), files sorted, split 80/20 in that order."""
    entry = ASSETS["mtil"][name]
    classes = sorted(c for c in os.listdir(root) if c not in skip and (root / c).is_dir())
    paths, labels = [], []
    for label, c in enumerate(classes):
        files = sorted(f for f in os.listdir(root / c)  # not macOS's "._x.jpg" companions
                       if f.lower().endswith((".jpg", ".jpeg", ".png")) and f[0] != ".")
        paths += [str(root / c / f) for f in files]
        labels += [label] * len(files)
    names = dict(zip(entry["folders"], entry["classnames"]))
    return [names[c] for c in classes], *split_80_20(paths, labels)


def _loadmat(name):
    # Flowers102 and StanfordCars ship MATLAB files (cars': struct arrays); scipy reads them, as
    # for torchvision, imported only when one of them is in the run
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError(f"{name}: reading its .mat files needs scipy: pip install scipy") from None
    return lambda path: loadmat(str(path), squeeze_me=True)


def _aircraft(folder):  # torchvision fgvc-aircraft-2013b/data/ == CoOp fgvc_aircraft/
    classes = _lines(folder / "variants.txt")
    index = {c: i for i, c in enumerate(classes)}

    def read(split):
        rows = [line.split(" ", 1) for line in _lines(folder / f"images_variant_{split}.txt")]
        return ImageSet([str(folder / "images" / f"{r[0]}.jpg") for r in rows],
                        [index[r[1]] for r in rows])
    return classes, read("train"), read("test")


def _caltech101(folder):
    return _class_folders("caltech101", folder / "101_ObjectCategories", ("BACKGROUND_Google",))


def _cifar100(folder):
    def read(split):
        with open(folder / split, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        images = np.ascontiguousarray(
            np.asarray(entry["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        return ImageSet(images, entry["fine_labels"])  # (N, 32, 32, 3)
    with open(folder / "meta", "rb") as f:
        classes = pickle.load(f, encoding="latin1")["fine_label_names"]
    return classes, read("train"), read("test")


def _dtd(folder):  # partition 1
    def read(split):
        rows = _lines(folder / "labels" / f"{split}1.txt")
        return [r.split("/")[0] for r in rows], [str(folder / "images" / r) for r in rows]
    train_cls, train_paths = read("train")
    test_cls, test_paths = read("test")
    classes = sorted(set(train_cls))
    index = {c: i for i, c in enumerate(classes)}
    return (classes, ImageSet(train_paths, [index[c] for c in train_cls]),
            ImageSet(test_paths, [index[c] for c in test_cls]))


def _eurosat(folder):
    return _class_folders("eurosat", folder / "2750")


def _flowers(folder):
    loadmat = _loadmat("flowers")
    labels = np.atleast_1d(loadmat(folder / "imagelabels.mat")["labels"]).astype(int) - 1
    setid = loadmat(folder / "setid.mat")

    def read(key):  # image ids are 1-based
        ids = np.atleast_1d(setid[key]).astype(int).tolist()
        return ImageSet([str(folder / "jpg" / f"image_{i:05d}.jpg") for i in ids],
                        [labels[i - 1] for i in ids])
    return ASSETS["mtil"]["flowers"]["classnames"][:labels.max() + 1], read("trnid"), read("tstid")


def _food(folder):
    train = json.loads((folder / "meta" / "train.json").read_text())
    classes = sorted(train)
    index = {c: i for i, c in enumerate(classes)}

    def read(meta):
        pairs = [(c, rel) for c, rels in meta.items() for rel in rels]
        return ImageSet([str(folder / "images" / f"{rel}.jpg") for _, rel in pairs],
                        [index[c] for c, _ in pairs])
    return classes, read(train), read(json.loads((folder / "meta" / "test.json").read_text()))


def _read_idx(path):
    """An MNIST idx file as a uint8 array (magic 0, 0, dtype 0x08, ndim; ndim big-endian sizes)."""
    data = Path(path).read_bytes()
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not a uint8 idx file")
    shape = struct.unpack(f">{data[3]}I", data[4:4 + 4 * data[3]])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * data[3]).reshape(shape)


def _mnist(folder):  # MNIST/raw, both layouts
    def read(prefix):
        return ImageSet(_read_idx(folder / f"{prefix}-images-idx3-ubyte"),  # (N, 28, 28)
                        _read_idx(folder / f"{prefix}-labels-idx1-ubyte").tolist())
    return MNIST_CLASSES, read("train"), read("t10k")


def _pets(folder):
    breeds = {}

    def read(split):
        rows = [line.split() for line in _lines(folder / "annotations" / f"{split}.txt")]
        for r in rows:  # torchvision's names: "great_pyrenees_12" -> "Great Pyrenees"
            breeds[int(r[1]) - 1] = " ".join(p.title() for p in r[0].rsplit("_", 1)[0].split("_"))
        return ImageSet([str(folder / "images" / f"{r[0]}.jpg") for r in rows],
                        [int(r[1]) - 1 for r in rows])
    train, test = read("trainval"), read("test")
    return [breeds[i] for i in range(len(breeds))], train, test


def _cars(folder):
    loadmat = _loadmat("cars")
    classes = np.atleast_1d(loadmat(folder / "devkit" / "cars_meta.mat")["class_names"]).tolist()

    def read(mat, images):
        annos = np.atleast_1d(loadmat(folder / mat)["annotations"])
        return ImageSet([str(folder / images / str(a["fname"])) for a in annos],
                        [int(a["class"]) - 1 for a in annos])
    return (classes, read("devkit/cars_train_annos.mat", "cars_train"),
            read("cars_test_annos_withlabels.mat", "cars_test"))


def _sun397(folder):
    lines = [line.lstrip("/") for line in _lines(folder / "ClassName.txt")]  # "a/abbey"
    entries = []
    for label, rel in enumerate(lines):
        files = [f for f in os.listdir(folder / rel) if f.startswith("sun_") and f.endswith(".jpg")]
        entries += [((*rel.split("/"), f), label) for f in files]
    entries.sort()  # by path components, the order of sorted(Path); see the module docstring
    paths = [str(folder.joinpath(*parts)) for parts, _ in entries]
    return [rel[2:] for rel in lines], *split_80_20(paths, [y for _, y in entries])


def _coop(split_file, image_dir):
    """Reader of a CoOp split file {"train"|"val"|"test": [[relpath, label, classname], ...]}."""
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
    return read


# ----------------------------------------------------------------------------------------------
# layouts: name -> (folders to try under data_dir, what each must contain, reader)

_AIRCRAFT = ("variants.txt", "images_variant_train.txt", "images_variant_test.txt", "images")
_MNIST = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
          "t10k-labels-idx1-ubyte")
_CARS = ("devkit/cars_meta.mat", "devkit/cars_train_annos.mat", "cars_test_annos_withlabels.mat",
         "cars_train", "cars_test")


def _split(folders, name, images, needs=()):
    """A CoOp entry: its folders (CoOp's name, then torchvision's), split_zhou_{name}.json beside
    the images folder, and that file's reader."""
    split = f"split_zhou_{name}.json"
    return folders, (split, *([images] if images else []), *needs), _coop(split, images)


LAYOUTS = {  # name -> (folders to try under --data-dir, what one must hold, its reader)
    "torchvision": {  # the folders torchvision 0.29's dataset classes create under their root
        "aircraft": (("fgvc-aircraft-2013b/data",), _AIRCRAFT, _aircraft),
        "caltech101": (("caltech101",), ("101_ObjectCategories",), _caltech101),
        "cifar100": (("cifar-100-python",), ("train", "test", "meta"), _cifar100),
        "dtd": (("dtd/dtd",), ("labels/train1.txt", "labels/test1.txt", "images"), _dtd),
        "eurosat": (("eurosat",), ("2750",), _eurosat),
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
        "caltech101": _split(("caltech-101", "caltech101"), "Caltech101", "101_ObjectCategories"),
        "dtd": _split(("dtd", "dtd/dtd"), "DescribableTextures", "images"),
        "eurosat": _split(("eurosat", "EuroSAT"), "EuroSAT", "2750"),
        "flowers": _split(("oxford_flowers", "flowers-102"), "OxfordFlowers", "jpg"),
        "food": _split(("food-101", "food101"), "Food101", "images"),
        "mnist": (("MNIST/raw",), _MNIST, _mnist),
        "pets": _split(("oxford_pets", "oxford-iiit-pet"), "OxfordPets", "images"),
        # its paths start with cars_{train,test}/
        "cars": _split(("stanford_cars",), "StanfordCars", "", ("cars_train", "cars_test")),
        "sun397": _split(("sun397",), "SUN397", "SUN397"),
    },
}

_TORCHVISION_CLASS = {"aircraft": "FGVCAircraft", "caltech101": "Caltech101",
                      "cifar100": "CIFAR100", "dtd": "DTD", "eurosat": "EuroSAT",
                      "flowers": "Flowers102", "food": "Food101", "mnist": "MNIST",
                      "pets": "OxfordIIITPet", "sun397": "SUN397"}  # cars: none


def _downloadable(name, layout):
    return name in _TORCHVISION_CLASS and (layout == "torchvision" or name in ("aircraft", "mnist"))


def _find(data_dir, folders, needs):
    """The first folder that has everything, else None."""
    for folder in folders:
        if all((data_dir / folder / p).exists() for p in needs):
            return data_dir / folder
    return None


def _missing(name, layout, data_dir, download_error=None):
    """The one line that says what was expected where, and how to get it."""
    folders, needs, _ = LAYOUTS[layout][name]
    where = " or ".join(f"{data_dir / f}/" for f in folders)
    msg = f"{name}: expected {where} with {', '.join(needs)}; "
    if name == "cars":
        return msg + "torchvision can no longer download StanfordCars: put its files there"
    if not _downloadable(name, layout):
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


# ----------------------------------------------------------------------------------------------
# the one entry point

def load_tasks(benchmark, data_dir, shots=None, seed=0, datasets=None, download=False):
    """The tasks of a benchmark, in order, train sets `shots`-shot (None: the full train sets).

    Finds every dataset first (downloading what torchvision can when download=True), then
    indexes every one; any problem raises DataError with one line, before anything is returned.
    """
    cfg = BENCHMARKS[benchmark]
    layout, names = cfg["layout"], list(datasets or cfg["datasets"])
    data_dir = Path(data_dir).expanduser()

    # 1. every dataset is there
    folders, missing = {}, []
    for name in names:
        where, needs, _ = LAYOUTS[layout][name]
        folders[name] = _find(data_dir, where, needs)
        error = None
        if folders[name] is None and download and _downloadable(name, layout):
            error = _download(name, data_dir)
            folders[name] = _find(data_dir, where, needs)
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
            if not isinstance(s.images, np.ndarray):  # cheap completeness check: first and last
                for p in (s.images[0], s.images[-1]):
                    if not os.path.exists(p):
                        raise DataError(f"{name}: {p} is listed but missing; {folder} is "
                                        "incomplete")
        classnames = [c.replace("_", " ") for c in classnames]
        if benchmark == "mtil":
            templates = ASSETS["mtil"][name]["templates"]
        else:
            entry = ASSETS["xtail"][name]
            templates = [entry["template"]]
            classnames = [c + entry.get("classname_suffix", "") for c in classnames]
        if shots:
            train = train.subset(few_shot(train.labels, shots, seed, name))
        tasks.append(Task(name, classnames, list(templates), train, test))
    return tasks


def prepare(tasks, resolution, cache_dir=None, workers=0):
    """Give every task's images CLIP's preprocessing at this resolution, and (cache_dir not None)
    decode each test set once into its uint8 cache, so that the evaluations after every task cost
    forward passes, not decoding."""
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
