"""The benchmark datasets: MTIL on torchvision's folder layouts, X-TAIL on CoOp's split files.

Every dataset becomes a `Task`: class names, prompt templates, and train/test sets that index
image files (or, for CIFAR-100 and MNIST, uint8 arrays) without decoding an image, so even
SUN397 or Food-101 index in seconds. `load_tasks` finds every dataset of a run before it reads
any, so a missing folder is reported in one line before training starts, not at task 9.

    tasks = load_tasks("xtail", "~/data")      # 10 Tasks in order, train sets already 16-shot
    offsets = union_offsets(tasks)             # X-TAIL target = offsets[t] + local label

Rules that decide which image lands where (SPEC section 3):
- caltech101, eurosat, sun397 (torchvision layout) have no official test set. ZSCL splits them
  with `random_split(ds, [int(0.8 n), n - int(0.8 n)], torch.Generator().manual_seed(42))`,
  i.e. perm = randperm(n) from that generator, train = perm[:int(0.8 n)], test = the rest,
  over the dataset in torchvision's order: caltech101 category folders sorted (BACKGROUND_Google
  dropped) then image files sorted; eurosat as ImageFolder (class folders sorted, files sorted);
  sun397 sorted by path components (torchvision keeps filesystem order, which is not portable).
- Few-shot: per class k indices without replacement (with replacement only when the class has
  fewer than k), from a generator seeded by (seed, crc32 of the dataset name). No global RNG is
  touched, so a dataset's subset is the same whatever ran before it.
"""
import json
import os
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# ----------------------------------------------------------------------------------------------
# settings (plain data)

SETTINGS = {
    "mtil": {  # paper Table 2, order I
        "datasets": ("aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers", "food",
                     "mnist", "pets", "cars", "sun397"),
        "shots": 5, "dense_ratio": 0.7, "eval": "task-aware", "layout": "torchvision",
        # real class counts and test sizes, for sanity checks and the README
        "classes": {"aircraft": 100, "caltech101": 101, "cifar100": 100, "dtd": 47, "eurosat": 10,
                    "flowers": 102, "food": 101, "mnist": 10, "pets": 37, "cars": 196, "sun397": 397},
        "test_images": {"aircraft": 3333, "caltech101": 1736, "cifar100": 10000, "dtd": 1880,
                        "eurosat": 5400, "flowers": 6149, "food": 25250, "mnist": 10000,
                        "pets": 3669, "cars": 8041, "sun397": 21751},
    },
    "xtail": {  # paper Table 1: MTIL without cifar100, one union label space of all classes
        "datasets": ("aircraft", "caltech101", "dtd", "eurosat", "flowers", "food", "mnist",
                     "pets", "cars", "sun397"),
        "shots": 16, "dense_ratio": 0.5, "eval": "union", "layout": "coop",
        "classes": {"aircraft": 100, "caltech101": 100, "dtd": 47, "eurosat": 10, "flowers": 102,
                    "food": 101, "mnist": 10, "pets": 37, "cars": 196, "sun397": 397},
        "test_images": {"aircraft": 3333, "caltech101": 2465, "dtd": 1692, "eurosat": 8100,
                        "flowers": 2463, "food": 30300, "mnist": 10000, "pets": 3669,
                        "cars": 8041, "sun397": 19850},
    },
}

SETTINGS["tiny"] = {  # the offline tiny world (tiny_world.py): generated images, a tiny pretrained CLIP
    "datasets": ("shapes", "digits", "colours", "patterns", "counts"),
    "shots": 16, "dense_ratio": 0.5, "eval": "task-aware", "layout": "generated",
    # a tiny model from a short pretraining needs more steps and a larger step to learn 16 shots
    # than CLIP does; fixed before any comparison was run. Full fine-tuning: a tenth of pretraining's lr.
    "iterations": 300, "batch_size": 32, "lr": 2e-3, "lr_full": 1e-4,
}

