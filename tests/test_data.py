"""Tests of data.py on tiny copies of every on-disk layout, written into tmp_path.

`write_fake_layout(root, setting, layout=None)` is the shared fixture: real folder and file names,
a few 8x8 images per class, real split-file formats (CoOp JSON, torchvision txt/json/.mat/pickle/
idx), written by the dry run's writer (dryrun.write_dataset). Each dataset has 3 classes, so
every load also warns that its sizes are not the real ones.
"""
import json
import os
import random
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch
import torchvision.datasets as tv
from PIL import Image

import data
import dryrun
from conftest import run_script

# the first three classes of every dataset: (folder or raw name on disk, name in a CoOp split file)
FAKE_CLASSES = {
    "aircraft": ["707-320", "727-200", "737-200"],
    "caltech101": [("Faces", "face"), ("Faces_easy", "face easy"), ("Leopards", "leopard")],
    "cifar100": ["apple", "aquarium_fish", "baby"],
    "dtd": ["banded", "blotchy", "braided"],
    "eurosat": [("AnnualCrop", "Annual Crop Land"), ("Forest", "Forest"),
                ("HerbaceousVegetation", "Herbaceous Vegetation Land")],
    "flowers": ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"],
    "food": ["apple_pie", "baby_back_ribs", "baklava"],
    "pets": [("Abyssinian", "abyssinian"), ("american_bulldog", "american_bulldog"),
             ("american_pit_bull_terrier", "american_pit_bull_terrier")],
    "cars": [("AM General Hummer SUV 2000", "2000 AM General Hummer SUV"),
             ("Acura RL Sedan 2012", "2012 Acura RL Sedan"),
             ("Acura TL Sedan 2012", "2012 Acura TL Sedan")],
    "sun397": [("a/abbey", "abbey"), ("a/apartment_building/outdoor", "outdoor apartment building"),
               ("b/bakery/shop", "shop bakery")],
}

# what load_tasks must name them (first three classes)
EXPECTED = {
    "mtil": {
        "aircraft": ["707-320", "727-200", "737-200"],
        "caltech101": ["off-center face", "centered face", "leopard"],
        "cifar100": ["apple", "aquarium fish", "baby"],
        "dtd": ["banded", "blotchy", "braided"],
        "eurosat": ["annual crop land", "forest", "brushland or shrubland"],
        "flowers": ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"],
        "food": ["apple pie", "baby back ribs", "baklava"],
        "mnist": data.MNIST_CLASSES,
        "pets": ["Abyssinian", "American Bulldog", "American Pit Bull Terrier"],
        "cars": ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012"],
        "sun397": ["abbey", "apartment building/outdoor", "bakery/shop"],
    },
    "xtail": {
        "aircraft": ["707-320", "727-200", "737-200"],
        "caltech101": ["face", "face easy", "leopard"],
        "dtd": ["banded", "blotchy", "braided"],
        "eurosat": ["Annual Crop Land satellite location", "Forest satellite location",
                    "Herbaceous Vegetation Land satellite location"],
        "flowers": ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"],
        "food": ["apple pie", "baby back ribs", "baklava"],
        "mnist": data.MNIST_CLASSES,
        "pets": ["abyssinian", "american bulldog", "american pit bull terrier"],
        "cars": ["2000 AM General Hummer SUV", "2012 Acura RL Sedan", "2012 Acura TL Sedan"],
        "sun397": ["abbey", "outdoor apartment building", "shop bakery"],
    },
}
SPLIT_80_20 = ("caltech101", "eurosat", "sun397")  # torchvision layout only


def write_fake_layout(root, setting, classes_per_dataset=3, images_per_class=2, layout=None):
    """Write a tiny copy of every dataset of `setting` under root, in `layout` (default: the
    setting's; "coop" writes CIFAR100 and MNIST as torchvision does), with dryrun.write_dataset.

    Each class gets images_per_class train and images_per_class test images (the 80/20 datasets
    get 2 * images_per_class in all); MNIST uses labels 0..classes_per_dataset-1 of its 10.
    """
    C, n = classes_per_dataset, classes_per_dataset * images_per_class
    rng = np.random.default_rng(0)
    assert 1 <= C <= 3
    for name in data.BENCHMARKS[setting]["datasets"]:
        raw = [r if isinstance(r, tuple) else (r, r)  # MNIST: labels only, its names are known
               for r in FAKE_CLASSES.get(name, ["0", "1", "2"])][:C]
        dryrun.write_dataset(root, layout or data.BENCHMARKS[setting]["layout"], name,
                             [f for f, _ in raw], [c for _, c in raw], {"train": n, "test": n}, rng)
    return root


