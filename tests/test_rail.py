"""RAIL's heads and fusion (rail.py) against closed forms written out here, and train.py's --head
and --method frozen on the tiny world: the rows it writes, what frozen leaves alone, resume."""
import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

import rail
from conftest import ROOT, run_script
from test_train import FAST, kill_after_first_task, run


def tasks(sizes=((20, 3), (12, 5), (15, 9)), dim=8, seed=0):
    """Three tasks of normalised float64 features, their classes growing: (x, labels, classes)."""
    g, first, out = torch.Generator().manual_seed(seed), 0, []
    for n, classes in sizes:
        x = F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1)
        out.append((x, torch.randint(first, classes, (n,), generator=g), classes))
        first = classes
    return out


def one_hot_all(data):
    """Y of all tasks at once: rows one-hot over the last task's classes (later columns 0)."""
    return torch.cat([torch.eye(data[-1][2], dtype=torch.float64)[y] for _, y, _ in data])


def test_primal_equals_the_joint_ridge_solve():
    """Three tasks added one by one give the scores of (Phi^T Phi + lam I)^-1 Phi^T Y solved on all
    the tasks at once, in float64, to a relative 1e-8."""
    data, probe = tasks(), tasks(((7, 9),), seed=1)[0][0]
    head = rail.Primal(8, width=40, lam=0.1)
    for x, y, classes in data:
        head.add(x, y, classes)
        assert head.scores(probe).shape == (7, classes)
    W = head.expand  # (D, d): the draw is the head's; the solve below is this test's
    phi = torch.relu(torch.cat([x for x, _, _ in data]) @ W.T)
    H = torch.linalg.solve(phi.T @ phi + 0.1 * torch.eye(40, dtype=torch.float64),
                           phi.T @ one_hot_all(data))
    expected = torch.relu(probe @ W.T) @ H
    assert torch.allclose(head.scores(probe), expected, rtol=1e-8, atol=0)


def test_primal_does_not_depend_on_the_order_of_adding():
    """The same data added in another order and split (same classes) gives the same scores."""
    (x1, y1, c1), (x2, y2, c2), _ = tasks()
    probe = tasks(((5, 9),), seed=2)[0][0]
    one, other = rail.Primal(8, width=40), rail.Primal(8, width=40)
    one.add(x1, y1, c1)
    one.add(x2, y2, c2)
    other.add(x1[10:], y1[10:], c2)  # the first task's second half, already as wide as task 2
    other.add(x2.flip(0), y2.flip(0), c2)
    other.add(x1[:10], y1[:10], c2)
    assert torch.allclose(one.scores(probe), other.scores(probe), rtol=1e-9, atol=1e-12)


def test_dual_equals_a_direct_kernel_ridge_solve():
    """The dual's scores are k(x, X) (K + lam I)^-1 Y with K_ij = exp(-gamma |x_i - x_j|^2) over
    every feature added, written out here with explicit differences, to a relative 1e-8."""
    data, probe = tasks(), tasks(((6, 9),), seed=3)[0][0]
    head = rail.Dual(gamma=0.1, lam=1e-3)
    for x, y, classes in data:
        head.add(x, y, classes)
    X = torch.cat([x for x, _, _ in data])

    def k(a, b):
        return torch.exp(-0.1 * ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    alpha = torch.linalg.solve(k(X, X) + 1e-3 * torch.eye(len(X), dtype=torch.float64),
                               one_hot_all(data))
    assert torch.allclose(head.scores(probe), k(probe, X) @ alpha, rtol=1e-8, atol=0)


def test_fuse_mixes_only_rows_whose_zero_shot_top1_is_learned():
    """Two of four classes learned, beta 0.8: a row whose zero-shot top-1 is learned becomes
    0.2 p + 0.8 [s, 0, 0]; a row whose top-1 is not stays the softmax p. By hand."""
    p = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.1, 0.6, 0.2, 0.1]])
    s = torch.tensor([[1.0, -0.5], [3.0, 3.0], [0.0, 0.25]])
    expected = torch.tensor([[0.9, -0.36, 0.04, 0.02], [0.1, 0.2, 0.3, 0.4],
                             [0.02, 0.32, 0.04, 0.02]])
    fused = rail.fuse(p.log() + 7.0, s, n_seen=2)  # logits: softmax gives p back
    assert torch.allclose(fused, expected, atol=1e-6)
    assert torch.allclose(rail.fuse(p.log(), s[:, :0], n_seen=0), p, atol=1e-6)  # none learned


def test_the_expansion_is_drawn_from_its_seed_alone():
    """W depends on the seed only (not on the global RNG), within +-1/sqrt(d), spread over it."""
    first = rail.Primal(16, width=300, seed=3).expand
    torch.rand(1000)  # what other code draws from the global RNG
    assert torch.equal(rail.Primal(16, width=300, seed=3).expand, first)
    assert not torch.equal(rail.Primal(16, width=300, seed=4).expand, first)
    assert first.abs().max() <= 0.25 and first.min() < -0.24 and first.max() > 0.24
    assert abs(float(first.mean())) < 0.01


