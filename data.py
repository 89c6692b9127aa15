"""The benchmark datasets of MTIL and X-TAIL, on torchvision's folder layouts or CoOp's splits,
and your own tasks: a folder of task folders, each in torchvision's ImageFolder layout.

Every dataset becomes a `Task`: class names, prompt templates, and train/test sets indexing image
files (CIFAR-100, MNIST: uint8 arrays) without decoding any. `load_tasks` finds every dataset of a
run before reading any: a missing one is reported in one line before training, not at task 9.

Which image lands where (SPEC section 3): caltech101, eurosat and sun397 have no official test set
in torchvision's layout; as ZSCL, random_split 80/20 with seed 42 over torchvision's order (class
folders and files sorted; sun397 by path: file-system order is not portable). Few-shot: k indices
per class (with replacement if a class has fewer), seeded by (seed, crc32 of the name) only."""
import hashlib
import json
import os
import pickle
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import clip_model

# --- the benchmarks (plain data)
BENCHMARKS = {  # datasets in task order, evaluation style, defaults of --layout and --prompts
    # paper Table 2, order I; task-aware: each image among its own dataset's classes
    "mtil": {"eval_style": "task-aware", "layout": "torchvision", "prompts": "ensemble",
             "datasets": ("aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers",
                          "food", "mnist", "pets", "cars", "sun397")},
    # paper Table 1: MTIL without cifar100; union: among all 1,100 classes at once
    "xtail": {"eval_style": "union", "layout": "coop", "prompts": "first",
              "datasets": ("aircraft", "caltech101", "dtd", "eurosat", "flowers", "food",
                           "mnist", "pets", "cars", "sun397")}}
# each setting's training recipe (the released code's for MTIL and X-TAIL); train.py's flags win
RECIPES = {
    "mtil": dict(shots=5, dense_ratio=0.7, iterations=500, batch_size=64, lr=5e-4, lr_full=1e-5,
                 kappa_max=0.005, rail_width=15000),
    "xtail": dict(shots=16, dense_ratio=0.5, iterations=500, batch_size=64, lr=5e-4, lr_full=1e-5,
                  kappa_max=0.005, rail_width=15000),
    # X-TAIL's rank selection in fewer steps (`python train.py`, minutes on two cores): which ranks
    # survive depends on the sum of tau over a task against |g| ~ N(0, 1), and on kappa_max / lr
    # (tau against Adam's step): the sum matches X-TAIL's, so does the ratio (docs/tiny_world.md)
    "tiny": dict(shots=16, dense_ratio=0.5, iterations=200, batch_size=32, lr=1.25e-3,
                 lr_full=1e-4, kappa_max=0.0125, rail_width=2000)}
# lr_full: ZSCL's rate for full fine-tuning (5e-4 wrecks CLIP); tiny's: a tenth of its pretraining;
# rail_width: RAIL-Primal's D, RAIL's 15000 for 512-d features (~30 d); tiny's 64-d likewise
RECIPES["folders"] = RECIPES["xtail"]  # your own tasks (docs/own_tasks.md): X-TAIL's recipe
_SAME_SIZES = {"cifar100": (100, 50000, 10000), "mnist": (10, 60000, 10000),  # as torchvision's
               "places365": (365, None, 36500), "imagenet": (1000, None, 50000)}  # val sets only
SIZES = {  # (classes, train images, test images) of the real data in each layout
    "torchvision": {"aircraft": (100, 3334, 3333), "caltech101": (101, 6941, 1736),
                    "pets": (37, 3680, 3669), "dtd": (47, 1880, 1880), "eurosat": (10, 21600, 5400),
                    "flowers": (102, 1020, 6149), "food": (101, 75750, 25250),
                    "cars": (196, 8144, 8041), "sun397": (397, 87003, 21751), **_SAME_SIZES},
    "coop": {"aircraft": (100, 3334, 3333), "caltech101": (100, 4128, 2465),  # CoOp's Table 1
             "dtd": (47, 2820, 1692), "eurosat": (10, 13500, 8100), "flowers": (102, 4093, 2463),
             "food": (101, 50500, 30300), "pets": (37, 2944, 3669), "cars": (196, 6509, 8041),
             "sun397": (397, 15880, 19850), **_SAME_SIZES}}