@pytest.fixture(scope="module")
def mtil_root(tmp_path_factory):
    return write_fake_layout(tmp_path_factory.mktemp("mtil"), "mtil")


@pytest.fixture(scope="module")
def xtail_root(tmp_path_factory):
    return write_fake_layout(tmp_path_factory.mktemp("xtail"), "xtail")


@pytest.fixture(scope="module")
def coop_root(tmp_path_factory):  # MTIL's 11 datasets in CoOp's layout (CIFAR100: torchvision's)
    return write_fake_layout(tmp_path_factory.mktemp("coop"), "mtil", layout="coop")


# ----------------------------------------------------------------------------------------------
# Must show 1: every layout loads with the right names, counts, label order and split sizes

@pytest.mark.parametrize("setting", ["mtil", "xtail"])
def test_every_dataset_loads_with_names_counts_and_split_sizes(setting, request):
    """Both layouts give every dataset in order with its class names, templates, labels and
    sizes."""
    root = request.getfixturevalue(f"{setting}_root")
    tasks = data.load_tasks(setting, root, shots=None)
    assert [t.name for t in tasks] == list(data.BENCHMARKS[setting]["datasets"])
    for t in tasks:
        assert t.classnames == EXPECTED[setting][t.name], t.name
        n = len(t.train) + len(t.test)
        if setting == "mtil" and t.name in SPLIT_80_20:
            assert (len(t.train), len(t.test)) == (int(0.8 * n), n - int(0.8 * n)) == (9, 3), t.name
        else:
            assert len(t.train) == len(t.test) == 6, t.name
            assert sorted(t.train.labels) == sorted(t.test.labels) == [0, 0, 1, 1, 2, 2], t.name
        assert set(t.train.labels) | set(t.test.labels) == {0, 1, 2}, t.name
        if setting == "mtil":
            assert t.templates == data.ASSETS["mtil"][t.name]["templates"]
        else:
            assert t.templates == [data.ASSETS["xtail"][t.name]["template"]]


TORCHVISION = {  # torchvision's own reader of each fake tree: its test split, or all (80/20)
    "aircraft": lambda root: tv.FGVCAircraft(root, "test", annotation_level="variant"),
    "caltech101": tv.Caltech101, "cifar100": lambda root: tv.CIFAR100(root, train=False),
    "dtd": lambda root: tv.DTD(root, "test"), "eurosat": tv.EuroSAT,
    "flowers": lambda root: tv.Flowers102(root, "test"),
    "food": lambda root: tv.Food101(root, "test"), "mnist": lambda root: tv.MNIST(root, False),
    "pets": lambda root: tv.OxfordIIITPet(root, "test"),
    "cars": lambda root: tv.StanfordCars(root, "test"), "sun397": tv.SUN397}


def classes_of(dataset):
    """Each class's images, whatever its label: the file each one opens (its pixels if none)."""
    opened, by_label, open_file = [], {}, Image.open

    def recording_open(fp, *args, **kwargs):  # a path, or a file object (ImageFolder's)
        opened.append(os.path.abspath(fp if isinstance(fp, (str, os.PathLike)) else fp.name))
        return open_file(fp, *args, **kwargs)
    with mock.patch.object(Image, "open", recording_open):
        for i in range(len(dataset)):
            opened.clear()
            image, label = dataset[i]
            key = opened[0] if opened else np.asarray(image.convert("RGB")).tobytes()
            by_label.setdefault(label, []).append(key)
    return sorted(sorted(keys) for keys in by_label.values())


@pytest.mark.parametrize("name", data.BENCHMARKS["mtil"]["datasets"])
def test_torchvision_reads_the_fake_trees_alike(name, mtil_root, monkeypatch):
    """The fakes are not only our idea of each layout: torchvision's dataset classes open them
    and find the same images in the same classes (test split, or all for the 80/20 datasets)."""
    for module in (tv.cifar, tv.flowers102):  # they check md5 sums, which fakes cannot match
        monkeypatch.setattr(module, "check_integrity", lambda *args: True)
    theirs = TORCHVISION[name](str(mtil_root))
    task = data.load_tasks("mtil", mtil_root, None, 0, [name])[0]
    ours = task.test if name not in SPLIT_80_20 else data.ImageSet(
        task.train.images + task.test.images, task.train.labels + task.test.labels)
    if name == "caltech101":  # NOTE: its fake files are not named image_0001.jpg..: counts only
        assert sorted(np.bincount(theirs.y)) == sorted(np.bincount(ours.labels)), name
    else:
        assert classes_of(theirs) == classes_of(ours), name