@pytest.mark.parametrize("make", [lambda: rail.Primal(8, width=0), lambda: rail.Primal(8, lam=-1),
                                  lambda: rail.Dual(gamma=math.nan), lambda: rail.Dual(gamma=0),
                                  lambda: rail.Dual(gamma=math.inf)])
def test_widths_gammas_and_ridges_must_be_finite_and_positive(make):
    """A width, gamma or ridge that is zero, negative, NaN or infinite is refused."""
    with pytest.raises(ValueError, match="finite and > 0"):
        make()


def test_a_singular_system_says_so_in_one_line(capsys):
    """Two equal features and a ridge lost in rounding: Cholesky fails; one line on stderr names
    --rail-width, and the pseudo-inverse gives both the same score."""
    head = rail.Dual(lam=1e-300)
    x = F.normalize(torch.ones(2, 4, dtype=torch.float64), dim=-1)
    head.add(x, torch.tensor([0, 1]), 2)
    scores = head.scores(x)
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "singular" in err and "--rail-width" in err
    assert torch.allclose(scores, torch.full((2, 2), 0.5, dtype=torch.float64))


# --- train.py --head, --method frozen
def test_head_writes_its_rows(small_weights, tmp_path):
    """--head rail-primal writes rail.variant, a T x T rail.acc and its metrics, and prints them."""
    out = run(*FAST, "--datasets", "shapes,digits", "--routing", "none", "--head",
              "rail-primal", "--model", small_weights, "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    res = json.loads((tmp_path / "results.json").read_text())["rail"]
    assert res["variant"] == "rail-primal" and [len(row) for row in res["acc"]] == [2, 2]
    assert set(res["metrics"]) == {"transfer", "average", "last"}
    assert res["metrics"]["last"]["per_dataset"] == res["acc"][-1]
    assert "with RAIL's head (rail-primal)" in out.stdout


def test_frozen_trains_nothing_and_the_head_learns(tmp_path):
    """--method frozen --head rail-primal on the tiny CLIP: every row of the matrix is the
    zero-shot row, the fused rows end above it (the head learned something), and with one model
    there is nothing to route: no second rows unless --routing asks."""
    out = run("--method", "frozen", "--head", "rail-primal", "--datasets", "shapes,digits",
              "--holdout", "none", "--workers", "0", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["args"]["routing"] == "none" and res["routed"] == {} and "routed" not in out.stdout
    assert all(row == res["zero_shot"] for row in res["acc"]) and len(res["acc"]) == 2
    zero_shot = sum(res["zero_shot"]) / 2
    assert res["rail"]["metrics"]["last"]["mean"] > zero_shot + 5


def test_frozen_without_a_head_is_refused(tmp_path):
    """--method frozen alone would only repeat the zero-shot row: one line points to eval.py."""
    out = run(*FAST, "--method", "frozen", "--out", str(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--head" in out.stderr and "eval.py" in out.stderr and out.stderr.count("\n") == 1


def test_resume_gives_the_same_rail_rows(small_weights, tmp_path):
    """A --head rail-dual run killed after its first task and resumed ends with the rail rows of
    a run never interrupted, to the bit."""
    argv = [*FAST, "--datasets", "shapes,digits", "--routing", "none", "--holdout", "none",
            "--head", "rail-dual", "--model", small_weights]
    assert run(*argv, "--out", str(tmp_path / "whole")).returncode == 0
    assert kill_after_first_task(*argv, out=tmp_path / "cut") == 1
    done = run(*argv, "--out", str(tmp_path / "cut"), "--resume")
    assert done.returncode == 0, done.stderr
    whole, cut = (json.loads((tmp_path / f / "results.json").read_text())["rail"]
                  for f in ("whole", "cut"))
    assert cut == whole


def test_every_rail_row_of_the_readme_parses(tmp_path):
    """Each README row naming RAIL is a train.py command whose flags parse, with --head rail-dual
    too: it stops at the missing data (status 1), not at its flags (status 2); --help shows them."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    commands = re.findall(r"^\|[^|]*RAIL[^|]*\| `python train\.py ([^`]*)`", readme, re.M)
    assert len(commands) >= 3
    for command in commands + [c.replace("rail-primal", "rail-dual") for c in commands]:
        done = run_script("train.py", *command.split(), "--data-dir", str(tmp_path / "none"),
                          cwd=str(tmp_path))
        assert done.returncode == 1 and "error:" in done.stderr, (command, done.stderr)
    shown = run_script("train.py", "--help").stdout
    assert all(flag in shown for flag in ("--head", "--rail-width", "frozen"))
