import json
import math
import os
import sys

import pytest
import torch
import torch.nn as nn

import analysis
import clip_model
import codyra
from conftest import CACHE, run_script

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root


def adapter(W0, B, g, A):
    """A CoDyRALinear on weight W0 whose B, g, A are the given tensors."""
    base = nn.Linear(W0.shape[1], W0.shape[0])
    base.weight.data.copy_(W0)
    m = codyra.CoDyRALinear(base, len(g))
    for p, v in ((m.lora_B, B), (m.lora_g, g), (m.lora_A, A)):
        p.data.copy_(torch.as_tensor(v, dtype=torch.float32))
    return m


# W0 = diag(4, 3, 2, 1) and dW = 6 e3 e3^T + 8 e4 e4^T: the top singular vectors of dW are e4 (8)
# and e3 (6), so U^T W0 V = diag(1, 2) and the factor is ||dW||_F / ||diag(1, 2)||_F = 10 / sqrt(5).
W0 = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0]))
E = torch.eye(4)


def test_amplification_by_hand_from_adapter_factors():
    """Eq. 8 from adapter factors: 10/sqrt(5) at r = rank(dW) = 2; a pruned rank is ignored."""
    B = torch.stack([E[2], E[0], E[3]], 1)   # columns e3, e1, e4
    A = torch.stack([E[2], E[1], E[3]])      # rows e3, e2, e4
    u = analysis.adapter_update(adapter(W0, B, [6.0, 0.0, 8.0], A))
    assert u["rank"] == u["r"] == 2 and u["norm"] == pytest.approx(10.0)
    assert u["amp"] == pytest.approx(10 / math.sqrt(5))


def test_amplification_by_hand_from_full_matrices_and_top_r():
    """Eq. 8 from two full matrices: 10/sqrt(5) at r = rank; with r = 1 only e4 counts: 10 / 1."""
    dW = 6 * torch.outer(E[2], E[2]) + 8 * torch.outer(E[3], E[3])
    assert analysis.weight_update(W0, W0 + dW)["amp"] == pytest.approx(10 / math.sqrt(5), rel=1e-5)
    assert analysis.weight_update(W0, W0 + dW, r=1)["amp"] == pytest.approx(10.0, rel=1e-5)
    assert analysis.weight_update(W0, W0.clone()) == {"norm": 0.0, "rank": 0, "r": 0, "amp": None}


def test_amplification_is_one_along_the_weights_own_top_directions():
    """dW = the top-3 part of W0's own SVD has factor 1, in any rotated basis, by both paths."""
    torch.manual_seed(0)
    W = torch.randn(12, 7, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    B, A = U[:, :3] * S[:3], Vh[:3]
    Q = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]  # same subspace, another basis
    Uf, Sf, Vhf = analysis.low_rank_svd(B @ Q, Q.T @ A)
    assert analysis.amplification(W, Uf, Sf, Vhf, 3) == pytest.approx(1.0)
    full = analysis.weight_update(W.float(), (W + B @ A).float())
    assert full["amp"] == pytest.approx(1.0, rel=1e-4)


def test_low_rank_svd_matches_the_full_svd():
    """The QR route gives the singular values of B @ A and factors that rebuild it."""
    torch.manual_seed(1)
    B, A = torch.randn(30, 5, dtype=torch.float64), torch.randn(5, 20, dtype=torch.float64)
    U, S, Vh = analysis.low_rank_svd(B, A)
    assert torch.allclose(S, torch.linalg.svdvals(B @ A)[:5])
    assert torch.allclose(U * S @ Vh, B @ A)


