"""The second CoDyRA rows (routing.py), the hold-out datasets of Table 4 and Table 7's parameter
count: routed rows are lookups that satisfy the paper's identities, resume exactly, and rebuild."""
import json

import numpy as np
import pytest
import torch

import clip_model
import codyra
import data
import dryrun
import routing
from test_train import FAST, kill_after_first_task, run, zero_shot_by_hand

THREE = [*FAST, "--datasets", "shapes,digits,colours"]


@pytest.fixture(scope="module")
def whole(small_weights, tmp_path_factory):
    """(folder, results) of an uninterrupted tiny run of three tasks with both routings."""
    out = tmp_path_factory.mktemp("whole")
    done = run(*THREE, "--model", small_weights, "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out, json.loads((out / "results.json").read_text())


def test_oracle_rows_satisfy_the_papers_identities(whole):
    """Oracle routing: Last2[j] = A[j][j], Average2[j] = (sum_{t<j} A[t][j] + (T-j) A[j][j]) / T
    and Transfer2 = Transfer, on the accuracy matrix A of the same run."""
    _, res = whole
    A, oracle = res["acc"], res["routed"]["oracle"]
    T = len(A)
    assert oracle["metrics"]["last"]["per_dataset"] == [A[j][j] for j in range(T)]
    assert oracle["metrics"]["transfer"] == res["metrics"]["transfer"]
    for j, got in enumerate(oracle["metrics"]["average"]["per_dataset"]):
        assert got == sum([A[t][j] for t in range(j)] + [A[j][j]] * (T - j)) / T  # same order
        assert got == pytest.approx((sum(A[t][j] for t in range(j)) + (T - j) * A[j][j]) / T)
    assert all(a == 100.0 for row in oracle["routing_accuracy"] for a in row)


def test_autoencoder_routing_reports_its_accuracy(whole):
    """The auto-encoders' row has a T x T accuracy matrix and routing accuracy, and a summary of
    seen domains routed right and unseen ones recognised."""
    _, res = whole
    ae, T = res["routed"]["ae"], len(res["datasets"])
    for matrix in (ae["acc"], ae["routing_accuracy"]):
        assert len(matrix) == T and all(len(row) == T for row in matrix)
        assert all(0 <= a <= 100 for row in matrix for a in row)
    right = ae["routing_accuracy"]  # seen: datasets learned by row t (j <= t), unseen: the rest
    seen = [right[t][j] for t in range(T) for j in range(t + 1)]
    unseen = [right[t][j] for t in range(T) for j in range(t + 1, T)]
    assert ae["routing_summary"] == {"seen": pytest.approx(sum(seen) / len(seen)),
                                     "unseen": pytest.approx(sum(unseen) / len(unseen))}
    assert ae["metrics"]["last"]["mean"] is not None


def test_merged_factors_rebuild_the_final_model(whole, small_weights):
    """The pretrained weights plus each task's saved factors (W += B' A', in task order) give the
    checkpoint's weights to the bit."""
    out, res = whole
    weights = torch.load(small_weights, weights_only=True)
    for t in range(len(res["acc"])):
        for name, (B, A) in torch.load(out / f"factors-task{t + 1}.pt", weights_only=True).items():
            weights[name + ".weight"] += B @ A
    final = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(final[k], weights[k]) for k in final)


def test_resume_after_kill_gives_the_same_routed_rows(whole, small_weights, tmp_path):
    """A run killed after a task and resumed gives the first and both second rows of a run never
    interrupted, to the bit."""
    _, res = whole
    finished = kill_after_first_task(*THREE, "--model", small_weights, out=tmp_path)
    assert 1 <= finished < len(res["acc"]), "the run was not interrupted mid-sequence"
    out = run(*THREE, "--model", small_weights, "--out", str(tmp_path), "--resume")
    assert out.returncode == 0, out.stderr
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["acc"] == res["acc"]
    for name in ("ae", "oracle"):
        for key in ("acc", "routing_accuracy", "metrics", "routing_summary"):
            assert again["routed"][name][key] == res["routed"][name][key], (name, key)
    assert again["holdout"]["last"] == res["holdout"]["last"]