def test_labels_follow_the_class_not_the_file_order(mtil_root):
    """Each image's label is its own class's index, whatever order the split file lists it in."""
    tasks = {t.name: t for t in data.load_tasks("mtil", mtil_root, shots=None)}
    for name, folder_of in [("dtd", lambda p: p.split("/")[-2]),
                            ("food", lambda p: p.split("/")[-2]),
                            ("caltech101", lambda p: p.split("/")[-2])]:
        raw = [r if isinstance(r, str) else r[0] for r in FAKE_CLASSES[name]]
        for path, label in zip(tasks[name].train.images, tasks[name].train.labels):
            assert raw[label] == folder_of(path), (name, path)
    assert all("BACKGROUND_Google" not in p for p in tasks["caltech101"].train.images)


def test_items_decode_to_transformed_rgb(xtail_root):
    """__getitem__ gives (transform(PIL RGB image), label) for file and array datasets alike."""
    tasks = {t.name: t for t in data.load_tasks("xtail", xtail_root, shots=None,
                                                datasets=["mnist", "pets"])}
    for t in tasks.values():
        img, label = t.test[0]
        assert img.mode == "RGB" and label == t.test.labels[0]
        t.test.transform = lambda im: im.size
        assert t.test[0][0] == ((28, 28) if t.name == "mnist" else (8, 8))
        sub = t.test.subset([5, 0])
        assert sub.labels == [t.test.labels[5], t.test.labels[0]] and sub[0][0] == t.test[5][0]


def test_coop_folder_name_variants(tmp_path):
    """CoOp data also loads from torchvision-style folder names (caltech101/, dtd/dtd/,
    oxford-iiit-pet/)."""
    root = write_fake_layout(tmp_path, "xtail")
    (root / "caltech-101").rename(root / "caltech101")
    (root / "dtd").rename(root / "dtd_tmp")
    (root / "dtd").mkdir()
    (root / "dtd_tmp").rename(root / "dtd/dtd")
    (root / "oxford_pets").rename(root / "oxford-iiit-pet")
    tasks = data.load_tasks("xtail", root, shots=None, datasets=["caltech101", "dtd", "pets"])
    assert [t.classnames for t in tasks] == [EXPECTED["xtail"][n]
                                             for n in ("caltech101", "dtd", "pets")]


# ----------------------------------------------------------------------------------------------
# Must show 2: the 80/20 rule and the few-shot sampler

def test_80_20_split_is_zscl_random_split_seed_42(mtil_root):
    """caltech101's split equals torch's random_split(seed 42) over torchvision's sorted index."""
    root = mtil_root / "caltech101/101_ObjectCategories"
    index = [str(root / c / f) for c in sorted(c for c, _ in FAKE_CLASSES["caltech101"])
             for f in sorted(p.name for p in (root / c).iterdir())]
    train, test = torch.utils.data.random_split(
        index, [int(0.8 * len(index)), len(index) - int(0.8 * len(index))],
        generator=torch.Generator().manual_seed(42))
    task = data.load_tasks("mtil", mtil_root, shots=None, datasets=["caltech101"])[0]
    assert task.train.images == list(train) and task.test.images == list(test)
    paths = [str(i) for i in range(1000)]
    train, test = data.split_80_20(paths, [0] * 1000)
    assert train.images[:5] == [str(i) for i in torch.randperm(
        1000, generator=torch.Generator().manual_seed(42))[:5].tolist()]
    assert len(train) == 800 and sorted(train.images + test.images) == sorted(paths)


def test_sun397_split_does_not_depend_on_filesystem_order(mtil_root, monkeypatch):
    """SUN397's file list is sorted before the split, so listing order cannot change it."""
    first = data.load_tasks("mtil", mtil_root, shots=None, datasets=["sun397"])[0]
    listdir = data.os.listdir
    monkeypatch.setattr(data.os, "listdir", lambda p: list(reversed(listdir(p))))
    second = data.load_tasks("mtil", mtil_root, shots=None, datasets=["sun397"])[0]
    assert first.train.images == second.train.images and first.test.images == second.test.images