ASSETS = json.loads((Path(__file__).parent / "assets" / "classnames_templates.json").read_text())
MNIST_CLASSES = [f"{i} - {w}" for i, w in enumerate(
    "zero one two three four five six seven eight nine".split())]  # torchvision MNIST.classes
DOWNLOAD_HINT = "rerun with --download (download=True) to fetch it with torchvision"


class DataError(Exception):
    """A dataset is missing or unreadable; the message is one line saying what to do."""


# ----------------------------------------------------------------------------------------------
# datasets, splits, few-shot

@dataclass
class Task:
    name: str
    classnames: list  # index = label
    templates: list   # evaluation ensemble (MTIL) or the single template (X-TAIL); train uses [0]
    train: "ImageSet"
    test: "ImageSet"


class ImageSet(torch.utils.data.Dataset):
    """Labelled images: file paths decoded on access, or a uint8 array (N, H, W[, 3]).

    Labels are plain ints known up front, so samplers and few-shot selection never open a file.
    """

    def __init__(self, images, labels, transform=None):
        self.images = images  # list[str] or np.ndarray
        self.labels = [int(y) for y in labels]
        self.transform = transform  # PIL RGB image -> anything; settable

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


def split_80_20(n):
    """ZSCL's split of a dataset without a test set: (train indices, test indices)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(42)).tolist()
    cut = int(0.8 * n)
    return perm[:cut], perm[cut:]


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


def _images_in(folder):
    return sorted(f for f in os.listdir(folder) if f.lower().endswith((".jpg", ".jpeg", ".png")))


def _class_folders(root, classes):
    """(paths, labels) of the images in root/<class>/, label = the class's index in `classes`."""
    paths, labels = [], []
    for label, c in enumerate(classes):
        files = _images_in(root / c)
        paths += [str(root / c / f) for f in files]
        labels += [label] * len(files)
    return paths, labels


def _split_in_order(paths, labels):
    train, test = split_80_20(len(paths))
    full = ImageSet(paths, labels)
    return full.subset(train), full.subset(test)


def _loadmat(name):
    # Flowers102 and StanfordCars ship MATLAB files; cars' are struct/cell arrays. A reader for
    # that format would outweigh the rest of this file, so scipy (what torchvision uses for these
    # two datasets) is an optional import, asked for only when one of them is in the run.
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
    names = dict(zip(ASSETS["mtil"]["caltech101"]["folders"], ASSETS["mtil"]["caltech101"]["classnames"]))
    root = folder / "101_ObjectCategories"
    cats = sorted(c for c in os.listdir(root) if c != "BACKGROUND_Google" and (root / c).is_dir())
    return [names[c] for c in cats], *_split_in_order(*_class_folders(root, cats))


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
    names = dict(zip(ASSETS["mtil"]["eurosat"]["folders"], ASSETS["mtil"]["eurosat"]["classnames"]))
    root = folder / "2750"
    classes = sorted(c for c in os.listdir(root) if (root / c).is_dir())
    return [names[c] for c in classes], *_split_in_order(*_class_folders(root, classes))


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
    """An MNIST idx file as a uint8 array (magic: 0, 0, dtype 0x08, ndim; then ndim big-endian sizes)."""
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
        for r in rows:  # torchvision's names: "american_pit_bull_terrier_12" -> "American Pit Bull Terrier"
            breeds[int(r[1]) - 1] = " ".join(p.title() for p in r[0].rsplit("_", 1)[0].split("_"))
        return ImageSet([str(folder / "images" / f"{r[0]}.jpg") for r in rows], [int(r[1]) - 1 for r in rows])
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
    return [rel[2:] for rel in lines], *_split_in_order(paths, [y for _, y in entries])


