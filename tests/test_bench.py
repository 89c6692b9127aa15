"""bench.py: the speed table on a one-block CLIP, with a clock the test sets; the dry run,
train.py end to end on a synthetic MTIL in its real on-disk layout, at a tiny scale (one image
per class and split, two steps a task, a one-block CLIP); its projection on fixed timings."""
import json
import tempfile

import pytest

import data
import dryrun
import eval as evaluation
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


def test_speed_table_reports_what_it_timed(tmp_path, monkeypatch):
    """Every row of the speed table (CPU: fp32 rows, no compile) does its work under a clock that
    returns 2 s, 3 s, 5 s, ... (primes: no time is another's multiple): its ms/call is a clocked
    time / the calls timed, items/s = items / that, peak MB the clock's, and vs plain its
    group's first row's time / its own."""
    primes, clocked = (p for p in range(2, 1000) if all(p % d for d in range(2, p))), []

    def clock(fn, cuda, host=False):  # (fn(), seconds, peak MB), as dryrun.clock
        clocked.append(float(next(primes)))
        return fn(), clocked[-1], 3 * clocked[-1]
    monkeypatch.setattr(dryrun, "clock", clock)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # its JPEGs and cache go there
    B, iters, C, N = 2, 2, 3, 3
    out = run_script("bench.py", "--model-size", "micro", "--device", "cpu", "--batch-size", B,
                     "--iters", iters, "--classes", C, "--test-images", N, "--workers", "0")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    lines = out.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if "items/s" in line)
    assert lines[header].split() == ["path", "items/s", "ms/call", "peak", "MB", "vs", "plain"]
    table = lines[header + 1:lines.index(next(x for x in lines if x.startswith("items:")))]
    groups = {"training, rank 16": (B, iters), f"evaluation, {N} JPEGs": (N, 1),
              f"text tower, {C} prompts": (C, iters), "image inference": (B, iters)}
    assert [line[:36].strip() for line in table if line[:36].strip()] == [
        "training, rank 16, all placements", f"evaluation, {N} JPEGs 500x375",
        f"text tower, {C} prompts", "image inference"]
    assert len(table) == 10  # 2 training, 2 evaluation + the cache build, 2 text, 3 inference
    for line in table:
        if line[:36].strip():
            (items, n), plain = next(v for k, v in groups.items() if line.startswith(k)), None
        rate, ms, mb, *ratio = line[76:].split()
        s = float(ms) / 1000
        once = "building the cache" in line
        assert s * (1 if once else n) in clocked and float(mb) == 3 * s * (1 if once else n)
        assert float(rate) == pytest.approx(items / s, abs=0.05)
        plain = plain or s
        assert ratio == ([] if once else [f"{plain / s:.2f}x"]), line
    assert lines[-1].endswith("Cut and 77-token text features equal: True")


def test_dry_run_projection_on_fixed_timings(tmp_path, capsys):
    """dryrun.report on made-up timings of 11 one-image tasks: its measured total is train.py's
    wall time plus the cache build, and the projection scales each counted row by real count /
    count (all of MTIL's test images and files, 500 steps of 64), hand computed here."""
    T, per = 11, dict(text=0.5, steps=2.0, train=3.0, eval_text=0.25, eval=1.25, routing=0.1,
                      checkpoint=0.2)
    names = list(data.BENCHMARKS["mtil"]["datasets"])
    tasks = [data.Task(name, ["x"], ["{}"], [0], [0]) for name in names]  # 1 train, 1 test image
    res = {"setting": "mtil", "datasets": names, "classes": [1] * T, "seconds": [per] * T,
           "setup_seconds": 4.0, "zero_shot_seconds": 1.0,
           "args": {"iterations": 2, "batch_size": 8},
           "metrics": evaluation.compute_metrics([[0.0] * T] * T)}
    (tmp_path / "checkpoint.pt").write_bytes(bytes(2**20))
    dryrun.report(res, tasks, {"index": (0.5, 50.0), "cache": (2.0, 100.0)}, 66.5, tmp_path,
                  False)
    real = [data.SIZES[data.BENCHMARKS["mtil"]["layout"]][n] for n in names]  # (C, train, test)
    real_test, real_files = sum(te for *_, te in real), sum(tr + te for _, tr, te in real)
    start = 66.5 - 4.0 - 1.0 - T * (0.5 + 3.0 + 1.25 + 0.1 + 0.2)  # train.py's unaccounted time
    projected = (2.0 * real_test / 11 + 0.5 * real_files / 22  # cache build, indexing
                 + (4.0 - 0.5) + T * 0.5  # the rest of the set-up, earlier tasks' text
                 + T * 2.0 * (500 * 64) / (2 * 8)  # training steps: 500 of 64, not 2 of 8
                 + T * (3.0 - 2.0) + T * 0.25  # inject, analysis, merge; class text
                 + T * (1.25 - 0.25) * real_test / 11  # test images
                 + 1.0 * real_test / 11 + T * 0.1 + T * 0.2 + start)  # zero-shot, routing, ckpt
    lines = capsys.readouterr().out.splitlines()
    total = next(line for line in lines if line.startswith("total")).split()
    assert float(total[1]) == pytest.approx(66.5 + 2.0) and float(total[2]) == round(projected)
    steps = next(line for line in lines if line.startswith("training steps")).split()[-8:]
    assert steps[:3] == [f"{T * 2 * 8}", f"{T * 2.0:.1f}", "8"]  # count, seconds, per second
    assert steps[5:7] == [f"{T * 500 * 64:,}", f"{T * 2.0 * 2000:.0f}"]  # real count, projected
    assert f"would take {projected / 60:.1f} min" in "\n".join(lines)


@pytest.mark.parametrize("flag", ["--iters", "--batch-size", "--classes", "--test-images"])
def test_a_zero_in_the_speed_table_is_refused(flag):
    """--iters 0 (or 0 for any size of the speed table) is one error line, not the default."""
    out = run_script("bench.py", "--model-size", "tiny", "--device", "cpu", "--iters", "1",
                     "--batch-size", "1", "--classes", "1", "--test-images", "1", flag, "0")
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert out.returncode == 2 and len(errors) == 1 and flag in errors[0], out.stderr
    assert "Traceback" not in out.stderr