def test_few_shot_same_seed_any_build_order(tmp_path):
    """A dataset's few-shot subset is the same whatever was built (or drew random numbers) before
    it."""
    root = write_fake_layout(tmp_path, "xtail", images_per_class=5)
    names = list(data.BENCHMARKS["xtail"]["datasets"])
    forward = {t.name: t.train.images for t in data.load_tasks("xtail", root, shots=2, seed=3)}
    random.random(), np.random.rand(7), torch.rand(11)
    backward = {t.name: t.train.images for t in data.load_tasks("xtail", root, shots=2, seed=3,
                                                                   datasets=names[::-1])}
    single = data.load_tasks("xtail", root, shots=2, seed=3, datasets=["sun397"])[0].train.images
    assert (all(forward[n] == backward[n] for n in names if n != "mnist")
            and forward["sun397"] == single)
    assert np.array_equal(forward["mnist"], backward["mnist"])
    assert all(len(forward[n]) == 2 * 3 for n in names)


def test_few_shot_seed_and_name_change_the_subset():
    """A different seed or dataset name gives a different subset; the same ones give the same."""
    labels = [c for c in range(4) for _ in range(50)]
    a = data.few_shot(labels, 5, 0, "dtd")
    assert a == data.few_shot(labels, 5, 0, "dtd")
    assert a != data.few_shot(labels, 5, 1, "dtd") and a != data.few_shot(labels, 5, 0, "food")


def test_few_shot_k_per_class_replacement_only_when_short():
    """k indices per class, all distinct when the class has k, with repeats only when it has
    fewer."""
    labels = [0] * 10 + [1] * 3 + [2] * 5
    picked = data.few_shot(labels, 5, 0, "x")
    by_class = {c: [i for i in picked if labels[i] == c] for c in range(3)}
    assert all(len(v) == 5 for v in by_class.values())
    assert len(set(by_class[0])) == 5 and sorted(set(by_class[2])) == [13, 14, 15, 16, 17]
    assert len(by_class[1]) == 5 > len(set(by_class[1])) and set(by_class[1]) <= {10, 11, 12}


# ----------------------------------------------------------------------------------------------
# Must show 3: the X-TAIL union label space

def test_union_offsets_follow_task_order(xtail_root):
    """Union offsets are the running class counts in task order; names concatenate in that order."""
    tasks = data.load_tasks("xtail", xtail_root, shots=None)
    assert data.union_offsets(tasks) == [0, 3, 6, 9, 12, 15, 18, 28, 31, 34]
    union = [c for t in tasks for c in t.classnames]
    for t, off in zip(tasks, data.union_offsets(tasks)):
        assert union[off:off + len(t.classnames)] == t.classnames


def test_union_of_real_class_counts_is_1100():
    """With the real class counts, X-TAIL's union has 1,100 classes and sun397 starts at 703."""
    counts = {n: data.SIZES["coop"][n][0] for n in data.BENCHMARKS["xtail"]["datasets"]}
    tasks = [data.Task(n, ["c"] * counts[n], [], None, None)
             for n in data.BENCHMARKS["xtail"]["datasets"]]
    offsets = data.union_offsets(tasks)
    assert offsets[-1] + counts["sun397"] == 1100 and offsets[-1] == 703
    mtil = data.BENCHMARKS["mtil"]["datasets"]
    assert sum(data.SIZES["torchvision"][n][0] for n in mtil) == 1201


# ----------------------------------------------------------------------------------------------
# Must show 4: one-line errors, before anything is read or trained

def test_missing_dataset_one_line_error_before_reading_any(tmp_path, monkeypatch):
    """A missing dataset (the last of the run) is named in one line before any dataset is
    indexed."""
    root = write_fake_layout(tmp_path, "mtil")
    for folder in ("stanford_cars", "SUN397"):
        for p in sorted((root / folder).rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        (root / folder).rmdir()
    read = []
    folders, needs, reader = data.LAYOUTS["torchvision"]["aircraft"]
    monkeypatch.setitem(data.LAYOUTS["torchvision"], "aircraft",
                        (folders, needs, lambda f: read.append(f) or reader(f)))
    with pytest.raises(data.DataError) as e:
        data.load_tasks("mtil", root)
    msg = str(e.value)
    assert "\n" not in msg and not read
    assert msg.startswith("cars: ") and str(root / "stanford_cars") in msg and "devkit" in msg
    assert "also missing: sun397" in msg


def test_missing_caltech_says_where_to_put_it(tmp_path):
    """A missing caltech101 names the folder, the download flag and the manual fallback."""
    with pytest.raises(data.DataError) as e:
        data.load_tasks("mtil", tmp_path, datasets=["caltech101"])
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "caltech101") in msg
    assert "--download" in msg and "101_ObjectCategories.tar.gz" in msg


