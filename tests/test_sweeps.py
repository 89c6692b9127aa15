"""Sweeps: compare.py's runs at once on several devices, its commands for a cluster, the flags it
keeps for itself, and caches that two runs may fill at the same time."""
import hashlib
import json
import multiprocessing
import os
import shlex
import signal
import subprocess
import sys
import time
import types
from unittest import mock

import numpy as np
import torch
from PIL import Image

import clip_model
import data
from conftest import run_script

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compare(*argv, env=None):
    return subprocess.run([sys.executable, os.path.join(HERE, "compare.py"), *argv], cwd=HERE,
                          capture_output=True, text=True, timeout=600, env=env)


def tiny(weights, datasets="shapes,digits"):  # train.py flags of the smallest meaningful run
    return ["--model", weights, "--datasets", datasets, "--iterations", "2", "--batch-size", "4",
            "--rank", "2", "--workers", "0", "--holdout", "none", "--routing", "none"]


def by_hand(commands):
    """Printed train.py commands run one after another (in this process: no new interpreter),
    on one thread as compare.py's runs are given here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for line in commands:
            assert run_script("train.py", *shlex.split(line)[2:]).returncode == 0
    finally:
        torch.set_num_threads(threads)


def numbers(out, run):  # what a run computed, timings and how it ran aside
    r = json.load(open(os.path.join(out, run, "results.json")))
    return {k: r[k] for k in ("acc", "analysis", "metrics", "zero_shot", "zero_shot_metrics")}


def test_two_devices_run_at_once_and_print_the_sequential_table(small_weights, tmp_path):
    """--devices cpu,cpu: both runs live at the same time, each logged in its folder, and the
    table and every number of results.json are those of the same runs one after the other."""
    grid = ["--methods", "codyra,lora", "--seeds", "0"]
    one = ["--out", str(tmp_path / "one"), "--", *tiny(small_weights)]
    by_hand(compare(*grid, "--commands", *one).stdout.splitlines())
    one = compare(*grid, *one)
    two = compare(*grid, "--devices", "cpu,cpu", "--out", str(tmp_path / "two"), "--",
                  *tiny(small_weights), env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    events = [line.split()[1] for line in two.stdout.split("\n\n")[0].splitlines()]
    assert events == ["started", "started", "finished", "finished"]
    starts, ends = [], []
    for run in ("codyra-seed0", "lora-seed0"):
        log = tmp_path / "two" / run / "train.log"
        header = log.read_text().splitlines()[0].split()
        assert header[2:4] == ["$", sys.executable] and header[-2:] == ["--device", "cpu"]
        starts.append(time.mktime(time.strptime(" ".join(header[:2]), "%Y-%m-%d %H:%M:%S")))
        ends.append(os.path.getmtime(log))  # its last line: written when the run ended
        assert numbers(tmp_path / "one", run) == numbers(tmp_path / "two", run)
    assert max(starts) < min(ends) - 1  # one second: the start's own rounding
    assert one.stdout.startswith("\ntiny: mean") and one.stdout == two.stdout[-len(one.stdout):]


def test_commands_start_nothing_and_their_runs_are_read(small_weights, tmp_path):
    """--commands prints each run's train.py command and starts none; once they have run (here,
    by hand), the same compare.py starts nothing and prints the table."""
    grid = ["--methods", "codyra,lora", "--seeds", "3", "--out", str(tmp_path)]
    flags = tiny(small_weights, "shapes")
    printed = compare(*grid, "--commands", "--", *flags)
    assert printed.returncode == 0 and not os.listdir(tmp_path), printed.stderr
    expected = [[sys.executable, os.path.join(HERE, "train.py"), "--setting", "tiny",
                 "--data-dir", "data", "--method", m, "--seed", "3", "--out",
                 str(tmp_path / f"{m}-seed3"), "--overwrite", *flags] for m in ("codyra", "lora")]
    assert [shlex.split(line) for line in printed.stdout.splitlines()] == expected
    by_hand(printed.stdout.splitlines())
    after = compare(*grid, "--", *flags)
    assert after.returncode == 0 and after.stdout.startswith("\ntiny: mean"), after.stdout
    assert compare(*grid, "--commands", "--", *flags).stdout == ""  # nothing left to run


def test_compares_own_flags_after_dashes_are_refused(tmp_path):
    """--method, --seed, --out, --resume, --overwrite (or a prefix, or =value) after -- would
    mislabel a run: one line naming compare.py's flag, and no run."""
    for given, own in (["--method", "lora"], "--methods"), (["--seed=3"], "--seeds"), \
            (["--meth", "lora"], "--methods"), (["--out", "x"], "--out"), \
            (["--resume"], "--out"), (["--overwrite"], "--out"):
        out = compare("--methods", "codyra", "--seeds", "0", "--out", str(tmp_path), "--", *given,
                      "--iterations", "0")  # were it run, it would stop at once
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert f"use its own {own} " in out.stderr and not os.listdir(tmp_path)