def _coop(split_file, image_dir):
    """Reader of a CoOp split file {"train"|"val"|"test": [[relpath, label, classname], ...]}."""
    def read(folder):
        try:
            split = json.loads((folder / split_file).read_text())
        except ValueError as e:
            raise ValueError(f"{split_file} is not valid JSON ({e})") from None
        if not (isinstance(split, dict) and all(isinstance(split.get(k), list) for k in ("train", "test"))):
            raise ValueError(f'{split_file} has no "train" and "test" lists')
        names, sets = {}, []
        for key in ("train", "test"):
            paths, labels = [], []
            for item in split[key]:
                if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
                        and isinstance(item[1], int) and isinstance(item[2], str)):
                    raise ValueError(f"{split_file}: {key} item {str(item)[:60]} is not [path, label, classname]")
                if names.setdefault(item[1], item[2]) != item[2]:
                    raise ValueError(f"{split_file}: label {item[1]} has two class names")
                paths.append(str(folder / image_dir / item[0]))
                labels.append(item[1])
            sets.append(ImageSet(paths, labels))
        if sorted(names) != list(range(len(names))):
            raise ValueError(f"{split_file}: labels are not 0..{len(names) - 1}")
        return [names[i] for i in range(len(names))], *sets
    return read


# ----------------------------------------------------------------------------------------------
# layouts: name -> (folders to try under data_dir, what each must contain, reader)

_AIRCRAFT_FILES = ("variants.txt", "images_variant_train.txt", "images_variant_test.txt", "images")
_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_CARS_FILES = ("devkit/cars_meta.mat", "devkit/cars_train_annos.mat",
               "cars_test_annos_withlabels.mat", "cars_train", "cars_test")

LAYOUTS = {
    "torchvision": {  # the folders torchvision 0.29's dataset classes create under their root
        "aircraft": (("fgvc-aircraft-2013b/data",), _AIRCRAFT_FILES, _aircraft),
        "caltech101": (("caltech101",), ("101_ObjectCategories",), _caltech101),
        "cifar100": (("cifar-100-python",), ("train", "test", "meta"), _cifar100),
        "dtd": (("dtd/dtd",), ("labels/train1.txt", "labels/test1.txt", "images"), _dtd),
        "eurosat": (("eurosat",), ("2750",), _eurosat),
        "flowers": (("flowers-102",), ("imagelabels.mat", "setid.mat", "jpg"), _flowers),
        "food": (("food-101",), ("meta/train.json", "meta/test.json", "images"), _food),
        "mnist": (("MNIST/raw",), _MNIST_FILES, _mnist),
        "pets": (("oxford-iiit-pet",), ("annotations/trainval.txt", "annotations/test.txt", "images"), _pets),
        "cars": (("stanford_cars",), _CARS_FILES, _cars),
        "sun397": (("SUN397",), ("ClassName.txt",), _sun397),
    },
    "coop": {  # CoOp's DATASETS.md; the second folder of each is the torchvision one, same inside
        "aircraft": (("fgvc_aircraft", "fgvc-aircraft-2013b/data"), _AIRCRAFT_FILES, _aircraft),
        "caltech101": (("caltech-101", "caltech101"), ("split_zhou_Caltech101.json", "101_ObjectCategories"),
                       _coop("split_zhou_Caltech101.json", "101_ObjectCategories")),
        "dtd": (("dtd", "dtd/dtd"), ("split_zhou_DescribableTextures.json", "images"),
                _coop("split_zhou_DescribableTextures.json", "images")),
        "eurosat": (("eurosat", "EuroSAT"), ("split_zhou_EuroSAT.json", "2750"),
                    _coop("split_zhou_EuroSAT.json", "2750")),
        "flowers": (("oxford_flowers", "flowers-102"), ("split_zhou_OxfordFlowers.json", "jpg"),
                    _coop("split_zhou_OxfordFlowers.json", "jpg")),
        "food": (("food-101", "food101"), ("split_zhou_Food101.json", "images"),
                 _coop("split_zhou_Food101.json", "images")),
        "mnist": (("MNIST/raw",), _MNIST_FILES, _mnist),
        "pets": (("oxford_pets", "oxford-iiit-pet"), ("split_zhou_OxfordPets.json", "images"),
                 _coop("split_zhou_OxfordPets.json", "images")),
        "cars": (("stanford_cars",), ("split_zhou_StanfordCars.json", "cars_train", "cars_test"),
                 _coop("split_zhou_StanfordCars.json", "")),  # its paths start with cars_{train,test}/
        "sun397": (("sun397",), ("split_zhou_SUN397.json", "SUN397"), _coop("split_zhou_SUN397.json", "SUN397")),
    },
}