def test_rank_grid_counts_the_gates_set_by_the_test(small_clip):
    """Active ranks land in the right (encoder, layer, type) cell; unadapted modules are None."""
    model = codyra.inject(small_clip, 4, where=codyra.clip_placement("both", ("q", "v", "c_fc")))
    for _, m in codyra.adapters(model):
        m.lora_g.data.zero_()
    model.visual.transformer.resblocks[1].mlp.c_fc.lora_g.data = torch.tensor([1.0, 0, -2, 0.5])
    model.transformer.resblocks[1].attn.q_proj.lora_g.data = torch.tensor([0.0, 0.0, 0.0, 3.0])
    rep = analysis.task_report(model, analysis.snapshot(model), analysis.weights(model))
    vision, text = rep["ranks"]["grid"]["vision"], rep["ranks"]["grid"]["text"]
    assert len(vision) == len(text) == 2  # blocks a tower
    assert vision[1] == [0, None, 0, None, 3, None] and vision[0] == [0, None, 0, None, 0, None]
    assert text[1] == [1, None, 0, None, 0, None]
    assert rep["ranks"]["by_type"]["vision"]["c_fc"] == 3
    assert rep["ranks"]["by_type"]["text"]["q"] == 1
    assert rep["ranks"]["mean"] == pytest.approx(4 / 12, rel=1e-4) and rep["ranks"]["of"] == 4


def test_gate_survival_bins_and_means():
    """|g_init| is binned by GATE_EDGES and split by survival; means are over |g_init|."""
    g_init = {"a": torch.tensor([0.1, -0.3, 1.2]), "b": torch.tensor([-2.5, 0.6])}
    g_final = {"a": torch.tensor([0.0, 0.0, 0.9]), "b": torch.tensor([-2.0, 0.0])}
    s = analysis.gate_survival(g_init, g_final)
    assert s["total"] == [1, 1, 1, 0, 1, 0, 1] and s["kept"] == [0, 0, 0, 0, 1, 0, 1]
    assert s["mean_init_kept"] == pytest.approx(1.85, rel=1e-4)
    assert s["mean_init_pruned"] == pytest.approx(1.0 / 3, rel=1e-4)


def test_drift_on_constructed_weights(small_clip):
    """Drift per group and in total is the Frobenius norm of the changes; relative divides by the
    group's ||W_pre||_F."""
    pre = analysis.weights(small_clip)
    with torch.no_grad():
        q = small_clip.visual.transformer.resblocks[0].attn.q_proj
        q.weight[0, :2] += torch.tensor([3.0, 4.0])
        small_clip.transformer.resblocks[1].mlp.c_fc.weight[5, 1] -= 12.0
    d = analysis.summarize_drift(analysis.drift(pre, small_clip))

    def norm_of(names):
        return math.sqrt(sum(float(pre[n].norm()) ** 2 for n in names))
    vision_q = norm_of(f"visual.transformer.resblocks.{i}.attn.q_proj" for i in range(2))
    assert d["norm"]["vision"]["q"] == pytest.approx(5.0, rel=1e-4)
    assert d["relative"]["vision"]["q"] == pytest.approx(5.0 / vision_q, rel=1e-4)
    assert d["norm"]["vision"]["k"] == 0.0 and d["norm"]["text"]["c_fc"] == pytest.approx(12.0)
    assert d["norm"]["vision"]["all"] == pytest.approx(5.0)
    assert d["norm"]["total"] == pytest.approx(13.0)
    assert d["relative"]["total"] == pytest.approx(13 / norm_of(pre), rel=1e-4)


def test_drift_is_the_same_before_and_after_merge(small_clip):
    """An adapter's drift, read before merge, is that of the merged weights."""
    torch.manual_seed(0)
    model = codyra.inject(small_clip, 3, where=codyra.clip_placement())
    pre = {n: m.base.weight.detach().clone() for n, m in codyra.adapters(model)}
    for _, m in codyra.adapters(model):
        m.lora_B.data.normal_()
        m.lora_g.data[0] = 0.0
    before = analysis.drift(pre, model)
    after = analysis.drift(pre, codyra.merge(model))
    assert all(before[n][0] > 0 and before[n] == pytest.approx(after[n], rel=1e-5) for n in pre)