def test_a_plot_into_a_missing_folder_is_refused_before_any_run(tmp_path):
    """--plot into a folder that does not exist: one line naming --plot, and no run starts."""
    out = compare("--methods", "codyra", "--seeds", "0", "--out", str(tmp_path / "runs"),
                  "--plot", str(tmp_path / "missing" / "curves.png"), "--", "--iterations", "0")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--plot" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_a_failed_run_is_reported_with_its_command_and_the_others_go_on(tmp_path):
    """Two runs that fail (here: a torch that will not import): each named with its exit status,
    its last line and its command; both are tried; compare.py exits 1."""
    (tmp_path / "torch.py").write_text("raise SystemExit('error: no torch here')\n")
    out = compare("--methods", "codyra,lora", "--seeds", "0", "--out", str(tmp_path / "runs"),
                  "--", "--iterations", "1", env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 1 and "2 run(s) failed" in out.stderr
    lines = out.stdout.splitlines()
    for m in ("codyra", "lora"):
        failed = lines.index(next(line for line in lines if f"failed {m} seed 0" in line))
        assert lines[failed].endswith("(exit 1, error: no torch here)")
        assert shlex.split(lines[failed + 1])[1:] == [
            sys.executable, os.path.join(HERE, "train.py"), "--setting", "tiny", "--data-dir",
            "data", "--method", m, "--seed", "0", "--out", str(tmp_path / "runs" / f"{m}-seed0"),
            "--overwrite", "--iterations", "1"]


def children(pid):
    """The processes whose parent is pid (Linux's /proc)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:  # ended meanwhile
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def test_killing_compare_stops_its_run(tmp_path):
    """`kill PID` of compare.py (SIGTERM) stops its train.py too, as Ctrl-C does."""
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "compare.py"), "--methods",
                             "codyra", "--seeds", "0", "--out", str(tmp_path)], cwd=HERE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (run := children(proc.pid)) and time.time() < deadline:
        time.sleep(0.1)
    assert run, "compare.py started no train.py"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0 and "interrupted" in proc.stderr.read()
    time.sleep(1)
    left = [p for p in run if os.path.exists(f"/proc/{p}")
            and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
    for p in left:  # what the test started, not left behind
        os.kill(p, signal.SIGKILL)
    assert not left, "train.py still runs after compare.py was killed"


def fill(images, cache, barrier, found):  # a process that fills the cache with another
    torch.set_num_threads(1)
    barrier.wait()
    found.put(hashlib.sha256(np.load(images.cached("pics", cache).path)).hexdigest())


def test_two_processes_fill_one_test_image_cache_at_once(tmp_path):
    """Two processes filling the same cache at the same moment both finish and read the same
    arrays as one process alone; no temporary file is left."""
    rng = np.random.default_rng(0)
    paths = [str(tmp_path / f"{i}.png") for i in range(96)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(path)
    images = data.ImageSet(paths, [i % 3 for i in range(96)], clip_model.preprocess(False, 32))
    fork = multiprocessing.get_context("fork")  # torch is imported already: seconds saved
    barrier, found = fork.Barrier(2), fork.Queue()
    writers = [fork.Process(target=fill, args=(images, str(tmp_path / "cache"), barrier, found))
               for _ in range(2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(120)
    assert [w.exitcode for w in writers] == [0, 0]
    alone = hashlib.sha256(np.load(images.cached("pics", str(tmp_path / "alone")).path))
    assert [found.get(), found.get()] == [alone.hexdigest()] * 2
    assert len(os.listdir(tmp_path / "cache")) == 1


def test_another_machines_write_to_a_shared_cache_is_left_alone(tmp_path):
    """A writer on another machine of a shared filesystem (its process unknown here) finishes
    its write of a test-image cache although this machine filled the same cache meanwhile."""
    images = data.ImageSet(np.zeros((2, 8, 8, 3), np.uint8), [0, 1], clip_model.preprocess(
        False, 16))
    path = images.cached("pics", str(tmp_path)).path
    os.remove(path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    with mock.patch("os.getpid", return_value=int(dead)), \
            mock.patch("os.uname", return_value=types.SimpleNamespace(  # a name that extends
                nodename=os.uname().nodename + "-b")):  # this one's: the hardest to tell apart
        theirs = clip_model.atomic(path)
        tmp = theirs.__enter__()
    open(tmp, "w").write("their copy")
    images.cached("pics", str(tmp_path))  # this machine's
    theirs.__exit__(None, None, None)  # their rename: the file they wrote is still there
    assert open(path).read() == "their copy" and os.listdir(tmp_path) == [os.path.basename(path)]