_TORCHVISION_CLASS = {"aircraft": "FGVCAircraft", "caltech101": "Caltech101", "cifar100": "CIFAR100",
                      "dtd": "DTD", "eurosat": "EuroSAT", "flowers": "Flowers102", "food": "Food101",
                      "mnist": "MNIST", "pets": "OxfordIIITPet", "sun397": "SUN397"}  # cars: none


def _downloadable(name, layout):
    return name in _TORCHVISION_CLASS and (layout == "torchvision" or name in ("aircraft", "mnist"))


def _find(data_dir, folders, needs):
    """The first folder that has everything, else None."""
    for folder in folders:
        if all((data_dir / folder / p).exists() for p in needs):
            return data_dir / folder
    return None


def _missing(name, layout, data_dir, download_error=None):
    folders, needs, _ = LAYOUTS[layout][name]
    where = " or ".join(f"{data_dir / f}/" for f in folders)
    msg = f"{name}: expected {where} with {', '.join(needs)}; "
    if name == "cars":
        msg += ("torchvision can no longer download StanfordCars: put cars_train/, cars_test/, "
                "cars_test_annos_withlabels.mat and devkit/ (cars_meta.mat, cars_train_annos.mat) there"
                + (" plus CoOp's split_zhou_StanfordCars.json" if layout == "coop" else ""))
    elif not _downloadable(name, layout):
        msg += (f"put CoOp's {needs[0]} (see github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md) "
                f"next to the images in {needs[1]}/ there")
    else:
        msg += f"torchvision's download failed ({download_error})" if download_error else DOWNLOAD_HINT
        if name == "caltech101":
            msg += (f"; if its link is down, get caltech-101.zip from https://data.caltech.edu/records/"
                    f"mzrjq-6wc02 and extract its 101_ObjectCategories.tar.gz into {data_dir / 'caltech101'}/")
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

def load_tasks(setting, data_dir, shots=None, seed=0, datasets=None, download=False):
    """The tasks of a setting, in order, train sets already few-shot (shots=0: full train sets).

    Finds every dataset first (downloading what torchvision can when download=True), then indexes
    every one; any problem raises DataError with one line, before anything is returned.
    """
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose from {sorted(SETTINGS)}")
    cfg = SETTINGS[setting]
    if setting == "tiny":  # generated in memory: nothing to find on disk
        import tiny_world
        # generated on demand, so it has no "full" train set: shots <= 0 means the setting's shots
        return tiny_world.tiny_tasks(shots if shots and shots > 0 else cfg["shots"], seed, domains=datasets)
    layout = cfg["layout"]
    names = list(cfg["datasets"] if datasets is None else datasets)
    unknown = [n for n in names if n not in LAYOUTS[layout]]
    if unknown:
        raise ValueError(f"unknown datasets {unknown} for {setting}; choose from {list(cfg['datasets'])}")
    shots = cfg["shots"] if shots is None else shots
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
        also = f" (also missing: {', '.join(m.split(':')[0] for m in missing[1:])})" if missing[1:] else ""
        raise DataError(missing[0] + also)

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
            if not isinstance(s.images, np.ndarray):  # cheap completeness check: first and last file
                for p in (s.images[0], s.images[-1]):
                    if not os.path.exists(p):
                        raise DataError(f"{name}: {p} is listed but missing; {folder} is incomplete")
        classnames = [c.replace("_", " ") for c in classnames]
        if setting == "mtil":
            templates = ASSETS["mtil"][name]["templates"]
        else:
            entry = ASSETS["xtail"][name]
            templates = [entry["template"]]
            classnames = [c + entry.get("classname_suffix", "") for c in classnames]
        if shots and shots > 0:
            train = train.subset(few_shot(train.labels, shots, seed, name))
        tasks.append(Task(name, classnames, list(templates), train, test))
    return tasks