def test_tiny_run_records_the_holdout_and_used_parameters(whole, small_weights):
    """The tiny world evaluates its held-out domain before the first task and after the last (the
    pretrained model's and checkpoint.pt's accuracy, as zero_shot_by_hand computes them), and
    records the parameters each task's adapters use: recounted from its factors file, a kept rank
    is a column of B (d_out), a row of A (d_in) and its g."""
    out, res = whole
    held = res["holdout"]
    assert held["datasets"] == ["positions"]
    for key, model in (("zero_shot", small_weights), ("last", out / "checkpoint.pt")):
        by_hand = zero_shot_by_hand(clip_model.load(str(model)), ["positions"])
        assert held[key] == pytest.approx(by_hand, abs=1e-3), key
    for t, report in enumerate(res["analysis"], 1):
        factors = torch.load(out / f"factors-task{t}.pt", weights_only=True).values()
        assert all(B.shape[1] == A.shape[0] for B, A in factors)
        used = sum(A.shape[0] * (A.shape[1] + B.shape[0] + 1) for B, A in factors)
        assert report["used_parameters"] == used > 0, t


@pytest.mark.parametrize("flags", [["--holdout", "digits"], ["--holdout", "imagenet"],
                                   ["--routing", "vote"]])
def test_impossible_holdout_and_routing_are_refused(flags, tmp_path):
    """A held-out dataset the run trains, or one of another setting, is refused in one line."""
    out = run(*THREE, *flags, "--out", str(tmp_path))
    assert out.returncode == 2 and "error:" in out.stderr and "Traceback" not in out.stderr


def test_used_parameters_match_a_hand_count():
    """Kept ranks x (d_in + d_out + 1), summed over adapters: 2 x (4 + 3 + 1) + 0 = 16."""
    model = codyra.inject(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 5)), 3)
    with torch.no_grad():
        model[0].lora_g.copy_(torch.tensor([0.5, 0.0, -1.0]))
        model[1].lora_g.zero_()
    assert codyra.used_parameters(model) == 16
    assert {n: (B.shape, A.shape) for n, (B, A) in codyra.factors(model).items()} == {
        "0": ((3, 2), (2, 4)), "1": ((5, 0), (0, 3))}


def test_ae_route_takes_the_lowest_accepted_error():
    """An image goes to the lowest error among the domains whose threshold accepts it; to none
    when no threshold does."""
    errs = torch.tensor([[0.1, 0.5, 0.9, 0.3],    # domain 0, threshold 0.4
                         [0.2, 0.3, 0.9, 0.1]])   # domain 1, threshold 0.25
    assert routing.ae_route(errs, [0.4, 0.25]).tolist() == [0, routing.NOT_LEARNED,
                                                            routing.NOT_LEARNED, 1]


def test_fit_accepts_every_training_image_at_the_largest_error():
    """An auto-encoder's threshold is the largest reconstruction error of its own training
    features (recomputed here): every training image is accepted, and it is not a looser bound."""
    torch.manual_seed(0)
    features = torch.randn(20, 8)
    ae, threshold = routing.fit(features, steps=30)
    with torch.no_grad():
        errs = (ae(features) - features).pow(2).sum(-1)
    assert errs.min() < errs.max() - 1e-3  # errors differ: min, max and a mean disagree
    assert threshold == pytest.approx(errs.max().item(), rel=1e-6)
    assert routing.ae_route(errs[None], [threshold]).tolist() == [0] * 20


def test_summary_of_a_hand_matrix():
    """seen: the mean over the cells t >= j (datasets learned by row t); unseen: t < j."""
    acc = [[90.0, 10.0, 20.0],
           [80.0, 70.0, 30.0],
           [60.0, 50.0, 40.0]]
    assert routing.summary(acc) == {"seen": pytest.approx((90 + 80 + 70 + 60 + 50 + 40) / 6),
                                    "unseen": pytest.approx((10 + 20 + 30) / 3)}
    assert routing.summary([[42.0]]) == {"seen": 42.0, "unseen": None}