HOLDOUT = ("cifar100", "places365", "imagenet")  # paper Table 4: never trained, evaluated only
ASSETS, _HELD_OUT = (json.loads((Path(__file__).parent / "assets" / f).read_text())
                     for f in ("classnames_templates.json", "holdout.json"))
for _key in ("mtil", "xtail"):  # ImageNet's and Places365's names and templates (Table 4)
    ASSETS[_key].update(_HELD_OUT[_key])
MNIST_CLASSES = [f"{i} - {w}" for i, w in enumerate(
    "zero one two three four five six seven eight nine".split())]  # torchvision MNIST.classes
PROMPTS = ("ensemble", "first", "photo")  # --prompts: see class_prompts
FOLDERS = {"datasets": (), "eval_style": "task-aware"}  # your own tasks: found in --data-dir
# torchvision's ImageFolder reads these (IMG_EXTENSIONS)
IMAGE_FILES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_SEED = 42  # the 80/20 split of your own task without test/: fixed, as ZSCL's


def class_prompts(name, classnames, prompts):
    """(class names, templates) of dataset `name` for a --prompts choice (docs/benchmarks.md)."""
    names = [c.replace("_", " ") for c in classnames]
    if prompts == "ensemble":  # ZSCL's, plain names
        return names, list(ASSETS["mtil"][name]["templates"])
    # the released code's template and names (EuroSAT's " satellite location"); CIFAR100: ZSCL's
    entry = ASSETS["xtail"].get(name, {"template": ASSETS["mtil"][name]["templates"][0]})
    names = [c + entry.get("classname_suffix", "") for c in names]
    if prompts == "first":
        return names, [entry["template"]]
    # photo: RAIL's, over the same names (RAIL's loaders), MNIST's as RAIL has them
    return [f'number: "{c}"' if name == "mnist" else c for c in names], ["a photo of a {}."]


class DataError(Exception):
    """A dataset is missing or unreadable; the message is one line saying what to do."""


# --- image sets, the test-image cache, splits, few-shot
@dataclass
class Task:
    name: str
    classnames: list  # index = label
    templates: list   # evaluation averages them, training uses [0] (data.class_prompts)
    train: "ImageSet"
    test: "ImageSet"
    split: dict = field(default_factory=dict)  # your own tasks: how they were split

    def describe(self):  # what results.json records of a task (train: the few-shot set's size)
        return {"name": self.name, "classnames": list(self.classnames),
                "templates": list(self.templates), "test": len(self.test),
                "train": None if self.train is None else len(self.train), **self.split}


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
        try:  # a missing, truncated, looping, non-image or too large file: one line naming it
            with (Image.fromarray if isinstance(image, np.ndarray) else Image.open)(image) as f:
                img = f.convert("RGB")
        except (OSError, Image.DecompressionBombError) as e:  # its message states PIL's limit
            raise DataError(f"{image} is not a readable image ({e}); replace or delete it")
        return (self.transform(img) if self.transform else img), self.labels[i]

    def subset(self, indices):
        idx = list(indices)
        images = (self.images[idx] if isinstance(self.images, np.ndarray)
                  else [self.images[i] for i in idx])
        return ImageSet(images, [self.labels[i] for i in idx], self.transform)

    def batches(self, batch_size, workers=0, pin=False, shuffle=None):
        """(images, labels) batches, in order or shuffled by the generator `shuffle`. No workers
        for arrays in memory: they cost more than they save, and slow a busy machine many times."""
        workers = 0 if isinstance(self.images, np.ndarray) else workers
        return torch.utils.data.DataLoader(self, batch_size, shuffle=shuffle is not None,
                                           generator=shuffle, num_workers=workers, pin_memory=pin,
                                           persistent_workers=workers > 0)

    def decoded(self, workers=0):
        """This set, its files decoded once into RGB uint8 arrays (same pixels: same crops): a
        few-shot set is read ~100 times a task, and decoding cost more than its random crops."""
        if isinstance(self.images, np.ndarray):
            return self
        rgb = ImageSet(self.images, self.labels, np.array)  # a copy: torch warns on a read-only one
        loader = torch.utils.data.DataLoader(rgb, batch_size=None, num_workers=workers,
                                             generator=torch.Generator())  # no global draw
        return ImageSet([np.array(image) for image, _ in loader], self.labels, self.transform)

    def cached(self, name, cache_dir, workers=0):
        """This set, transformed once, as CachedImages: a .npy file built atomically on first use,
        named by name, item shape and a hash of the array or of each file's path, size and mtime."""
        first = self[0][0]
        key = (str(self.images.shape).encode() + self.images.tobytes()
               if isinstance(self.images, np.ndarray) else  # a file replaced: a new size or mtime
               "\n".join(f"{p} {s.st_size} {s.st_mtime_ns}" for p, s in
                         ((p, os.stat(p)) for p in self.images)).encode())
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


