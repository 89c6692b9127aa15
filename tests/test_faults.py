"""Faults a user meets (issue 15): each gives one clear line, and nothing finished is lost."""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch

import clip_model
import data
import eval as evaluation
import loop
import tiny_world
from conftest import CACHE, ROOT, run_script
from test_data import write_fake_layout

FAST = ["--setting", "tiny", "--iterations", "2", "--batch-size", "4", "--rank", "2",
        "--workers", "0", "--eval-batch-size", "64", "--datasets", "shapes,digits",
        "--cache-dir", CACHE]


run = run_script


def one_line_error(out, *words):
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert all(w in lines[0] for w in words), lines[0]


def data_error(call, *words):
    with pytest.raises(data.DataError) as info:
        call()
    assert "\n" not in str(info.value) and all(w in str(info.value) for w in words), info.value


# --- data: code in a file, lost or silently wrong results, late crashes

class Payload:  # pickled, it would call os.system when loaded
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_cifar_pickle_runs_no_code(tmp_path):
    """CIFAR-100's files are read with an unpickler that refuses anything but arrays and lists."""
    write_fake_layout(tmp_path, "mtil")
    meta, marker = tmp_path / "cifar-100-python" / "meta", tmp_path / "payload_ran"
    meta.write_bytes(pickle.dumps({"fine_label_names": Payload(marker)}))
    data_error(lambda: data.load_tasks("mtil", tmp_path, datasets=["cifar100"]), "cifar100",
               "refused")
    assert not marker.exists()
    assert len(data.load_tasks("xtail", _xtail(tmp_path), datasets=["mnist"])) == 1


def _xtail(tmp_path):
    root = tmp_path / "xtail"
    write_fake_layout(root, "xtail")
    return root


def test_empty_class_folder_and_stray_folders(tmp_path):
    """An empty class folder is refused; __MACOSX, .ipynb_checkpoints and ._x.jpg are skipped."""
    write_fake_layout(tmp_path, "mtil")
    classes = tmp_path / "eurosat" / "2750"
    for stray in ("__MACOSX", ".ipynb_checkpoints"):
        (classes / stray).mkdir()
        (classes / stray / "x.jpg").write_bytes(b"junk")
    first = sorted(p for p in classes.iterdir() if p.name[0] not in "._")[0]
    (first / "._a.jpg").write_bytes(b"macOS metadata")
    task = data.load_tasks("mtil", tmp_path, datasets=["eurosat"])[0]
    assert len(task.classnames) == 3 and not any("._" in p for p in task.train.images)
    for f in first.iterdir():
        f.unlink()
    data_error(lambda: data.load_tasks("mtil", tmp_path, datasets=["eurosat"]), "holds no image")


def test_a_test_class_missing_from_train_is_named(tmp_path):
    """DTD's test list naming a class absent from its train list gives one line naming it."""
    write_fake_layout(tmp_path, "mtil")
    with open(tmp_path / "dtd/dtd/labels/test1.txt", "a") as f:
        f.write("zigzagged/zigzagged_0001.jpg\n")
    data_error(lambda: data.load_tasks("mtil", tmp_path, datasets=["dtd"]), "'zigzagged'")


