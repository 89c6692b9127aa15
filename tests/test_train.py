import contextlib
import json
import math
import os
import re
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import clip_model
import codyra
import data
import eval as evaluation
import loop
import tiny_world
from conftest import CACHE, SMALL, draw_once, make_small_clip, run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a tiny random CLIP stands in for the pretrained one: these tests check the machinery, not accuracy
FAST = ["--setting", "tiny", "--iterations", "3", "--batch-size", "8", "--rank", "2",
        "--workers", "0", "--eval-batch-size", "64", "--cache-dir", CACHE]
ONE = [*FAST, "--datasets", "shapes", "--holdout", "none", "--routing", "none"]


def run(*argv):
    return run_script("train.py", *argv)


def kill_after_first_task(*argv, out):
    """train.py into `out`, stopped dead once task 1's results.json is written, as a kill between
    two tasks leaves it (nothing of train.py runs after); returns how many tasks it finished."""
    write_json = evaluation.write_json

    def write_then_die(path, obj):
        write_json(path, obj)
        raise SystemExit(137)  # a SIGKILLed process's status
    with mock.patch.object(evaluation, "write_json", write_then_die):
        done = run(*argv, "--out", str(out))
    assert done.returncode == 137, done.stderr
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


@pytest.mark.parametrize("flags, name", [
    (["--shots", "0"], "--shots"), (["--rank", "0"], "--rank"),
    (["--dense-ratio", "1.5"], "--dense-ratio"), (["--datasets", "nosuchset"], "--datasets"),
    (["--layers", "q,nosuch"], "layers"), (["--prompts", "photo"], "--prompts"),
    (["--layout", "coop"], "--layout")])