def split_80_20(paths, labels):  # ZSCL's split of a dataset without a test set: (train, test)
    perm = torch.randperm(len(paths), generator=torch.Generator().manual_seed(42)).tolist()
    full, cut = ImageSet(paths, labels), int(0.8 * len(paths))
    return full.subset(perm[:cut]), full.subset(perm[cut:])


def few_shot(labels, k, seed, name):  # k indices per class, seeded by (seed, name) only; sorted
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])  # hash() is salted per process
    labels, picked = np.asarray(labels), []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        picked += rng.choice(members, size=k, replace=len(members) < k).tolist()
    return sorted(picked)


def union_offsets(tasks):  # X-TAIL: each task's first label in the union of all tasks' classes
    return [sum(len(t.classnames) for t in tasks[:i]) for i in range(len(tasks))]


# --- readers: folder -> (class names, train ImageSet, test ImageSet), from file lists only
def _lines(path):
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def _set(rows):  # (path, label) rows
    return ImageSet([str(p) for p, _ in rows], [y for _, y in rows])


def _labelled(train, test, classes):
    """classes, and the ImageSets of (path, name) pairs labelled by the name's index in classes."""
    index = {c: i for i, c in enumerate(classes)}
    if unknown := sorted({c for _, c in train + test} - set(index)):
        raise ValueError(f"class {unknown[0]!r} is listed but not among the {len(index)} classes "
                         "(the train list or the class list); is the download complete?")
    return classes, *(_set([(p, index[c]) for p, c in pairs]) for pairs in (train, test))


def _folders(root, skip=()):  # root's subfolders, sorted; not hidden (.ipynb_checkpoints, __MACOSX)
    return sorted(d for d in os.listdir(root)
                  if d not in skip and d[0] not in "._" and (root / d).is_dir())


def _image_folder(root, skip=()):
    """torchvision's ImageFolder root/<class>/<image>: (class folders, paths, labels), sorted."""
    classes = _folders(root, skip)
    if not classes:
        raise ValueError(f"{root} holds no class folder: put each class's images in <class>/ there")
    paths, labels = [], []
    for label, c in enumerate(classes):
        files = sorted(f for f in os.listdir(root / c)  # not macOS's "._x.jpg" companions
                       if f.lower().endswith(IMAGE_FILES) and f[0] != ".")
        if not files:  # a class no image can teach or test
            raise ValueError(f"the class folder {root / c} holds no image ({', '.join(IMAGE_FILES)}"
                             "); add images to it or delete it")
        paths += [str(root / c / f) for f in files]
        labels += [label] * len(files)
    return classes, paths, labels


def _class_folders(name, subdir, skip=()):
    """A torchvision LAYOUTS entry without a test set: name/subdir/<class>/<file>, sorted, 80/20."""
    def read(folder):
        classes, paths, labels = _image_folder(folder / subdir, skip)
        names = dict(zip(ASSETS["mtil"][name]["folders"], ASSETS["mtil"][name]["classnames"]))
        return [names[c] for c in classes], *split_80_20(paths, labels)
    return (name,), (subdir,), read


def _loadmat(name, path):
    try:  # scipy reads Flowers102's and StanfordCars' .mat files (as for torchvision): only then
        from scipy.io import loadmat
    except ImportError:
        raise DataError(f"{name}: reading its .mat files needs scipy: pip install scipy") from None
    return loadmat(str(path), squeeze_me=True)