def test_report_is_json_and_prints_a_heat_map(small_clip):
    """task_report is plain JSON and format_report shows one grid row per module type and a
    summary; the snapshot holds copies of the gates at injection."""
    torch.manual_seed(0)
    pre = analysis.weights(small_clip, codyra.clip_placement())
    model = codyra.inject(small_clip, 2, where=codyra.clip_placement())
    start = analysis.snapshot(model)
    assert start.keys() == dict(codyra.adapters(model)).keys()
    for _, m in codyra.adapters(model):
        m.lora_B.data.normal_()
        m.lora_g.data[0] = 0.0
    rep = json.loads(json.dumps(analysis.task_report(model, start, pre)))
    text = analysis.format_report(rep)
    assert all(f"\n{t} " in text for t in analysis.TYPES)
    assert "amplification" in text and "drift" in text
    assert rep["update"]["total"] > 0 and rep["amplification"]["pooled"] > 0
    assert rep["gates"]["total"] != rep["gates"]["kept"]  # the snapshot was not zeroed with g
    # by hand: 2 ranks, g_0 = 0, so one alive in each of the 24 adapters (2 blocks x 6 types x 2
    # towers, 64 wide, c_fc 64 -> 256): used 4 x (4 x (64 + 64 + 1) + 2 x (64 + 256 + 1)) params
    with torch.no_grad():
        dw = math.hypot(*(float(((m.lora_B * m.lora_g) @ m.lora_A).norm())
                          for _, m in codyra.adapters(model)))
    assert rep["ranks"]["mean"] == 1.0 and rep["ranks"]["of"] == 2
    assert rep["used_parameters"] == 4 * (4 * (64 + 64 + 1) + 2 * (64 + 256 + 1))
    assert rep["update"]["total"] == pytest.approx(dw, rel=1e-4)
    summary = text.splitlines()[-1].split(" | ")  # the printed numbers are the report's
    assert summary[:3] == ["mean rank 1.0/2", f"used params {rep['used_parameters'] / 1e6:.3g}M",
                           f"||dW||_F {dw:.3g} ({100 * rep['update']['relative']:.2g}% of "
                           "||W_pre||_F)"], summary


def test_full_fine_tuning_is_measured_against_the_snapshot(small_clip):
    """Without adapters the snapshot is a copy of the weights; the task's update is measured
    against it: no ranks, no gates, the one changed matrix."""
    where = codyra.clip_placement()
    pre = analysis.weights(small_clip, where)
    with torch.no_grad():
        small_clip.transformer.resblocks[0].attn.v_proj.weight[0, 0] += 1.0  # a task before
    start = analysis.snapshot(small_clip, where)
    assert start.keys() == pre.keys()
    with torch.no_grad():
        small_clip.transformer.resblocks[1].mlp.c_proj.weight[0, 0] += 0.5  # this task
    rep = analysis.task_report(small_clip, start, pre)
    assert rep["ranks"] == {} and rep["gates"] is None
    assert rep["update"]["total"] == pytest.approx(0.5, rel=1e-4)
    text = rep["update"]["grid"]["text"]
    assert text[1][analysis.TYPES.index("c_proj")] == pytest.approx(0.5, rel=1e-4)
    assert text[0][analysis.TYPES.index("v")] == 0.0
    assert rep["drift"]["norm"]["total"] == pytest.approx(math.hypot(1.0, 0.5), rel=1e-4)


# -----------------------------------------------------------------------------
# the scripts


