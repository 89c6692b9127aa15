"""compare.py: choices refused before any run; the table, the operating point and the figure."""
import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch

from conftest import CACHE

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compare(*argv):
    return subprocess.run([sys.executable, os.path.join(HERE, "compare.py"), *argv], cwd=HERE,
                          capture_output=True, text=True, timeout=600)


def test_a_method_it_cannot_run_is_refused_before_any_run(tmp_path):
    """--methods foo and --seeds x give one line and start no train.py."""
    for flags in (["--methods", "codyra,foo"], ["--seeds", "0,x"]):
        out = compare(*flags, "--out", str(tmp_path))
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and "error:" in out.stderr
        assert not os.listdir(tmp_path)


def test_two_methods_print_the_operating_point_and_plot(tmp_path):
    """Two runs of two tiny tasks long enough to prune ranks and to forget: the operating point's
    "here" column is what the two results.json and saved updates give, worked out in the test
    (forgetting: acc[0][0] - acc[1][0], the first task right after it against the end); a PNG."""
    png = tmp_path / "curves.png"
    out = compare("--methods", "codyra,lora", "--seeds", "8", "--out", str(tmp_path),
                  "--plot", str(png), "--", "--model", "tiny", "--datasets", "shapes,digits",
                  "--iterations", "20", "--batch-size", "16", "--rank", "4", "--dense-ratio",
                  "0.25", "--kappa-max", "0.04", "--lr", "5e-3", "--workers", "0", "--holdout",
                  "none", "--routing", "none", "--cache-dir", CACHE)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line[66:].strip() for line in lines if line.split() == ["paper", "here"]] == ["here"]
    here = {line[:44].strip(): line[66:].split() for line in lines}  # the run's column
    res, kept, norm = {}, {}, {}
    for method in ("codyra", "lora"):
        run = tmp_path / f"{method}-seed8"
        res[method] = json.loads((run / "results.json").read_text())
        updates = [torch.load(run / f"factors-task{t}.pt") for t in (1, 2)]
        kept[method] = statistics.mean(  # per task: the ranks its update keeps, per matrix
            statistics.mean(A.shape[0] for _, A in u.values()) for u in updates)
        norm[method] = statistics.mean(  # per task: ||dW||_F over all its matrices
            math.hypot(*(float((B @ A).norm()) for B, A in u.values())) for u in updates)
    assert kept["lora"] == 4 and 0 < kept["codyra"] < 4  # ranks were pruned
    forgot = {m: r["acc"][0][0] - r["acc"][1][0] for m, r in res.items()}
    assert forgot["lora"] != 0 and res["codyra"]["acc"][1][0] != res["codyra"]["acc"][1][1]
    cell = here["mean ranks kept of 16"]
    assert cell[1:] == ["±", "0.0"] and float(cell[0]) == pytest.approx(kept["codyra"], abs=0.051)
    ratio, a, _, b = here["forgetting, codyra / lora"]
    assert float(a[1:]) == pytest.approx(forgot["codyra"], abs=0.0051)
    assert float(b[:-1]) == pytest.approx(forgot["lora"], abs=0.0051)
    assert float(ratio) == pytest.approx(forgot["codyra"] / forgot["lora"], abs=0.0051)
    ratio, a, _, b = here["per-task ||dW||_F, codyra / lora"]
    assert float(a[1:]) == pytest.approx(norm["codyra"], abs=0.0051)
    assert float(b[:-1]) == pytest.approx(norm["lora"], abs=0.0051)
    for method, r in res.items():  # the last row's mean against the zero-shot row's
        gain = statistics.mean(r["acc"][-1]) - statistics.mean(r["zero_shot"])
        cell = here[f"Last minus zero-shot, {method}"]
        assert float(cell[0]) == pytest.approx(gain, abs=0.051) and cell[1:] == ["±", "0.0"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_single_task_prints_dashes_for_what_it_lacks(small_weights, tmp_path):
    """One task has no Transfer and no forgetting: '-' there, the table still ends (was a crash)."""
    out = compare("--methods", "codyra", "--seeds", "0", "--out", str(tmp_path), "--",
                  "--model", small_weights, "--datasets", "shapes", "--iterations", "2",
                  "--batch-size", "4", "--rank", "2", "--workers", "0", "--holdout", "none",
                  "--routing", "none", "--cache-dir", CACHE)
    assert out.returncode == 0, out.stderr
    lines = {line[:44].strip(): line[44:].split() for line in out.stdout.splitlines()}
    assert lines["Transfer minus zero-shot, codyra"] == ["+0.8", "-"]
    assert lines["forgetting, codyra / lora"][-1] == "-"