@pytest.mark.parametrize("content", ['{"train": [["banded/a.jpg", "0"]], "test": []}',
                                     '{"train": [', "[]"])
def test_malformed_split_file_one_line_error(tmp_path, content):
    """A malformed CoOp split file gives one line naming the dataset and the file."""
    root = write_fake_layout(tmp_path, "xtail")
    (root / "dtd/split_zhou_DescribableTextures.json").write_text(content)
    with pytest.raises(data.DataError) as e:
        data.load_tasks("xtail", root)
    msg = str(e.value)
    assert ("\n" not in msg and msg.startswith("dtd: ")
            and "split_zhou_DescribableTextures.json" in msg)


def test_missing_image_is_reported(tmp_path):
    """An index that lists an image that is not on disk is reported as an incomplete dataset."""
    root = write_fake_layout(tmp_path, "xtail")
    (root / "food-101/images/baklava/test_0.jpg").unlink()
    with pytest.raises(data.DataError, match="food: .*baklava/test_0.jpg is listed but missing"):
        data.load_tasks("xtail", root, datasets=["food"])


def test_few_shot_is_the_same_in_another_process():
    """The sampler does not depend on Python's per-process string hash salt."""
    code = ("import data; "
            "print(data.few_shot([c for c in range(5) for _ in range(20)], 3, 7, 'sun397'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout
    assert out.strip() == str(data.few_shot([c for c in range(5) for _ in range(20)], 3, 7,
                                            "sun397"))


# ----------------------------------------------------------------------------------------------
# --prompts, --layout and the known sizes of each layout

# the third class of every dataset as each layout names it
THIRD = {"torchvision": {n: names[2] for n, names in EXPECTED["mtil"].items()}}
THIRD["coop"] = {**THIRD["torchvision"], "eurosat": "Herbaceous Vegetation Land",
                 "pets": "american pit bull terrier", "cars": "2012 Acura TL Sedan",
                 "sun397": "shop bakery"}
# dataset: its prompt with --prompts ensemble (the first of ZSCL's ensemble), first, photo
PROMPTS = {
    "aircraft": ["a photo of a {}, a type of aircraft."] * 2 + ["a photo of a {}."],
    "caltech101": ["a photo of a {}."] * 3,
    "cifar100": ["a photo of a {}."] * 3,
    "dtd": ["a photo of a {} texture.", "{} texture.", "a photo of a {}."],
    "eurosat": ["a centered satellite photo of {}.",
                "a centered satellite photo of {} satellite location.",
                "a photo of a {} satellite location."],
    "flowers": ["a photo of a {}, a type of flower."] * 2 + ["a photo of a {}."],
    "food": ["a photo of a {}, a type of food.", "a photo of {}, a type of food.",
             "a photo of a {}."],
    "mnist": ['a photo of the number: "{}".'] * 2 + ['a photo of a number: "{}".'],
    "pets": ["a photo of a {}, a type of pet."] * 2 + ["a photo of a {}."],
    "cars": ["a photo of a {}, a type of car.", "a photo of a {}.", "a photo of a {}."],
    "sun397": ["a photo of a {}."] * 3,
}


@pytest.mark.parametrize("layout,tree", [("torchvision", "mtil_root"), ("coop", "coop_root")])
def test_each_prompts_choice_gives_the_exact_prompts(layout, tree, request):
    """Every dataset's third class gets the expected prompt from each --prompts choice, in either
    layout; ensemble keeps ZSCL's whole ensemble, first and photo one template."""
    root = request.getfixturevalue(tree)
    for i, choice in enumerate(data.PROMPTS):
        for t in data.load_tasks("mtil", root, layout=layout, prompts=choice):
            expected = PROMPTS[t.name][i].format(THIRD[layout][t.name])
            assert t.templates[0].format(t.classnames[2]) == expected, (choice, t.name)
            assert len(t.templates) == (len(data.ASSETS["mtil"][t.name]["templates"])
                                        if choice == "ensemble" else 1)


def test_rail_prompt_for_all_1100_xtail_classes():
    """--prompts photo: each of X-TAIL's 1,100 classes is "a photo of a {name}.", over the names
    RAIL scores (EuroSAT's with " satellite location", MNIST's as 'number: "0 - zero"'): the
    real class lists where the assets hold them, placeholders with the real counts elsewhere."""
    eurosat = ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road",
               "Industrial Buildings", "Pasture Land", "Permanent Crop Land",
               "Residential Buildings", "River", "Sea or Lake"]  # CoOp's split file
    real = {"eurosat": eurosat, "mnist": data.MNIST_CLASSES,
            "flowers": data.ASSETS["mtil"]["flowers"]["classnames"]}
    prompts, expected = [], []
    for name in data.BENCHMARKS["xtail"]["datasets"]:
        raw = real.get(name) or [f"{name}_{i}" for i in range(data.SIZES["coop"][name][0])]
        names, templates = data.class_prompts(name, raw, "photo")
        assert templates == ["a photo of a {}."]
        prompts += [templates[0].format(c) for c in names]
        suffix = " satellite location" * (name == "eurosat")
        expected += [f'a photo of a number: "{c}".' if name == "mnist" else
                     f"a photo of a {c.replace('_', ' ')}{suffix}." for c in raw]
    assert len(prompts) == 1100 and prompts == expected
    assert prompts[0] == "a photo of a aircraft 0." and prompts[-1] == "a photo of a sun397 396."
    assert 'a photo of a number: "7 - seven".' in prompts
    assert "a photo of a Sea or Lake satellite location." in prompts