def test_tiny_run_with_plot_writes_figures_and_analysis(small_weights, tmp_path):
    """train.py --plot writes the three figures and one analysis entry per task to results.json,
    with each task's ||dW_t||_F / ||W_pre||_F; tau = 1 at the second and third of three steps
    prunes ranks of |g| < 2 (95% of N(0, 1)), whole matrices', and the merged model shows it."""
    argv = ["--setting", "tiny", "--iterations", "3", "--batch-size", "8", "--rank", "2",
            "--dense-ratio", "0", "--kappa-max", "1", "--workers", "0", "--eval-batch-size",
            "64", "--cache-dir", CACHE, "--model", small_weights, "--out", str(tmp_path), "--plot"]
    out = run_script("train.py", *argv)
    assert out.returncode == 0, out.stderr
    for name in ("accuracy.png", "ranks.png", "drift.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((tmp_path / "results.json").read_text())
    assert len(res["analysis"]) == len(res["datasets"]) and "active ranks" in out.stdout
    assert res["analysis"][-1]["drift"]["norm"]["total"] > 0
    # each task's relative update, by hand: its merged factors against the pretrained weights
    pre = torch.load(small_weights)
    injected = kept_in_all = 0
    for t, rep in enumerate(res["analysis"]):
        update = torch.load(tmp_path / f"factors-task{t + 1}.pt")
        dw = math.hypot(*(float((B @ A).norm()) for B, A in update.values()))
        w = math.hypot(*(float(pre[n + ".weight"].norm()) for n in update))
        assert rep["update"]["relative"] == pytest.approx(dw / w, rel=1e-3), t
        injected, kept_in_all = injected + 2 * len(update), kept_in_all + sum(
            A.shape[0] for _, A in update.values())
    assert 0 < kept_in_all < injected / 2, (kept_in_all, injected)
    # the merged updates are all there is: rank(W_T - W_pre) <= the sum of the ranks kept per task,
    # 0 where every task pruned all of a matrix's ranks
    c = analysis.compare(clip_model.load(small_weights),
                         clip_model.load(str(tmp_path / "checkpoint.pt")))
    untouched = 0
    for e, rows in c["rank"]["grid"].items():
        for i, row in enumerate(rows):
            kept = [sum(rep["ranks"]["grid"][e][i][j] for rep in res["analysis"])
                    for j in range(len(row))]
            assert all(x <= k and (x > 0) == (k > 0) for x, k in zip(row, kept)), (e, i, row, kept)
            untouched += kept.count(0)
    assert untouched > 0, "no matrix lost all its ranks in every task"


def test_compare_two_checkpoints(small_weights, tmp_path):
    """python analysis.py A B finds the one matrix that differs, its norm and its amplification."""
    sd = torch.load(small_weights)
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    W = sd[key]
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    sd[key] = W + 0.5 * torch.outer(U[:, 0], Vh[0])  # along W's top direction: factor 0.5 / S[0]
    torch.save(sd, tmp_path / "b.pt")
    out = run_script("analysis.py", small_weights, str(tmp_path / "b.pt"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()

    def rows(title):  # the block under title: {type: its cells, vision's 2 layers then text's 2}
        at = next(i for i, line in enumerate(lines) if line.startswith(title)) + 2  # a header
        return {r.split()[0]: [c for c in r.split()[1:] if c != r.split()[0]]
                for r in lines[at:at + len(analysis.TYPES)]}
    amp = f"{0.5 / S[0].item():.3g}"
    for title, cfc, other in (("||W_B - W_A||_F", "0.5", "0"), ("rank of", "1", "0"),
                              ("amplification of", amp, "-")):
        expected = {t: [other] * 4 for t in analysis.TYPES}
        expected["c_fc"] = [cfc, other, other, other]  # vision, layer 0
        assert rows(title) == expected, title
    assert lines[-1].startswith("||W_B - W_A||_F 0.5 ("), lines[-1]
    assert lines[-1].endswith(f"| amplification {amp} (pooled)"), lines[-1]


def test_command_line_errors_are_one_line(small_weights, tmp_path, monkeypatch, capsys):
    """A missing model is one `error:` line and a non-zero exit; --amp-rank 0 is a usage error."""
    monkeypatch.setattr(sys, "argv", ["analysis.py", small_weights, str(tmp_path / "none.pt")])
    with pytest.raises(SystemExit) as e:
        analysis.main()
    assert str(e.value.code).startswith("error: ") and "\n" not in str(e.value.code)
    monkeypatch.setattr(sys, "argv",
                        ["analysis.py", small_weights, small_weights, "--amp-rank", "0"])
    with pytest.raises(SystemExit) as e:
        analysis.main()
    assert e.value.code == 2 and "--amp-rank must be >= 1" in capsys.readouterr().err
