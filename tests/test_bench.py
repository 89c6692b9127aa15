"""The dry run of bench.py: train.py end to end on a synthetic MTIL in its real on-disk layout,
at a tiny scale (one image per class and split, two steps a task, a one-block CLIP)."""
import json

import pytest

import data
import dryrun
from conftest import run_script

PHASES = ["test-image cache build", "set-up: indexing 11 datasets", "set-up: weights",
          "earlier tasks' class text", "training steps (11 x 2 x 8 images)",
          "training: inject, analysis, merge", "evaluation: class text features",
          "evaluation: test images", "checkpoint writes", "train.py's start", "total",
          "PROJECTION, not a measurement"]


def test_mtil_dry_run_times_every_phase(tmp_path, monkeypatch):
    """Every phase is in the table, projected, and the run's results.json has MTIL's 11 datasets
    with their real class counts. Its JPEGs are 8 x 8 pixels: decoding the real sizes takes
    minutes, and no assertion reads a time."""
    monkeypatch.setattr(dryrun, "PIXELS", {})
    out = run_script("bench.py", "--sequence", "mtil", "--scale", "0.0001", "--model-size",
                     "micro", "--iterations", "2", "--batch-size", "8", "--workers", "0",
                     "--device", "cpu", "--root", str(tmp_path), "--out", str(tmp_path / "run"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    table = out.stdout.split("dry run of train.py --setting mtil", 1)[1]
    assert all(phase in table for phase in PHASES), [p for p in PHASES if p not in table]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    real = data.BENCHMARKS["mtil"]["datasets"]
    sizes = data.SIZES[data.BENCHMARKS["mtil"]["layout"]]
    assert res["datasets"] == list(real) and res["classes"] == [sizes[n][0] for n in real]
    assert len(res["acc"]) == 11 and all(len(row) == 11 for row in res["acc"])
    assert "written once" in table and (tmp_path / "mtil-0.0001" / "data" / "SUN397").is_dir()


@pytest.mark.parametrize("scale", ["nan", "0"])
def test_a_scale_outside_0_1_is_one_error_line(scale, tmp_path):
    """--scale nan or 0 stops the dry run with one `error:` line naming --scale, before writing
    anything."""
    out = run_script("bench.py", "--sequence", "mtil", "--scale", scale, "--device", "cpu",
                     "--root", str(tmp_path))
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert len(errors) == 1 and "--scale must lie in (0, 1]" in errors[0], out.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--iters", "--batch-size", "--classes", "--test-images"])
def test_a_zero_in_the_speed_table_is_refused(flag):
    """--iters 0 (or 0 for any size of the speed table) is one error line, not the default."""
    out = run_script("bench.py", "--model-size", "tiny", "--device", "cpu", "--iters", "1",
                     "--batch-size", "1", "--classes", "1", "--test-images", "1", flag, "0")
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert out.returncode == 2 and len(errors) == 1 and flag in errors[0], out.stderr
    assert "Traceback" not in out.stderr