def test_mtil_reads_coop_and_xtail_reads_torchvision(coop_root, mtil_root, capsys):
    """--layout is independent of the setting: MTIL on CoOp's splits (CIFAR100 and MNIST from
    torchvision), X-TAIL on torchvision's folders, each with that layout's names, splits and
    known sizes (Caltech101: 100 classes in CoOp's layout, 101 in torchvision's)."""
    mtil = data.load_tasks("mtil", coop_root, layout="coop")
    assert [t.name for t in mtil] == list(data.BENCHMARKS["mtil"]["datasets"])
    coop_names = {**EXPECTED["xtail"], "cifar100": EXPECTED["mtil"]["cifar100"],
                  "eurosat": ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land"]}
    for t in mtil:
        assert t.classnames == coop_names[t.name] and len(t.train) == len(t.test) == 6, t.name
        assert t.templates == data.ASSETS["mtil"][t.name]["templates"]
    out = capsys.readouterr().out
    assert "caltech101 (coop layout) has 3 classes, 6 train and 6 test images; expected 100 " \
        "classes, 4128 train and 2465 test images" in out
    xtail = data.load_tasks("xtail", mtil_root, layout="torchvision")
    assert [t.name for t in xtail] == list(data.BENCHMARKS["xtail"]["datasets"])
    for t in xtail:
        suffix = " satellite location" * (t.name == "eurosat")
        assert t.classnames == [c + suffix for c in EXPECTED["mtil"][t.name]], t.name
        assert t.templates == [data.ASSETS["xtail"][t.name]["template"]]
        assert len(t.train) == (9 if t.name in SPLIT_80_20 else 6), t.name
    assert data.union_offsets(xtail)[-1] == 34  # 8 datasets of 3 classes, MNIST of 10
    out = capsys.readouterr().out
    assert "caltech101 (torchvision layout) has 3 classes, 9 train and 3 test images; expected " \
        "101 classes, 6941 train and 1736 test images" in out
    union = {layout: sum(data.SIZES[layout][n][0] for n in data.BENCHMARKS["xtail"]["datasets"])
             for layout in data.SIZES}
    assert union == {"coop": 1100, "torchvision": 1101}


def test_a_size_unlike_the_known_one_warns_once_and_the_run_goes_on(xtail_root, small_weights,
                                                                     tmp_path):
    """eval.py on datasets of other sizes than the real ones prints one warning line per dataset,
    naming it with both sizes, and evaluates every dataset all the same."""
    out = run_script("eval.py", "--setting", "xtail", "--data-dir", str(xtail_root), "--datasets",
                     "eurosat,mnist", "--prompts", "photo", "--model", small_weights,
                     "--workers", "0", "--cache-dir", "none", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    warnings = [line for line in out.stdout.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: eurosat (coop layout) has 3 classes, 6 train and 6 test images; expected 10 "
        "classes, 13500 train and 8100 test images",
        "warning: mnist (coop layout) has 10 classes, 6 train and 6 test images; expected 10 "
        "classes, 60000 train and 10000 test images"]
    res = json.loads((tmp_path / "results.json").read_text())
    assert len(res["acc"][0]) == 2 and res["args"]["prompts"] == "photo"
    assert res["args"]["layout"] == "coop"