def _aircraft(folder):  # torchvision fgvc-aircraft-2013b/data/ == CoOp fgvc_aircraft/
    rows = [[line.split(" ", 1) for line in _lines(folder / f"images_variant_{split}.txt")]
            for split in ("train", "test")]
    return _labelled(*[[(folder / "images" / f"{r[0]}.jpg", r[1]) for r in rs] for rs in rows],
                     _lines(folder / "variants.txt"))


def _cifar100(folder):
    # CIFAR's files are pickles, which can run code: load only dicts, lists, strings, numbers and
    # NumPy arrays, as weights_only does for torch files
    class ArraysOnly(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in {("numpy", "ndarray"), ("numpy", "dtype"),
                                      ("numpy.core.multiarray", "_reconstruct"),
                                      ("numpy._core.multiarray", "_reconstruct")}:
                raise pickle.UnpicklingError(f"refused to load {module}.{name}: not a CIFAR file")
            return super().find_class(module, name)
    def load(name):
        with open(folder / name, "rb") as f:
            return ArraysOnly(f, encoding="latin1").load()
    def read(split):
        entry = load(split)
        images = np.asarray(entry["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return ImageSet(np.ascontiguousarray(images), entry["fine_labels"])  # (N, 32, 32, 3)
    return load("meta")["fine_label_names"], read("train"), read("test")


def _dtd(folder):  # partition 1
    rows = [_lines(folder / "labels" / f"{split}1.txt") for split in ("train", "test")]
    pairs = [[(folder / "images" / r, r.split("/")[0]) for r in rs] for rs in rows]
    return _labelled(*pairs, sorted({c for _, c in pairs[0]}))


def _flowers(folder):
    labels = np.atleast_1d(_loadmat("flowers", folder / "imagelabels.mat")["labels"]).astype(int)
    setid = _loadmat("flowers", folder / "setid.mat")
    sets = [_set([(folder / "jpg" / f"image_{i:05d}.jpg", labels[i - 1] - 1)  # 1-based, both
                  for i in np.atleast_1d(setid[key]).astype(int).tolist()])
            for key in ("trnid", "tstid")]
    return ASSETS["mtil"]["flowers"]["classnames"][:labels.max()], *sets


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
        sets.append(_set([(folder / "images" / f"{r[0]}.jpg", int(r[1]) - 1) for r in rows]))
    return [breeds[i] for i in range(len(breeds))], *sets


def _cars(folder):
    classes = _loadmat("cars", folder / "devkit" / "cars_meta.mat")["class_names"]
    sets = [_set([(folder / images / str(a["fname"]), int(a["class"]) - 1)
                  for a in np.atleast_1d(_loadmat("cars", folder / mat)["annotations"])])
            for mat, images in (("devkit/cars_train_annos.mat", "cars_train"),
                                ("cars_test_annos_withlabels.mat", "cars_test"))]
    return np.atleast_1d(classes).tolist(), *sets


def _sun397(folder):
    lines = [line.lstrip("/") for line in _lines(folder / "ClassName.txt")]  # "a/abbey"
    # sorted by path components, the order of sorted(Path); see the module docstring
    entries = sorted(((*rel.split("/"), f), label) for label, rel in enumerate(lines)
                     for f in os.listdir(folder / rel)
                     if f.startswith("sun_") and f.endswith(".jpg"))
    paths = [str(folder.joinpath(*parts)) for parts, _ in entries]
    return [rel[2:] for rel in lines], *split_80_20(paths, [y for _, y in entries])


def _places365(folder):  # torchvision Places365(split="val"): the validation set only
    rows = [line.split() for line in _lines(folder / "categories_places365.txt")]  # "/a/airfield 0"
    # "/a/apartment_building/outdoor" -> "apartment_building outdoor" (class_prompts: "_" -> " ")
    classes = [c[3:].replace("/", " ") for c, _ in sorted(rows, key=lambda r: int(r[1]))]
    images = next((folder / d for d in ("val_256", "val_large") if (folder / d).is_dir()), None)
    if images is None:
        raise ValueError(f"no val_256/ (small=True) or val_large/ image folder in {folder}")
    rows = [line.split() for line in _lines(folder / "places365_val.txt")]  # "<file>.jpg 165"
    return classes, None, _set([(images / r[0], int(r[1])) for r in rows])


def _imagenet(folder):  # torchvision ImageNet(split="val"): val/<wnid>/*.JPEG, labels in wnid order
    wnids, paths, labels = _image_folder(folder / "val")  # sorted, the order of the assets' names
    if len(wnids) != 1000:
        raise ValueError(f"{folder / 'val'} holds {len(wnids)} class folders; ImageNet-1k has 1000")
    return list(ASSETS["mtil"]["imagenet"]["classnames"]), None, ImageSet(paths, labels)


def _coop(folders, dataset, image_dir, needs=()):
    """A CoOp entry of LAYOUTS: folders (CoOp's name first), what one must hold, the reader."""
    split_file = f"split_zhou_{dataset}.json"
    def read(folder):  # {"train"|"val"|"test": [[relpath, label, classname], ...]}
        try:
            split = json.loads((folder / split_file).read_text())
            names = {label: name for key in ("train", "test") for _, label, name in split[key]}
        except (ValueError, TypeError, KeyError) as e:  # not JSON, or not lists of triples
            raise ValueError(f"{split_file} is not a CoOp split file ({e})") from None
        if sorted(names) != list(range(len(names))):
            raise ValueError(f"{split_file}: labels are not 0..{len(names) - 1}")
        return [names[i] for i in range(len(names))], *(_set(
            [(folder / image_dir / path, label) for path, label, _ in split[key]])
            for key in ("train", "test"))
    return folders, (split_file, *([image_dir] if image_dir else []), *needs), read


# --- layouts: name -> (folders to try under --data-dir, what one must hold, its reader)
_AIRCRAFT = ("variants.txt", "images_variant_train.txt", "images_variant_test.txt", "images")
_SAME_LAYOUT = {  # CIFAR100 and MNIST as torchvision has them; Table 4's held-out validation sets
    "cifar100": (("cifar-100-python",), ("train", "test", "meta"), _cifar100),
    "mnist": (("MNIST/raw",), tuple(f"{split}-{part}-ubyte" for split in ("train", "t10k")
                                    for part in ("images-idx3", "labels-idx1")), _mnist),
    "places365": (("places365",), ("categories_places365.txt", "places365_val.txt"), _places365),
    "imagenet": (("imagenet",), ("val",), _imagenet)}
LAYOUTS = {
    "torchvision": {  # the folders torchvision 0.29's dataset classes create under their root
        "aircraft": (("fgvc-aircraft-2013b/data",), _AIRCRAFT, _aircraft),
        "caltech101": _class_folders("caltech101", "101_ObjectCategories", ("BACKGROUND_Google",)),
        "dtd": (("dtd/dtd",), ("labels/train1.txt", "labels/test1.txt", "images"), _dtd),
        "eurosat": _class_folders("eurosat", "2750"),
        "flowers": (("flowers-102",), ("imagelabels.mat", "setid.mat", "jpg"), _flowers),
        "food": (("food-101",), ("meta/train.json", "meta/test.json", "images"), _food),
        "pets": (("oxford-iiit-pet",), ("annotations/trainval.txt", "annotations/test.txt",
                                        "images"), _pets),
        "cars": (("stanford_cars",), ("devkit/cars_meta.mat", "devkit/cars_train_annos.mat",
                                      "cars_test_annos_withlabels.mat", "cars_train", "cars_test"),
                 _cars),
        "sun397": (("SUN397",), ("ClassName.txt",), _sun397), **_SAME_LAYOUT},
    "coop": {  # CoOp's DATASETS.md
        "aircraft": (("fgvc_aircraft", "fgvc-aircraft-2013b/data"), _AIRCRAFT, _aircraft),
        "caltech101": _coop(("caltech-101", "caltech101"), "Caltech101", "101_ObjectCategories"),
        "dtd": _coop(("dtd", "dtd/dtd"), "DescribableTextures", "images"),
        "eurosat": _coop(("eurosat", "EuroSAT"), "EuroSAT", "2750"),
        "flowers": _coop(("oxford_flowers", "flowers-102"), "OxfordFlowers", "jpg"),
        "food": _coop(("food-101", "food101"), "Food101", "images"),
        "pets": _coop(("oxford_pets", "oxford-iiit-pet"), "OxfordPets", "images"),
        # its paths start with cars_{train,test}/
        "cars": _coop(("stanford_cars",), "StanfordCars", "", ("cars_train", "cars_test")),
        "sun397": _coop(("sun397",), "SUN397", "SUN397"), **_SAME_LAYOUT}}
_TORCHVISION_CLASS = {"aircraft": "FGVCAircraft", "caltech101": "Caltech101", "dtd": "DTD",
                      "cifar100": "CIFAR100", "eurosat": "EuroSAT", "flowers": "Flowers102", "food":
                      "Food101", "mnist": "MNIST", "pets": "OxfordIIITPet", "sun397": "SUN397"}
_DOWNLOADABLE = {"torchvision": set(_TORCHVISION_CLASS), "coop": {"aircraft", "cifar100", "mnist"}}


def _missing(name, layout, data_dir, download_error=None):
    """The one line that says what was expected where, and how to get it."""
    folders, needs, _ = LAYOUTS[layout][name]
    where = " or ".join(f"{data_dir / f}/" for f in folders)
    msg = f"{name}: expected {where} with {', '.join(needs)}; "
    if name == "cars":
        return msg + "torchvision can no longer download StanfordCars: put its files there"
    if name == "places365":  # NOTE: its own download defaults to the 100 GB training set
        return msg + ("fetch the validation set with torchvision: torchvision.datasets.Places365("
                      f"'{data_dir / 'places365'}', split='val', small=True, download=True)")
    if name == "imagenet":
        return msg + ("put ILSVRC2012's 50,000 validation images there as val/<wnid>/*.JPEG "
                      "(torchvision.datasets.ImageNet(root, split='val') makes that layout)")
    if name not in _DOWNLOADABLE[layout]:
        return msg + (f"put CoOp's {needs[0]} (github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md)"
                      f" next to the images in {needs[1]}/ there")
    msg += (f"torchvision's download failed ({download_error})" if download_error
            else "rerun with --download to fetch it with torchvision")
    if name == "caltech101":  # its download link breaks often
        msg += ("; or get caltech-101.zip from https://data.caltech.edu/records/mzrjq-6wc02 and "
                f"extract its 101_ObjectCategories.tar.gz into {data_dir / 'caltech101'}/")
    return msg


# --- the one entry point
def load_tasks(benchmark, data_dir, shots=None, seed=0, datasets=None, download=False,
               layout=None, prompts=None):
    """The tasks of a benchmark in order, train sets `shots`-shot (None: full), read from `layout`
    with `prompts` (None: the benchmark's); `datasets` may name the HOLDOUT ones (train None). A
    problem raises DataError, a size unlike SIZES warns."""
    cfg = BENCHMARKS[benchmark]
    layout, names = layout or cfg["layout"], list(datasets or cfg["datasets"])
    data_dir = Path(data_dir).expanduser()
    def find(name):  # the first folder that has everything, else None
        where, needs, _ = LAYOUTS[layout][name]
        return next((data_dir / f for f in where
                     if all((data_dir / f / p).exists() for p in needs)), None)
    # 1. every dataset is there (torchvision downloading what it can if asked)
    folders, errors = {}, {}
    for name in names:
        if find(name) is None and download and name in _DOWNLOADABLE[layout]:
            import torchvision.datasets as tv
            try:
                getattr(tv, _TORCHVISION_CLASS[name])(str(data_dir), download=True)
            except Exception as e:  # noqa: BLE001  NOTE: Flowers102 downloads, fails without scipy
                errors[name] = " ".join(" ".join(f"{type(x).__name__}: {x}" for x in (
                    e, e.__cause__ or e.__context__) if x).split())[:300]
        folders[name] = find(name)
    if missing := [_missing(n, layout, data_dir, errors.get(n)) for n in names if not folders[n]]:
        also = ", ".join(m.split(":")[0] for m in missing[1:])
        raise DataError(missing[0] + (f" (also missing: {also})" if also else ""))
    # 2. every dataset indexes (file lists, split files, label arrays; no image is decoded)
    tasks = []
    for name in names:
        folder = folders[name]
        try:
            classnames, train, test = LAYOUTS[layout][name][2](folder)
        except (OSError, ValueError, KeyError, IndexError, TypeError, pickle.UnpicklingError) as e:
            detail = " ".join(f"{type(e).__name__}: {e}".split())
            raise DataError(f"{name}: cannot index {folder}: {detail}") from e
        for part, s in (("train", train), ("test", test)):
            if s is not None and len(s) == 0:  # None: a held-out dataset's (no training images)
                raise DataError(f"{name}: no {part} images found in {folder}")
            for p in [] if s is None or isinstance(s.images, np.ndarray) else s.images:  # a stat
                if not os.path.isfile(p):
                    raise DataError(f"{name}: {p} is listed but missing; {folder} is incomplete")
        found = (len(classnames), None if train is None else len(train), len(test))
        if found != SIZES[layout][name]:  # another version on disk: say so and go on
            say = "{} classes, {} train and {} test images".format
            print(f"warning: {name} ({layout} layout) has {say(*found)}; expected "
                  + say(*SIZES[layout][name]))
        classnames, templates = class_prompts(name, classnames, prompts or cfg["prompts"])
        if shots and train is not None:
            train = train.subset(few_shot(train.labels, shots, seed, name))
        tasks.append(Task(name, classnames, templates, train, test))
    return tasks


# --- your own tasks (docs/own_tasks.md): one folder per task, in torchvision's ImageFolder layout
def _folder_task(folder, shots, seed):
    """One task folder: train/ and test/ (or val/), each <class>/<image>, else <class>/<image>
    split 80/20; names from the class folders or classnames.txt, templates from templates.txt."""
    splits = [s for s in ("train", "test", "val") if (folder / s).is_dir()]
    if splits and (splits[0] != "train" or len(splits) == 1):
        raise ValueError(f"{folder} has {'/ and '.join(splits)}/ but needs train/ and test/ (or "
                         f"val/): add the missing one, or put the classes in {folder} (80/20)")
    if splits and (stray := _folders(folder, skip=("train", "test", "val"))):
        raise ValueError(f"{folder / stray[0]}: a folder beside train/ is never read; move its "
                         "images into train/ and test/, or remove it")
    if splits:
        classes, paths, labels = _image_folder(folder / "train")
        tested, test_paths, test_labels = _image_folder(folder / splits[1])
        if extra := [c for c in tested if c not in classes]:
            raise ValueError(f"the class folder {folder / splits[1] / extra[0]} has no match in "
                             f"{folder / 'train'}; add its training images there or remove it")
        train = ImageSet(paths, labels)
        test = ImageSet(test_paths, [classes.index(tested[y]) for y in test_labels])
        split = {"split": f"train/ and {splits[1]}/"}
    else:  # 80/20 in each class, drawn from (SPLIT_SEED, "<task>/<class>") only: moving the
        # folders, adding a class or a task moves no image between train and test
        classes, paths, labels = _image_folder(folder)
        labels, chosen = np.asarray(labels), set()
        for c, name in enumerate(classes):
            members = np.flatnonzero(labels == c)
            if len(members) < 2:
                raise ValueError(f"the class folder {folder / name} holds one image; an 80/20 "
                                 "split needs two: add images, or give the task train/ and test/ "
                                 "folders")
            rng = np.random.default_rng([SPLIT_SEED, zlib.crc32(f"{folder.name}/{name}".encode())])
            chosen.update(rng.permutation(members)[:int(0.8 * len(members))].tolist())
        full = ImageSet(paths, labels)
        train = full.subset(sorted(chosen))
        test = full.subset(i for i in range(len(paths)) if i not in chosen)
        split = {"split": "80/20 per class", "split_seed": SPLIT_SEED}
    names, templates = (_lines(folder / f) if (folder / f).is_file() else None
                        for f in ("classnames.txt", "templates.txt"))
    if names is not None and len(names) != len(classes):
        raise ValueError(f"{folder / 'classnames.txt'} names {len(names)} classes, the folders "
                         f"{len(classes)}: write one name a line, in the folders' sorted order")
    names = names or [c.replace("_", " ").replace("-", " ") for c in classes]
    read = {}  # names as CLIP's tokenizer reads them: two classes of one prompt, one never chosen
    for c, n, ids in zip(classes, names, clip_model.tokenize(names, truncate=True).tolist()):
        if (twin := read.setdefault(tuple(ids), c)) != c:
            raise ValueError(f"the class folders {twin} and {c} of {folder} both read as {n!r}: "
                             "rename one, or its line in classnames.txt")
    templates = ["a photo of a {}."] if templates is None else templates
    for t in templates or [""]:  # each formatted now, not at the first evaluation: "{} {}", "}"
        try:
            fits = t.format("\0").count("\0") == 1
        except (IndexError, KeyError, ValueError, AttributeError):
            fits = False
        if not fits:
            raise ValueError(f"{folder / 'templates.txt'}: {t!r} is not a template; write one a "
                             "line, each with one {} for the class name, other braces doubled")
    print(f"{folder.name}: {len(classes)} classes, {len(train)} train and {len(test)} test "
          f"images ({split['split']})" + (f", {shots} shots" if shots else ""))
    split["train_images"] = len(train)  # before the few-shot draw
    train = train.subset(few_shot(train.labels, shots, seed, folder.name)) if shots else None
    return Task(folder.name, names, templates, train, test, split)


def load_folders(data_dir, shots=None, seed=0, names=None, holdout=()):
    """Your own tasks, (tasks, held-out tasks): the task folders `names` of data_dir in that order
    (default: all but `holdout`, sorted), train sets `shots`-shot (None: none), and the `holdout`
    ones without. Prints each one's size; a problem raises DataError naming the file and the fix."""
    data_dir = Path(data_dir).expanduser()
    found = _folders(data_dir) if data_dir.is_dir() else []
    if not found:
        what = "holds no task folder" if data_dir.is_dir() else (
            "is a file" if data_dir.exists() else "does not exist")
        raise DataError(f"--data-dir {data_dir} {what}; pass a folder of task folders, each "
                        "train/<class>/<image> and test/<class>/<image> (docs/own_tasks.md)")
    if unknown := [n for n in [*(names or ()), *holdout] if n not in found]:
        raise DataError(f"no task folder {data_dir / unknown[0]}; the task folders there: "
                        + ", ".join(found))
    names = names or [n for n in found if n not in holdout]
    if not names:
        raise DataError(f"--holdout names every task folder of {data_dir}; leave one to learn")
    def read(name, shots):
        try:
            return _folder_task(data_dir / name, shots, seed)
        except (OSError, ValueError) as e:
            raise DataError(f"{name}: {' '.join(str(e).split())}") from None
    return [read(n, shots) for n in names], [read(n, None) for n in holdout]


def prepare(tasks, resolution, cache_dir=None, workers=0):
    """Set CLIP's preprocessing on all tasks, decode every training image once (an unreadable one
    stops the run now, not in the middle of its task) and, with a cache_dir, each test set into
    its cache. NOTE: without a cache, test images are only checked to exist."""
    for task in tasks:
        if task.train is not None:
            task.train.transform = clip_model.preprocess(True, resolution)
        task.test.transform = clip_model.preprocess(False, resolution)
        start = time.time()
        try:
            if task.train is not None and not isinstance(task.train.images, np.ndarray):
                for _ in task.train.batches(64, workers):
                    pass
            if cache_dir is not None:
                task.test = task.test.cached(task.name, os.path.expanduser(cache_dir), workers)
        except DataError as e:  # from a loader process, it comes with the whole traceback
            last = str(e).strip().splitlines()[-1]
            raise DataError(f"{task.name}: {last.split('DataError: ')[-1]}") from None
        except OSError as e:  # a full or read-only disk: evaluate from the images instead
            print(f"{task.name}: no test-image cache ({e}); decoding at every evaluation")
        if time.time() - start > 1:
            print(f"{task.name}: {len(task.test)} test images cached in {time.time() - start:.0f}s")