def test_every_listed_file_must_exist(tmp_path):
    """A file missing in the middle of a list is found before training, not only the ends."""
    write_fake_layout(tmp_path, "mtil", images_per_class=3)
    task = data.load_tasks("mtil", tmp_path, datasets=["food"])[0]
    os.remove(task.test.images[len(task.test.images) // 2])
    data_error(lambda: data.load_tasks("mtil", tmp_path, datasets=["food"]), "listed but missing")


@pytest.mark.parametrize("where", ["train", "test"])
def test_an_unreadable_image_stops_the_run_before_training(tmp_path, where):
    """A corrupt image in a few-shot train set or a test set is found by prepare, in one line."""
    write_fake_layout(tmp_path, "mtil")
    task = data.load_tasks("mtil", tmp_path, shots=2, datasets=["food"])[0]
    bad = getattr(task, where).images[1]
    os.remove(bad)  # a file of its own: the written images are hard links to a shared pool
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8 not really a jpeg")
    for workers in (0, 2):
        data_error(lambda: data.prepare([task], 32, str(tmp_path / "cache"), workers),
                   "food: ", bad, "not a readable image")


def test_a_killed_cache_write_leaves_no_file_behind(tmp_path):
    """A temporary cache file of a process that is gone is removed by the next build."""
    task = tiny_world.tasks(1, test_per_class=1)[0]
    task.test.transform = clip_model.preprocess(False, 32)
    path = task.test.cached("shapes", str(tmp_path)).path
    os.remove(path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    name = f"{os.path.basename(path)}.{os.uname().nodename}-{dead}.tmp"  # host-pid
    (tmp_path / name).write_bytes(b"\0" * 1000)
    task.test.cached("shapes", str(tmp_path))
    assert os.listdir(tmp_path) == [os.path.basename(path)]


def test_atomic_write_keeps_the_old_file_when_the_disk_is_full(tmp_path):
    """A write that fails (a full disk) leaves the previous file whole and no temporary file."""
    path = tmp_path / "checkpoint.pt"
    path.write_text("task 1")
    with pytest.raises(OSError):
        with clip_model.atomic(str(path)) as tmp:
            open(tmp, "w").write("half of task 2")
            raise OSError(28, "No space left on device")
    assert path.read_text() == "task 1" and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_a_truncated_tiny_world_cache_is_made_again(tmp_path, monkeypatch):
    """A cut tiny-CLIP cache file is pretrained again, not a traceback."""
    small = dict(clip_model.CONFIGS["tiny"], vision_layers=1, transformer_layers=1)
    monkeypatch.setitem(clip_model.CONFIGS, "tiny", small)
    monkeypatch.setattr(tiny_world, "PRETRAIN", dict(steps=1, batch_size=4, lr=1e-3, warmup=1,
                                                     weight_decay=0.1))
    tiny_world.pretrained(cache_dir=str(tmp_path), log=None)
    (cache,) = tmp_path.iterdir()
    cache.write_bytes(cache.read_bytes()[:1000])
    model = tiny_world.pretrained(cache_dir=str(tmp_path), log=None)
    assert isinstance(model, clip_model.CLIP) and cache.stat().st_size > 1000


def test_a_truncated_shipped_tiny_clip_says_how_to_restore_it(tmp_path, monkeypatch):
    """A cut assets/tiny_clip.pt: one line saying how to restore it, how long pretraining takes
    and that the numbers will differ; then the pretraining runs."""
    small = dict(clip_model.CONFIGS["tiny"], vision_layers=1, transformer_layers=1)
    monkeypatch.setitem(clip_model.CONFIGS, "tiny", small)
    monkeypatch.setattr(tiny_world, "PRETRAIN", dict(steps=1, batch_size=4, lr=1e-3, warmup=1,
                                                     weight_decay=0.1))
    shipped = tmp_path / "tiny_clip.pt"
    shipped.write_bytes(open(tiny_world.SHIPPED, "rb").read()[:1000])
    said = []
    model = tiny_world.pretrained(cache_dir=str(tmp_path / "cache"), log=said.append,
                                  shipped=str(shipped))
    assert isinstance(model, clip_model.CLIP)
    assert all(w in said[0] for w in ("git checkout assets/tiny_clip.pt", "22 min", "differ"))


def test_tiny_world_script_refuses_what_it_does_not_know():
    """python tiny_world.py --seed x, an unknown flag or --ship with another seed: one line,
    exit 2, nothing pretrained and the shipped weights untouched."""
    before = os.stat(tiny_world.SHIPPED).st_mtime_ns
    for argv in (["--seed", "x"], ["--bogus"], ["--ship", "--seed", "1"]):
        out = run("tiny_world.py", *argv)
        assert out.returncode == 2 and out.stderr.startswith("error:"), argv
        assert out.stderr.count("\n") == 1 and not out.stdout, argv
    assert os.stat(tiny_world.SHIPPED).st_mtime_ns == before


# --- the scripts: refused flags, two runs, interruptions

@pytest.mark.parametrize("flags, words", [
    (["--datasets", "shapes,digits,shapes"], ["twice"]),
    (["--kappa-max", "inf"], ["--kappa-max"]), (["--kappa-max", "nan"], ["--kappa-max"]),
    (["--lr", "nan"], ["--lr"]), (["--lr", "inf"], ["--lr"]),
    (["--weight-decay", "-1"], ["--weight-decay"]), (["--weight-decay", "nan"], ["--weight-decay"]),
    (["--seed", "-1"], ["--seed"]), (["--device", "gpu0"], ["--device gpu0"]),
    (["--device", "cuda"], ["no CUDA"]), (["--rank", "100000"], ["--rank 100000"]),
    (["--out", "/proc/codyra-out"], ["cannot write"]),
    (["--head", "rail-dual", "--rail-width", "64"], ["--rail-width 64", "rail-primal"]),
    (["--rail-width", "64"], ["--rail-width 64", "rail-primal"])])
def test_refused_flags_give_one_line(flags, words, small_weights, tmp_path):
    """Impossible values stop the run with one line (no usage block, no traceback)."""
    if flags == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = run("train.py", *FAST, "--model", small_weights,
              *(["--out", str(tmp_path / "out")] if "--out" not in flags else []), *flags)
    one_line_error(out, *words)
    assert not (tmp_path / "out").exists(), "a refused run leaves no output folder"


def test_out_naming_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    one_line_error(run("eval.py", "--out", str(tmp_path / "file")), "is a file")


def test_help_shows_the_defaults():
    """--help states every default (the recipes' ones by setting)."""
    out = " ".join(run("train.py", "--help").stdout.split())
    assert "(default: 16)" in out and "0.005 xtail, 0.0125 tiny" in out
    assert "5 mtil, 16 xtail" in out


def test_two_runs_into_one_out_do_not_mix(tmp_path):
    """While one run holds --out, a second one is refused with one line."""
    lock = evaluation.claim(str(tmp_path))
    with pytest.raises(SystemExit) as info:
        evaluation.claim(str(tmp_path))
    assert "another run" in str(info.value)
    lock.close()
    evaluation.claim(str(tmp_path)).close()  # free again once the first run ends


def test_interrupted_runs_keep_what_they_finished(small_weights, tmp_path):
    """Ctrl-C prints one line; a checkpoint without results.json is not overwritten silently; a
    --model replaced before --resume, or a truncated checkpoint, gives one line."""
    out, write_json = tmp_path / "run", evaluation.write_json

    def write_then_ctrl_c(path, obj):  # a SIGINT to this process once task 1 is written
        write_json(path, obj)
        os.kill(os.getpid(), signal.SIGINT)
    with mock.patch.object(evaluation, "write_json", write_then_ctrl_c):
        done = run("train.py", *FAST, "--model", small_weights, "--out", str(out))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith("interrupted") and "--resume" in lines[0]
    assert len(json.loads((out / "results.json").read_text())["acc"]) == 1
    os.remove(out / "results.json")  # as if killed between the two writes
    one_line_error(run("train.py", *FAST, "--model", small_weights, "--out", str(out)), "--resume")
    moved = tmp_path / "moved"  # a moved run folder still resumes
    shutil.copytree(out, moved)
    other = tmp_path / "other.pt"
    torch.save(clip_model.CLIP(**dict(clip_model.CONFIGS["tiny"], vision_width=64)).state_dict(),
               other)
    one_line_error(run("train.py", *FAST, "--model", str(other), "--out", str(moved),
                       "--resume"), "--model")
    os.replace(small_weights, small_weights + ".orig")
    shutil.copy(other, small_weights)  # the same path, other weights
    try:
        one_line_error(run("train.py", *FAST, "--model", small_weights, "--out", str(moved),
                           "--resume"), "cannot continue")
    finally:
        os.replace(small_weights + ".orig", small_weights)
    ckpt = (moved / "checkpoint.pt").read_bytes()
    (moved / "checkpoint.pt").write_bytes(ckpt[:len(ckpt) // 2])
    one_line_error(run("train.py", *FAST, "--model", small_weights, "--out", str(moved),
                       "--resume"), "cannot continue")
    (moved / "checkpoint.pt").write_bytes(ckpt)
    finished = run("train.py", *FAST, "--model", small_weights, "--out", str(moved), "--resume")
    assert finished.returncode == 0, finished.stderr
    results = json.loads((moved / "results.json").read_text())
    assert len(results["acc"]) == 2 and results["environment"]["torch"] == torch.__version__


def test_a_nan_loss_stops_with_one_line(small_weights, tmp_path):
    """A loss that becomes NaN stops the run before the task is merged or saved."""
    out = run("train.py", *FAST, "--model", small_weights, "--out", str(tmp_path), "--lr", "1e30")
    one_line_error(out, "the loss became", "lower --lr")
    assert not (tmp_path / "checkpoint.pt").exists()


def test_quick_start_then_mtil_without_data(tmp_path):
    """After the quick start, the next command without data names the missing data first."""
    out = run_script("train.py", "--setting", "mtil", "--shots", "5", "--data-dir",
                     str(tmp_path / "data"), cwd=tmp_path)
    one_line_error(out, "aircraft", "expected", "--download")
    assert not (tmp_path / "out").exists()
    np.testing.assert_equal(os.listdir(tmp_path), [])


# --- issue 28: a read-only checkout, flags named one by one, Ctrl-C and --resume

def test_ship_into_a_read_only_assets_stops_before_pretraining(tmp_path, monkeypatch):
    """tiny_world.py --ship whose assets/ cannot take a file (here /proc/self) says so in one line
    before the 22-minute pretraining starts (which would build a CLIP first)."""
    shutil.copy(os.path.join(ROOT, "tiny_world.py"), tmp_path)
    os.symlink("/proc/self", tmp_path / "assets")

    def pretraining(**config):
        raise AssertionError("the pretraining started")
    monkeypatch.setattr(clip_model, "CLIP", pretraining)
    one_line_error(run(str(tmp_path / "tiny_world.py"), "--ship"), "cannot write",
                   str(tmp_path / "assets" / "tiny_clip.pt"))


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--lr", "nan"), ("--kappa-max", "-1"),
                                         ("--weight-decay", "nan"), ("--dense-ratio", "2")])
def test_a_bad_value_names_its_flag_alone(flag, value, tmp_path):
    """--lr inf, --kappa-max -1, ...: the line names that flag and value, no other flag."""
    out = run("train.py", *FAST, "--out", str(tmp_path / "out"), flag, value)
    one_line_error(out, f"{flag} {value}")
    others = {"--lr", "--kappa-max", "--weight-decay", "--dense-ratio"} - {flag}
    assert not [f for f in others if f in out.stderr], out.stderr


def interrupt_at_step(monkeypatch, step):
    """Make the `step`-th loss of a run (1 = the first task's first) come with a Ctrl-C."""
    calls, loss = [], loop.contrastive_loss

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signal.SIGINT)
        return loss(*args, **kwargs)
    monkeypatch.setattr(loop, "contrastive_loss", interrupted)


ONE = [*FAST, "--datasets", "shapes", "--holdout", "none", "--routing", "none", "--no-zero-shot"]


def test_ctrl_c_in_the_first_task_says_nothing_was_saved(small_weights, tmp_path, monkeypatch):
    """Ctrl-C before any task is finished says so and to start again, not to --resume."""
    interrupt_at_step(monkeypatch, 1)
    out = run("train.py", *ONE, "--model", small_weights, "--out", str(tmp_path))
    said = " ".join(out.stderr.split())
    assert out.returncode == 1 and "interrupted" in said and "no finished task" in said, said
    assert "--resume" not in said and "checkpoint.pt" not in os.listdir(tmp_path)


def test_resume_takes_model_tiny_as_the_tiny_default(tmp_path):
    """A tiny run made without --model (the shipped tiny CLIP) resumes with --model tiny."""
    argv = [*ONE, "--out", str(tmp_path)]
    assert run("train.py", *argv).returncode == 0
    os.remove(tmp_path / "results.json")  # as if killed after the checkpoint
    done = run("train.py", *argv, "--model", "tiny", "--resume")
    assert done.returncode == 0 and "resuming after task 1/1" in done.stdout, done.stderr


def test_resume_of_a_finished_run_leaves_its_files(small_weights, tmp_path):
    """--resume of a finished run says it is finished and rewrites nothing."""
    argv = [*ONE, "--model", small_weights, "--out", str(tmp_path)]
    assert run("train.py", *argv).returncode == 0
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    out = run("train.py", *argv, "--resume")
    assert out.returncode == 0 and "finished" in out.stderr, out.stderr
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before


@pytest.mark.parametrize("flags, words", [
    (["--datasets", ""], ["--datasets ''", "none empty"]),
    (["--datasets", "shapes,,digits"], ["none empty"]),
    (["--datasets", "shapes,digits", "--holdout", "digits"], ["--holdout digits", "trains it"])])
def test_an_empty_dataset_list_or_a_trained_holdout_is_named(flags, words, tmp_path):
    """--datasets '' (or an empty name in the list) and a --holdout the run trains: one line
    naming the flag and what is wrong."""
    one_line_error(run("eval.py", "--out", str(tmp_path), *flags), *words)
