import ast
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import codyra
from conftest import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a tiny random CLIP stands in for the pretrained one: these tests check the machinery, not accuracy
FAST = ["--setting", "tiny", "--iterations", "3", "--batch-size", "8", "--rank", "2",
        "--workers", "0", "--eval-batch-size", "64"]


def run(*argv):
    return run_script("train.py", *argv)


def kill_after_first_task(*argv, out):
    """Start train.py into `out`, SIGKILL it once a task's results are written; returns how many
    tasks it had finished."""
    proc = subprocess.Popen([sys.executable, "train.py", *argv, "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (out / "results.json").exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return len(json.loads((out / "results.json").read_text())["acc"])


def test_tiny_run_end_to_end(small_weights, tmp_path):
    """train.py walks the whole tiny sequence and writes a complete results.json."""
    out = run(*FAST, "--model", small_weights, "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    res = json.loads((tmp_path / "results.json").read_text())
    T = len(res["datasets"])
    assert T >= 5 and len(res["acc"]) == T and all(len(row) == T for row in res["acc"])
    assert all(0.0 <= a <= 100.0 for row in res["acc"] for a in row)
    assert set(res["metrics"]) == {"transfer", "average", "last"}
    assert "Transfer" in out.stdout and "Last" in out.stdout


def test_existing_results_are_not_overwritten(small_weights, tmp_path):
    """A second run into a folder holding results is refused with one line, unless asked."""
    (tmp_path / "results.json").write_text("{}")
    out = run(*FAST, "--model", small_weights, "--out", str(tmp_path))
    assert out.returncode != 0 and "--overwrite" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("flags", [["--shots", "0"], ["--rank", "0"], ["--dense-ratio", "1.5"],
                                   ["--datasets", "nosuchset"], ["--layers", "q,nosuch"],
                                   ["--prompts", "photo"], ["--layout", "coop"]])
def test_impossible_flags_are_refused(flags, tmp_path):
    """Impossible flag values stop argparse with a one-line message and no traceback."""
    out = run(*FAST, *flags, "--out", str(tmp_path))
    assert out.returncode == 2 and "error:" in out.stderr and "Traceback" not in out.stderr


def test_precision_fp32_on_cpu_is_the_default_path(small_weights, tmp_path):
    """--precision fp32 on a CPU gives the accuracy matrix of a run without the flag, to the bit;
    --precision bf16 on a CPU is refused in one line."""
    for out, flags in (("default", []), ("fp32", ["--precision", "fp32"])):
        done = run(*FAST, "--model", small_weights, "--out", str(tmp_path / out), *flags)
        assert done.returncode == 0 and "device: cpu (fp32 weights)" in done.stdout, done.stderr
    default, fp32 = (json.loads((tmp_path / out / "results.json").read_text())["acc"]
                     for out in ("default", "fp32"))
    assert default == fp32
    out = run(*FAST, "--device", "cpu", "--precision", "bf16", "--out", str(tmp_path / "bf16"))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip() == "error: --precision bf16 needs CUDA; on cpu, use --precision fp32"


def test_resume_after_kill_gives_the_same_matrix(small_weights, tmp_path):
    """Killing a run after a task and resuming it gives the matrix of a run never interrupted."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run(*FAST, "--model", small_weights, "--out", str(whole)).returncode == 0
    finished = kill_after_first_task(*FAST, "--model", small_weights, out=cut)
    total = len(json.loads((whole / "results.json").read_text())["acc"])
    assert 1 <= finished < total, "the run was not interrupted mid-sequence"
    other = run(*FAST, "--model", small_weights, "--out", str(cut), "--resume", "--seed", "9")
    assert other.returncode == 2 and "--seed" in other.stderr, \
        "resuming with another seed must be refused"
    out = run(*FAST, "--model", small_weights, "--out", str(cut), "--resume")
    assert out.returncode == 0, out.stderr
    assert (json.loads((cut / "results.json").read_text())["acc"]
            == json.loads((whole / "results.json").read_text())["acc"])


def test_eval_script_writes_one_row(small_weights, tmp_path):
    """eval.py evaluates a model on every dataset of a setting and writes a one-row results.json."""
    out = run_script("eval.py", "--setting", "tiny", "--model", small_weights, "--workers", "0",
                     "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    res = json.loads((tmp_path / "results.json").read_text())
    assert len(res["acc"]) == 1 and len(res["acc"][0]) == len(res["datasets"]) >= 5


def test_zero_shot_row_comes_first_and_equals_eval_py(small_weights, tmp_path):
    """Every run records the model before its first task as the zero-shot row, which is what
    eval.py gives for the same model."""
    argv = ["--setting", "tiny", "--datasets", "shapes,digits", "--model", small_weights,
            "--workers", "0"]
    trained = run(*FAST[2:], *argv, "--out", str(tmp_path / "train"))
    assert trained.returncode == 0, trained.stderr
    evaluated = run_script("eval.py", *argv, "--out", str(tmp_path / "eval"))
    assert evaluated.returncode == 0, evaluated.stderr
    res = json.loads((tmp_path / "train" / "results.json").read_text())
    row = json.loads((tmp_path / "eval" / "results.json").read_text())["acc"][0]
    assert res["zero_shot"] == row and len(res["acc"]) == 2
    assert res["zero_shot_metrics"]["last"]["mean"] == sum(row) / 2
    assert trained.stdout.index("zero-shot") < trained.stdout.index("task 1/")


def recipes():
    """train.RECIPES, read from the script's source (nothing imports a script)."""
    tree = ast.parse(open(os.path.join(ROOT, "train.py")).read())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "RECIPES")
    return eval(compile(ast.Expression(node.value), "train.py", "eval"), {"dict": dict})


def test_the_tiny_recipe_selects_ranks_as_x_tail_does():
    """The tiny recipe's sum of tau over a task is X-TAIL's within 2%, and kappa_max / lr is
    X-TAIL's 10 within 20%: the paper's operating point of the rank selection."""
    def tau_sum(r):
        return sum(codyra.threshold_schedule(i, r["iterations"], r["dense_ratio"], r["kappa_max"])
                   for i in range(r["iterations"]))
    tiny, xtail = recipes()["tiny"], recipes()["xtail"]
    assert tau_sum(xtail) == pytest.approx(0.65, abs=0.005)
    assert tau_sum(tiny) == pytest.approx(tau_sum(xtail), rel=0.02)
    assert xtail["kappa_max"] / xtail["lr"] == pytest.approx(10)
    assert tiny["kappa_max"] / tiny["lr"] == pytest.approx(10, rel=0.2)


def test_a_resumed_run_never_records_its_trained_model_as_zero_shot(small_weights, tmp_path):
    """A run made with --no-zero-shot and resumed without the flag has no zero-shot row: the
    pretrained weights are gone once a task is done."""
    argv = [*FAST, "--datasets", "shapes", "--routing", "none", "--holdout", "none",
            "--model", small_weights, "--out", str(tmp_path)]
    assert run(*argv, "--no-zero-shot").returncode == 0
    done = run(*argv, "--resume")
    assert done.returncode == 0, done.stderr
    assert "zero_shot" not in json.loads((tmp_path / "results.json").read_text())