def test_ae_rows_look_up_the_model_of_the_route_on_a_hand_made_state():
    """Row t of the "ae" router: each image takes the predictions of the model after the task it
    is routed to (among tasks <= t), the current model's when no auto-encoder accepts it."""
    labels = [[0, 1, 2], [0, 1]]  # two test sets
    state = routing.new_state()
    state["predictions"] = [[torch.tensor([0, 1, 0]), torch.tensor([1, 1])],   # after task 1
                            [torch.tensor([2, 0, 0]), torch.tensor([0, 0])]]   # after task 2
    state["thresholds"] = [0.4, 0.6]
    state["errors"] = [[torch.tensor([0.1, 0.2, 0.9]), torch.tensor([0.8, 0.3])],  # AE 1
                       [torch.tensor([0.5, 0.1, 0.9]), torch.tensor([0.2, 0.9])]]  # AE 2
    routed = {"ae": {"acc": [], "routing_accuracy": []}}
    for t in range(2):
        routing.add_rows(routed, state, t, labels)
    # after task 1, only AE 1: set 1 routed (1, 1, none): predictions after task 1 either way,
    # 2 of 3 right; set 2 (not learned yet) routed (none, 1): 1 of 2 right, 1 of 2 routed right
    # after task 2: set 1 routed (1, 2, none) -> predictions (0 | 0 | 0): 1 of 3 right, 1 of 3
    # routed to its own AE; set 2 routed (2, 1) -> (0 | 1): 2 of 2 right, 1 of 2 routed right
    # (the model after task 2 alone: 0 of 3 and 1 of 2 right)
    assert np.allclose(routed["ae"]["acc"], [[200 / 3, 50.0], [100 / 3, 100.0]])
    assert np.allclose(routed["ae"]["routing_accuracy"], [[200 / 3, 50.0], [100 / 3, 50.0]])


def write_places365(root, per_class=1):
    """torchvision's Places365(split='val', small=True) layout with 365 classes."""
    folder, rng = root / "places365", np.random.default_rng(0)
    dryrun.write(folder / "categories_places365.txt",
           "".join(f"/{chr(97 + i % 26)}/class_{i}/outdoor {i}\n" for i in range(365)))
    rows = [(f"Places365_val_{i * per_class + k:08d}.jpg", i)
            for i in range(365) for k in range(per_class)]
    dryrun.write(folder / "places365_val.txt", "".join(f"{f} {c}\n" for f, c in rows))
    for f, _ in rows:
        dryrun.jpeg(rng, (8, 8), folder / "val_256" / f)


def write_imagenet(root):
    """torchvision's ImageNet(split='val') layout: val/<wnid>/*.JPEG, one image per class."""
    rng = np.random.default_rng(0)
    for i in range(1000):
        dryrun.jpeg(rng, (8, 8), root / f"imagenet/val/n{i:08d}/ILSVRC2012_val_{i:08d}.JPEG")


def test_holdout_datasets_load_from_torchvision_layouts(tmp_path):
    """Places365's and ImageNet's validation sets load with 365 and 1000 classes, the curated
    ImageNet names, every image labelled, and no training set."""
    write_places365(tmp_path)
    write_imagenet(tmp_path)
    places, imagenet = data.load_tasks("xtail", tmp_path, 16, 0, ["places365", "imagenet"])
    assert len(places.classnames) == 365 and len(places.test) == 365 and places.train is None
    assert places.classnames[3] == "class 3 outdoor"
    assert places.test.labels == list(range(365))
    assert len(imagenet.classnames) == 1000 and len(imagenet.test) == 1000
    assert imagenet.classnames[:2] == ["tench", "goldfish"] and imagenet.train is None
    assert imagenet.test.labels == list(range(1000))
    assert imagenet.templates == ["a photo of a {}."]
    ensemble = data.load_tasks("mtil", tmp_path, None, 0, ["imagenet"], prompts="ensemble")[0]
    assert len(ensemble.templates) == 80


@pytest.mark.parametrize("name,words", [("places365", ["Places365(", "split='val'"]),
                                        ("imagenet", ["val/<wnid>/*.JPEG"])])
def test_missing_holdout_dataset_is_one_line(tmp_path, name, words):
    """A missing held-out dataset gives one line saying where it goes and how to get it."""
    with pytest.raises(data.DataError) as info:
        data.load_tasks("xtail", tmp_path, None, 0, [name])
    assert "\n" not in str(info.value) and all(w in str(info.value) for w in words)