def test_impossible_flags_are_refused(flags, name, tmp_path):
    """Impossible flag values stop argparse with one line naming the flag, and no traceback."""
    out = run(*FAST, *flags, "--out", str(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert name in out.stderr.splitlines()[-1] and "error:" in out.stderr.splitlines()[-1]


def test_two_runs_of_one_seed_agree_to_the_bit_and_bf16_needs_cuda(small_weights, tmp_path):
    """Training is deterministic: two runs of one seed (one naming --precision fp32, the default)
    give the same accuracy matrix to the bit; --precision bf16 on a CPU is refused in one line."""
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
    """A run killed after its first task and resumed says so, trains no task twice, keeps the
    first run's rows (their timings too) and ends on the matrix of a run never interrupted."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run(*FAST, "--model", small_weights, "--out", str(whole)).returncode == 0
    assert kill_after_first_task(*FAST, "--model", small_weights, out=cut) == 1
    first = json.loads((cut / "results.json").read_text())
    other = run(*FAST, "--model", small_weights, "--out", str(cut), "--resume", "--seed", "9")
    assert other.returncode == 2 and "--seed" in other.stderr, \
        "resuming with another seed must be refused"
    out = run(*FAST, "--model", small_weights, "--out", str(cut), "--resume")
    assert out.returncode == 0, out.stderr
    total = len(first["datasets"])
    lines = out.stdout.splitlines()
    assert f"resuming after task 1/{total} from {cut / 'checkpoint.pt'}" in lines
    trained = {line.split()[1] for line in lines if line.startswith("task ")}  # progress lines
    assert trained == {f"{t}/{total}" for t in range(2, total + 1)}
    res = json.loads((cut / "results.json").read_text())
    timings = {k: v for k, v in first["seconds"][0].items() if k != "checkpoint"}  # saved before it
    assert res["seconds"][0] == timings and res["acc"][0] == first["acc"][0]
    assert res["acc"] == json.loads((whole / "results.json").read_text())["acc"]


@torch.no_grad()
def zero_shot_by_hand(model, names):
    """Each tiny dataset's test accuracy (%) among its own classes, written out here: an image
    goes to the class whose text feature (the normalised mean of its normalised template
    features) has the largest dot product with the image's normalised feature."""
    with mock.patch.object(tiny_world, "generate", draw_once):  # the images drawn once a session
        tasks = tiny_world.tasks(None, 0, names)
    data.prepare(tasks, model.visual.input_resolution)
    row = []
    for task in tasks:
        text = torch.stack([F.normalize(F.normalize(model.encode_text(clip_model.tokenize(
            [t.format(c) for t in task.templates])), dim=-1).mean(0), dim=0)
            for c in task.classnames])  # (C, E)
        (x, y), = task.test.batches(len(task.test))  # every test image in one batch
        image = F.normalize(model.encode_image(clip_model.normalize(x)), dim=-1)  # (N, E)
        row.append(100.0 * ((image @ text.T).argmax(1) == y).float().mean().item())
    return row


def test_eval_script_writes_one_row(small_weights, tmp_path):
    """eval.py evaluates a model on every dataset of a setting and writes a one-row results.json
    and the hold-out's row: each the accuracy zero_shot_by_hand computes for the model."""
    out = run_script("eval.py", "--setting", "tiny", "--model", small_weights, "--workers", "0",
                     "--cache-dir", CACHE, "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    res = json.loads((tmp_path / "results.json").read_text())
    assert len(res["acc"]) == 1 and len(res["acc"][0]) == len(res["datasets"]) >= 5
    assert res["holdout"]["datasets"] == ["positions"]
    by_hand = zero_shot_by_hand(clip_model.load(small_weights), res["datasets"] + ["positions"])
    assert res["acc"][0] + res["holdout"]["acc"] == pytest.approx(by_hand, abs=1e-3)


def test_zero_shot_row_comes_first_and_equals_eval_py(small_weights, tmp_path):
    """Every run records the model before its first task as the zero-shot row, which is what
    eval.py gives for the same model."""
    argv = ["--setting", "tiny", "--datasets", "shapes,digits", "--model", small_weights,
            "--workers", "0", "--cache-dir", CACHE]
    trained = run(*FAST[2:-2], *argv, "--out", str(tmp_path / "train"))
    assert trained.returncode == 0, trained.stderr
    evaluated = run_script("eval.py", *argv, "--out", str(tmp_path / "eval"))
    assert evaluated.returncode == 0, evaluated.stderr
    res = json.loads((tmp_path / "train" / "results.json").read_text())
    row = json.loads((tmp_path / "eval" / "results.json").read_text())["acc"][0]
    assert res["zero_shot"] == row and len(res["acc"]) == 2
    assert res["zero_shot_metrics"]["last"]["mean"] == sum(row) / 2
    assert trained.stdout.index("zero-shot") < trained.stdout.index("task 1/")


def test_the_tiny_recipe_selects_ranks_as_x_tail_does():
    """The tiny recipe's sum of tau over a task is X-TAIL's within 2%, and kappa_max / lr is
    X-TAIL's 10 within 20%: the paper's operating point of the rank selection."""
    def tau_sum(r):
        return sum(codyra.threshold_schedule(i, r["iterations"], r["dense_ratio"], r["kappa_max"])
                   for i in range(r["iterations"]))
    tiny, xtail = data.RECIPES["tiny"], data.RECIPES["xtail"]
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


def test_contrastive_loss_against_a_hand_written_cross_entropy():
    """The training loss is ce_i + ce_t, here written out one term at a time: ce_i, each image
    against the current classes; ce_t, each class prompt against the batch's images (its own
    images the targets, unnormalised), over the earlier tasks' prompts FIRST, then the current
    ones, a class with no image in the batch counting in the mean with a zero term."""
    torch.manual_seed(0)
    img, txt, earlier = (F.normalize(torch.randn(n, 4), dim=-1) for n in (3, 2, 2))
    labels, scale = [1, 0, 1], 10.0

    def ce(logits, targets):  # -sum_k target_k * log softmax(logits)_k
        z = sum(math.exp(x) for x in logits)
        return -sum(t * (x - math.log(z)) for x, t in zip(logits, targets))

    def sims(a, b):
        return [[scale * float(x @ y) for y in b] for x in a]
    ce_i = sum(ce(row, [k == y for k in range(2)]) for row, y in zip(sims(img, txt), labels)) / 3
    for before in ([], list(earlier)):
        prompts = before + list(txt)  # row P + c: current class c
        ce_t = sum(ce(row, [len(before) + y == k for y in labels])
                   for k, row in enumerate(sims(prompts, img))) / len(prompts)
        got = loop.contrastive_loss(img, txt, torch.tensor(labels), scale,
                                    torch.stack(before) if before else None)
        assert got.item() == pytest.approx(ce_i + ce_t, rel=1e-5), len(before)


# the method acting: the shipped tiny CLIP learns one domain (shapes, zero-shot 31.6%) in 40 steps
# of 32 images, ranks pruned on the way. By hand, threshold_schedule's docstring with 40 steps,
# dense ratio 0.25, kappa_max 0.03: tau = 0 through step 10, then 0.03 * (step - 9) / 29 up to
# 0.03 from step 38 (0-based); the five progress lines (steps 8, 16, 24, 32, 40, 1-based) show:
TAUS = ["0.0000", "0.0062", "0.0145", "0.0228", "0.0300"]  # 0, .03*6/29, .03*14/29, .03*22/29, .03
PRUNING = ["--setting", "tiny", "--model", "tiny", "--datasets", "shapes", "--iterations", "40",
           "--batch-size", "32", "--rank", "4", "--dense-ratio", "0.25", "--kappa-max", "0.03",
           "--lr", "5e-3", "--holdout", "none", "--routing", "none", "--workers", "0",
           "--cache-dir", CACHE]
# the adapted matrices, named as a CLIP's modules are: tower, block, matrix
TOWERS = {"vision": "visual.transformer.resblocks", "text": "transformer.resblocks"}
MATRICES = {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "out": "attn.out_proj",
            "c_fc": "mlp.c_fc", "c_proj": "mlp.c_proj"}  # the columns of analysis' grids


def test_a_run_long_enough_prunes_ranks_and_learns_its_domain(tmp_path):
    """40 steps that threshold from step 11: tau follows the schedule worked out by hand, some
    ranks reach g = 0 and are dropped from the saved update (as many in every matrix as the
    results' rank grid says, and as the progress line's mean), the loss falls, and the domain's
    accuracy rises above its zero-shot accuracy."""
    out = run(*PRUNING, "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    progress = [line.split(" | ") for line in out.stdout.splitlines() if line.startswith("task ")]
    assert [p[3] for p in progress] == [f"tau {t}" for t in TAUS]
    losses = [float(p[2].removeprefix("loss ")) for p in progress]
    assert losses[-1] < losses[0], losses
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["acc"][0][0] > res["zero_shot"][0], (res["zero_shot"], res["acc"])
    # kept ranks, from the saved update B' (d_out, k), A' (k, d_in): g = 0 ranks are not in it
    update = torch.load(tmp_path / "factors-task1.pt")
    kept = {name: A.shape[0] for name, (B, A) in update.items()}
    assert all(B.shape[1] == A.shape[0] for B, A in update.values())
    assert len(kept) == 2 * 3 * 6 and 0 < sum(kept.values()) < 4 * len(kept), kept  # some pruned
    grid = res["analysis"][0]["ranks"]["grid"]
    assert kept == {f"{TOWERS[e]}.{i}.{m}": grid[e][i][j] for e in TOWERS for i in range(3)
                    for j, m in enumerate(MATRICES.values())}
    assert progress[-1][4] == f"ranks {sum(kept.values()) / len(kept):.1f}/4"


@contextlib.contextmanager
def recording_adamw():
    """torch.optim.AdamW, as train.py builds it (in this process), noted: a list that receives
    each optimizer built, with .given (its keyword arguments), .numel (the elements it trains)
    and .lrs (the learning rate of each of its steps)."""
    made = []

    class AdamW(torch.optim.AdamW):
        def __init__(self, params, **given):
            params = list(params)
            super().__init__(params, **given)
            self.given, self.numel, self.lrs = given, sum(q.numel() for q in params), []
            made.append(self)

        def step(self, closure=None):
            self.lrs.append(self.param_groups[0]["lr"])
            return super().step(closure)
    with mock.patch.object(torch.optim, "AdamW", AdamW):
        yield made


def cosine(lr, steps):  # the learning rate of each step: lr, halfway down a cosine, ..., near 0
    return [pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * i / steps))) for i in range(steps)]


# the SMALL CLIP (conftest), by hand: a block of width 64 holds q, k, v, out (64 x 64 + 64 each),
# c_fc (64 -> 256) and c_proj (256 -> 64), two LayerNorms (128 each): 49,984; the vision tower adds
# conv1 3 * 8 * 8 * 64, class and positions (1 + 4) * 64 + 64, ln_pre, ln_post, proj 64 x 32; the
# text tower the token table 49,408 x 64, positions 77 x 64, ln_final and projection 64 x 32
BLOCK = 4 * (64 * 64 + 64) + (64 * 256 + 256) + (256 * 64 + 64) + 2 * 128
VISION = 2 * BLOCK + 3 * 8 * 8 * 64 + 5 * 64 + 64 + 2 * 128 + 64 * 32
TEXT = 2 * BLOCK + 49408 * 64 + 77 * 64 + 128 + 64 * 32
# SPEC's optimizer (the released code's): AdamW, betas (0.9, 0.9999), eps 1e-8
ADAMW = dict(betas=(0.9, 0.9999), eps=1e-8)


@pytest.mark.parametrize("encoders, layers, adapted", [
    ("vision", "q,c_fc", ["visual.transformer.resblocks.0.attn.q_proj",
                          "visual.transformer.resblocks.0.mlp.c_fc",
                          "visual.transformer.resblocks.1.attn.q_proj",
                          "visual.transformer.resblocks.1.mlp.c_fc"]),
    ("text", "v,out", ["transformer.resblocks.0.attn.v_proj",
                       "transformer.resblocks.0.attn.out_proj",
                       "transformer.resblocks.1.attn.v_proj",
                       "transformer.resblocks.1.attn.out_proj"])])
def test_lora_on_a_subset_trains_exactly_those_matrices(encoders, layers, adapted, small_weights,
                                                        tmp_path):
    """--method lora --encoders/--layers: rank-2 adapters on exactly the chosen matrices, none
    pruned; the optimizer gets their A, B, g alone, SPEC's AdamW with --weight-decay, and the
    learning rate falls along a cosine over the task's steps."""
    with recording_adamw() as made:
        out = run(*ONE, "--method", "lora", "--encoders", encoders, "--layers", layers,
                  "--iterations", "4", "--lr", "0.002", "--weight-decay", "0.1",
                  "--model", small_weights, "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    update = torch.load(tmp_path / "factors-task1.pt")
    assert sorted(update) == sorted(adapted)
    assert all(B.shape[1] == A.shape[0] == 2 for B, A in update.values())  # LoRA prunes none
    # per adapter: 2 ranks of (d_in + d_out + 1); q, v and out: 64 + 64 + 1, c_fc: 64 + 256 + 1
    per_block = {"q,c_fc": (64 + 64 + 1) + (64 + 256 + 1), "v,out": 2 * (64 + 64 + 1)}[layers]
    (optimizer,) = made
    assert optimizer.numel == 2 * 2 * per_block
    assert optimizer.given == dict(ADAMW, lr=0.002, weight_decay=0.1)
    assert optimizer.lrs == cosine(0.002, 4)
    res = json.loads((tmp_path / "results.json").read_text())
    (report,) = res["analysis"]
    assert report["used_parameters"] == 2 * 2 * per_block
    assert report["ranks"]["mean"] == 2 and report["ranks"]["of"] == 2
    assert all("| tau 0.0000 | ranks 2.0/2 |" in line
               for line in out.stdout.splitlines() if line.startswith("task "))


def test_full_fine_tuning_trains_every_weight_but_the_temperature(small_weights, tmp_path):
    """--method full: one optimizer over every parameter but logit_scale at the tiny recipe's
    rate for full fine-tuning (1e-4, cosine), each of them changed by the task, logit_scale
    not; results.json counts them as the used parameters, with no ranks and no saved update."""
    with recording_adamw() as made:
        out = run(*ONE, "--method", "full", "--model", small_weights, "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    (optimizer,) = made
    assert optimizer.numel == VISION + TEXT  # not logit_scale, a single number
    assert optimizer.given == dict(ADAMW, lr=1e-4, weight_decay=0.0)
    assert optimizer.lrs == cosine(1e-4, 3)
    before = torch.load(small_weights)
    after = torch.load(tmp_path / "checkpoint.pt")["model"]
    names = [n for n, _ in make_small_clip().named_parameters()]
    assert len(names) == len(before) and sum(before[n].numel() for n in names) == VISION + TEXT + 1
    assert [n for n in names if torch.equal(before[n], after[n])] == ["logit_scale"]
    res = json.loads((tmp_path / "results.json").read_text())
    (report,) = res["analysis"]
    assert report["used_parameters"] == VISION + TEXT
    assert report["ranks"] == {} and report["gates"] is None
    assert not list(tmp_path.glob("factors-task*.pt"))
    assert "mean active rank" not in out.stdout


def test_a_checkpoint_that_cannot_be_written_stops_with_a_hint_to_resume(small_weights,
                                                                        tmp_path):
    """A full disk while task 2's checkpoint is written: one line naming the task, the folder and
    the cause, pointing to --resume; the files of task 1 stay whole, and --resume finishes."""
    argv = [*FAST, "--datasets", "shapes,digits", "--holdout", "none", "--routing", "none",
            "--model", small_weights, "--out", str(tmp_path)]
    atomic, checkpoints = clip_model.atomic, []

    @contextlib.contextmanager
    def full_disk(path):
        with atomic(path) as tmp:
            checkpoints.extend([path] if path.endswith("checkpoint.pt") else [])
            if len(checkpoints) == 2:
                raise OSError(28, "No space left on device")
            yield tmp
    with mock.patch.object(clip_model, "atomic", full_disk):
        out = run(*argv)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith(f"error: cannot save task 2 in {tmp_path} (")
    assert "No space left on device" in lines[0] and lines[0].endswith("continue with --resume")
    assert len(json.loads((tmp_path / "results.json").read_text())["acc"]) == 1
    assert torch.load(tmp_path / "checkpoint.pt")["task"] == 1
    assert sorted(f.name for f in tmp_path.iterdir()) == [
        ".lock", "checkpoint.pt", "factors-task1.pt", "factors-task2.pt", "results.json"]
    done = run(*argv, "--resume")
    assert done.returncode == 0 and "resuming after task 1/2" in done.stdout, done.stderr
