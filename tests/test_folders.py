"""Your own tasks (issue 23): folders of class folders, learned with `--setting folders`."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import data
from conftest import run_script
from test_faults import one_line_error
from test_train import kill_after_first_task, run

# the shipped tiny CLIP, a few steps: these tests check the machinery, not accuracy
FAST = ["--setting", "folders", "--model", "tiny", "--iterations", "4", "--batch-size", "4",
        "--shots", "2", "--rank", "2", "--routing", "oracle", "--workers", "0"]
TEMPLATES = ["a drawing of a {}.", "art of the {}."]


def write_image(path, colour, seed):
    """A noisy image of one colour, 48 x 40 px: not the tiny CLIP's 32, so prepare resizes it."""
    pixels = np.random.default_rng(seed).normal(colour, 30, (40, 48, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


def write_tasks(root):
    """alpha: train/ and test/; beta: class folders only (80/20); gamma: train/ and val/, with
    classnames.txt and templates.txt."""
    for split, n in (("train", 4), ("test", 2)):
        for c, (name, colour) in enumerate((("red_square", 200), ("blue-circle", 40))):
            for i in range(n):
                write_image(root / "alpha" / split / name / f"{i}.png", colour, 10 * c + i)
        for c, folder in enumerate(("b_one", "a_two")):
            for i in range(n - 1):
                write_image(root / "gamma" / split.replace("test", "val") / folder / f"{i}.png",
                            60 + 120 * c, 20 * c + i)
    for c, name in enumerate(("cat", "dog", "fox")):
        for i in range(5):
            write_image(root / "beta" / name / f"{i}.jpg", 50 * c + 30, 30 * c + i)
    (root / "gamma" / "classnames.txt").write_text("second thing\nfirst thing\n")
    (root / "gamma" / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return root


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """One uninterrupted run of train.py over the three task folders: (root, out, process)."""
    root = write_tasks(tmp_path_factory.mktemp("tasks"))
    out = root.parent / "out"
    done = run(*FAST, "--data-dir", str(root), "--out", str(out), "--cache-dir",
               str(root.parent / "cache"))
    assert done.returncode == 0, done.stderr
    return root, out, done


def test_three_task_folders_run_end_to_end(whole):
    """train.py learns the three folders in sorted order and records their names, classes,
    templates and split sizes and a 3 x 3 accuracy matrix in results.json."""
    _, out, done = whole
    res = json.loads((out / "results.json").read_text())
    assert res["datasets"] == ["alpha", "beta", "gamma"]
    alpha, beta, gamma = res["tasks"]
    assert alpha["classnames"] == ["blue circle", "red square"]  # sorted folders, "-" "_" spaces
    assert beta["classnames"] == ["cat", "dog", "fox"]
    assert gamma["classnames"] == ["second thing", "first thing"]  # the file's, in folder order
    assert alpha["templates"] == beta["templates"] == ["a photo of a {}."]
    assert gamma["templates"] == TEMPLATES
    assert (alpha["split"], alpha["train_images"], alpha["test"]) == ("train/ and test/", 8, 4)
    assert (beta["split"], beta["split_seed"], beta["train_images"], beta["test"]) == (
        "80/20 per class", 42, 12, 3)
    assert (gamma["split"], gamma["train_images"], gamma["test"]) == ("train/ and val/", 6, 2)
    assert [t["train"] for t in res["tasks"]] == [4, 6, 4]  # 2 shots a class
    assert len(res["acc"]) == 3 and all(len(row) == 3 for row in res["acc"])
    assert all(0 <= a <= 100 for row in res["acc"] for a in row)
    sizes = "beta: 3 classes, 12 train and 3 test images (80/20 per class), 2 shots"
    assert done.stdout.index(sizes) < done.stdout.index("zero-shot") < done.stdout.index("Last")


def test_eval_py_gives_the_zero_shot_row_in_the_asked_order(whole, tmp_path):
    """eval.py --setting folders --datasets gamma,alpha evaluates those two in that order and
    gives train.py's zero-shot accuracies for them."""
    root, out, _ = whole
    done = run_script("eval.py", *FAST[:4], "--datasets", "gamma,alpha", "--data-dir", str(root),
                      "--workers", "0", "--cache-dir", str(tmp_path / "cache"),
                      "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    row = json.loads((tmp_path / "out" / "results.json").read_text())
    zero_shot = json.loads((out / "results.json").read_text())["zero_shot"]
    assert row["datasets"] == ["gamma", "alpha"] and row["acc"] == [[zero_shot[2], zero_shot[0]]]


def test_resume_of_a_folders_run(whole, tmp_path):
    """A folders run killed after a task resumes: it says so, trains only the tasks after, keeps
    the first run's row and timings and ends on the uninterrupted run's matrix; a resume that
    finds another list of task folders is refused in one line."""
    root, out, _ = whole
    tasks = shutil.copytree(root, tmp_path / "tasks")
    argv = [*FAST, "--data-dir", str(tasks), "--cache-dir", str(tmp_path / "cache")]
    assert kill_after_first_task(*argv, out=tmp_path / "cut") == 1
    first = json.loads((tmp_path / "cut" / "results.json").read_text())
    shutil.copytree(tasks / "beta", tasks / "delta")
    one_line_error(run(*argv, "--out", str(tmp_path / "cut"), "--resume"), "the tasks in")
    shutil.rmtree(tasks / "delta")
    done = run(*argv, "--out", str(tmp_path / "cut"), "--resume")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("resuming after task 1/3 from ") for line in lines), done.stdout
    trained = [line.split()[1:3] for line in lines if line.startswith("task ")]  # progress lines
    assert trained and {tuple(t) for t in trained} == {("2/3", "beta"), ("3/3", "gamma")}
    res = json.loads((tmp_path / "cut" / "results.json").read_text())
    timings = {k: v for k, v in first["seconds"][0].items() if k != "checkpoint"}  # saved before it
    assert res["seconds"][0] == timings and res["acc"][0] == first["acc"][0]
    assert res["acc"] == json.loads((out / "results.json").read_text())["acc"]


def _no_test_split(root):
    shutil.rmtree(root / "alpha" / "test")
    return root / "alpha"


def _empty_class(root):
    shutil.rmtree(root / "beta" / "dog")
    (root / "beta" / "dog").mkdir()
    return root / "beta" / "dog"


def _test_class_not_in_train(root):
    write_image(root / "alpha" / "test" / "zebra" / "0.png", 0, 0)
    return root / "alpha" / "test" / "zebra"


def _class_beside_the_splits(root):  # would be neither trained nor tested
    write_image(root / "alpha" / "zebra" / "0.png", 0, 0)
    return root / "alpha" / "zebra"


def _unreadable_image(root):
    (root / "alpha" / "test" / "red_square" / "1.png").write_bytes(b"\x89PNG not really")
    return root / "alpha" / "test" / "red_square" / "1.png"


@pytest.mark.parametrize("fault", [_no_test_split, _empty_class, _test_class_not_in_train,
                                   _class_beside_the_splits, _unreadable_image])
def test_a_bad_layout_is_one_line_naming_the_file(fault, tmp_path):
    """A missing split, an empty class, a test class train lacks, a class folder beside train/
    and test/ and an unreadable image each raise, while the tasks are read or prepared, one line
    naming the file."""
    root = write_tasks(tmp_path / "tasks")
    named = fault(root)
    with pytest.raises(data.DataError) as info:
        tasks, _ = data.load_folders(root, shots=2)
        data.prepare(tasks, 32, str(tmp_path / "cache"))
    assert "\n" not in str(info.value) and str(named) in str(info.value), info.value


def test_a_bad_layout_starts_no_training(tmp_path):
    """train.py meets a bad task folder before its first task, with one line and no traceback."""
    root = write_tasks(tmp_path / "tasks")
    named = _unreadable_image(root)  # the last fault found: when the test images are cached
    done = run(*FAST, "--data-dir", str(root), "--out", str(tmp_path / "out"), "--cache-dir",
               str(tmp_path / "cache"))
    one_line_error(done, str(named), "not a readable image")
    assert "task 1/" not in done.stdout


@pytest.mark.parametrize("name,text", [("classnames.txt", "only one\n"),
                                       ("templates.txt", "a photo of a thing.\n")])
def test_a_prompt_file_that_does_not_fit_is_refused(name, text, tmp_path):
    """classnames.txt with a name count unlike the class folders', or a template without {},
    raises one line naming the file."""
    root = write_tasks(tmp_path)
    (root / "gamma" / name).write_text(text)
    with pytest.raises(data.DataError) as info:
        data.load_folders(root)
    assert "\n" not in str(info.value) and str(root / "gamma" / name) in str(info.value)


def test_a_class_split_depends_on_its_task_and_class_names_only(tmp_path):
    """The 80/20 split of a class folder stays when the tasks move, a class is added or the seed
    changes (the seed draws only the shots)."""
    def tested(root, seed):  # beta's test images, as paths under root
        (beta,), _ = data.load_folders(root, shots=1, seed=seed, names=["beta"])
        return {os.path.relpath(p, root) for p in beta.test.images}
    before = tested(write_tasks(tmp_path / "here"), 0)
    moved = tmp_path / "there"
    shutil.move(tmp_path / "here", moved)
    for i in range(3):
        write_image(moved / "beta" / "ant" / f"{i}.jpg", 0, i)
    after = tested(moved, 1)
    assert len(before) == 3 and len(after) == 4 and before < after  # 5 a class: 4 train, 1 test


# --- issue 28: stale cached pixels, two classes of one name, templates, huge images

@pytest.mark.parametrize("change", ["mtime", "size"])
def test_the_test_image_cache_notices_a_replaced_image(change, tmp_path):
    """An image replaced under its name, with the old size and a new modification time or a new
    size and the old time, is decoded again: the cache gives the new pixels, not the old."""
    path = tmp_path / "red" / "0.bmp"  # BMP: the file size is fixed by the pixel count
    path.parent.mkdir()
    Image.new("RGB", (40, 40), (200, 0, 0)).save(path)
    images = data.ImageSet([str(path)], [0], data.clip_model.preprocess(False, 16))
    assert images.cached("t", str(tmp_path / "cache"))[0][0][:, 0, 0].tolist() == [200, 0, 0]
    old = os.stat(path)
    Image.new("RGB", (40, 40) if change == "mtime" else (48, 40), (0, 0, 200)).save(path)
    ns = old.st_mtime_ns + (10**9 if change == "mtime" else 0)
    os.utime(path, ns=(ns, ns))
    assert (os.path.getsize(path) == old.st_size) == (change == "mtime")
    assert images.cached("t", str(tmp_path / "cache"))[0][0][:, 0, 0].tolist() == [0, 0, 200]


@pytest.mark.parametrize("names", [None, "mug\ncup\nCup \n"])
def test_two_classes_of_one_name_are_refused(names, tmp_path):
    """Class folders tea_pot and tea-pot (both "tea pot"), or classnames.txt naming a class twice
    (CLIP's tokenizer reads "Cup " as "cup"), are refused in one line naming both folders."""
    for c, folder in enumerate(("mug", "tea-pot", "tea_pot")):
        for i in range(2):
            write_image(tmp_path / "kitchen" / folder / f"{i}.png", 80 * c, i)
    if names:
        (tmp_path / "kitchen" / "classnames.txt").write_text(names)
    with pytest.raises(data.DataError) as info:
        data.load_folders(tmp_path)
    said = str(info.value)
    assert "\n" not in said and "tea-pot" in said and "tea_pot" in said, said
    (tmp_path / "kitchen" / "classnames.txt").write_text("mug\nteapot\ntea pot\n")
    (task,), _ = data.load_folders(tmp_path)
    assert task.classnames == ["mug", "teapot", "tea pot"]


@pytest.mark.parametrize("template", ["a {} photo of a {}.", "a photo of a {}. }",
                                      "a {name} of a {}.", "a photo of a {{}}.", "{0.x} {}"])
def test_a_template_that_cannot_be_formatted_is_refused(template, tmp_path):
    """A template line with two {}, a lone brace, a named field, no {} left once its braces are
    read, or an attribute: refused when the task is read, in one line naming the file and line."""
    root = write_tasks(tmp_path)
    (root / "gamma" / "templates.txt").write_text(f"a good {{}}.\n{template}\n")
    with pytest.raises(data.DataError) as info:
        data.load_folders(root)
    said = str(info.value)
    assert "\n" not in said and str(root / "gamma" / "templates.txt") in said, said
    assert repr(template) in said, said


def test_an_image_over_the_pixel_limit_is_one_line(tmp_path, monkeypatch):
    """An image over PIL's decompression-bomb limit (twice MAX_IMAGE_PIXELS, here lowered to 500:
    48 x 40 is over 1000) is "not a readable image" in one line that states the limit."""
    write_image(tmp_path / "big.png", 100, 0)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(data.DataError) as info:
        data.ImageSet([str(tmp_path / "big.png")], [0])[0]
    said = str(info.value)
    assert "\n" not in said and "not a readable image" in said and "limit of 1000" in said


def test_a_data_dir_that_is_missing_or_a_file_says_so(tmp_path):
    """--data-dir naming nothing, or a file, says that, not "holds no task folder"."""
    (tmp_path / "file").write_text("x")
    for path, words in ((tmp_path / "nothing", "does not exist"), (tmp_path / "file", "is a file"),
                        (tmp_path, "holds no task folder")):
        with pytest.raises(data.DataError) as info:
            data.load_folders(path)
        assert "\n" not in str(info.value) and f"--data-dir {path} {words}" in str(info.value)
