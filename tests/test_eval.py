"""The paper's metrics on hand matrices, and evaluate / class_features on a fake CLIP whose
features the test sets, so that every expected accuracy is worked out by hand."""
import numpy as np
import pytest
import torch

import clip_model
import data
import eval as evaluation
from eval import compute_metrics

MTIL_ZERO_SHOT = [24.3, 88.4, 68.2, 44.6, 54.9, 71.0, 88.5, 59.4, 89.0, 64.7, 65.2]
XTAIL_ZERO_SHOT = [23.5, 76.8, 37.3, 36.7, 63.6, 84.0, 46.7, 86.7, 66.1, 63.7]


@pytest.mark.parametrize("row, paper_transfer, paper_mean", [(MTIL_ZERO_SHOT, 69.4, 65.3),
                                                              (XTAIL_ZERO_SHOT, 62.4, 58.5)])
def test_metrics_reproduce_paper_zero_shot_rows(row, paper_transfer, paper_mean):
    """A matrix whose every row is the paper's zero-shot row gives the paper's Transfer, Average,
    Last: a check of units and rounding (identical rows cannot show which rows each one reads;
    test_metrics_on_hand_computed_matrix does)."""
    m = compute_metrics([row] * len(row))
    assert round(m["transfer"]["mean"], 1) == paper_transfer
    assert round(m["average"]["mean"], 1) == paper_mean
    assert round(m["last"]["mean"], 1) == paper_mean


def test_metrics_on_hand_computed_matrix():
    """Transfer uses the rows above the diagonal, Average every row, Last the final row; 0.0
    counts."""
    acc = [[50.0, 10.0, 0.0],
           [40.0, 80.0, 30.0],
           [20.0, 60.0, 90.0]]
    m = compute_metrics(acc)
    assert m["transfer"] == {"mean": pytest.approx((10.0 + (0.0 + 30.0) / 2) / 2),
                             "per_dataset": [None, 10.0, 15.0]}
    assert m["average"]["per_dataset"] == pytest.approx([110 / 3, 150 / 3, 120 / 3])
    assert m["average"]["mean"] == pytest.approx(380 / 9)
    assert m["last"] == {"mean": pytest.approx(170 / 3), "per_dataset": [20.0, 60.0, 90.0]}


def test_metrics_of_a_single_row():
    """One evaluation (eval.py): Transfer is the mean of columns 2..T, Average and Last the row
    mean."""
    m = compute_metrics([[0.0, 10.0, 20.0]])
    assert (m["transfer"]["mean"] == 15.0 and m["average"]["mean"] == 10.0
            and m["last"]["mean"] == 10.0)


def test_metrics_of_a_single_dataset():
    """A one-dataset run has no transfer column: Transfer is None, not a division by zero."""
    m = compute_metrics([[42.0]])
    assert m["transfer"]["mean"] is None and m["last"]["mean"] == 42.0


# ----------------------------------------------------------------------------------------------
# evaluate and class_features on a fake CLIP


class FakeCLIP(torch.nn.Module):
    """A text feature set per prompt (dict), and image features handed out in order, one (N, E)
    tensor per test set: evaluate encodes each test set in one batch."""

    def __init__(self, text, images=()):
        super().__init__()
        self.prompts = list(text)
        self.tokens, self.text = clip_model.tokenize(self.prompts), torch.stack(list(text.values()))
        self.images = iter(images)

    def encode_text(self, tokens):  # each row: the feature of the prompt it tokenizes
        rows = (tokens[:, None] == self.tokens[None]).all(-1).float().argmax(-1)
        return self.text[rows]

    def encode_image(self, x):
        return next(self.images)[:len(x)]


def blank_images(n):
    """n images (their pixels unused by FakeCLIP) with labels set later."""
    return data.ImageSet(np.zeros((n, 1, 1, 3), np.uint8), [0] * n, clip_model.preprocess(False, 1))


def test_union_scoring_maps_the_union_label_back_with_each_tasks_offset():
    """X-TAIL (union=True): each image is scored among all tasks' classes and right when the
    union index minus its task's offset is its label; task-aware: among its own task's."""
    e = torch.eye(5)  # classes ant, bee (task A, offset 0) and cat, dog, eel (task B, offset 2)
    names = {"ant": e[0], "bee": e[1], "cat": e[2], "dog": e[3], "eel": e[4]}
    a = data.Task("A", ["ant", "bee"], ["{}"], None, blank_images(3))
    b = data.Task("B", ["cat", "dog", "eel"], ["{}"], None, blank_images(3))
    a.test.labels, b.test.labels = [0, 1, 1], [0, 1, 2]
    # A: ant, eel (union: wrong; its own classes: bee), bee. B: cat, dog, ant-like eel (union:
    # ant, wrong; its own classes: eel).
    images = [torch.stack([e[0], e[4] + 0.1 * e[1], e[1]]),
              torch.stack([e[2], e[3], 0.9 * e[0] + 0.1 * e[4]])]
    cpu = torch.device("cpu")
    union = evaluation.evaluate(FakeCLIP(names, images), [a, b], True, cpu)
    assert union == pytest.approx([100 * 2 / 3, 100 * 2 / 3])  # B's 2 and 3 map to 0 and 1
    aware = evaluation.evaluate(FakeCLIP(names, images), [a, b], False, cpu)
    assert aware == [100.0, 100.0]


def test_class_features_are_the_normalised_mean_over_templates():
    """A class's text feature is the normalised mean of its prompts' normalised features over all
    the templates, not the first template's."""
    text = {"a ant.": [3.0, 4.0, 0.0], "a photo of ant.": [0.0, 0.0, 2.0],
            "a bee.": [0.0, 1.0, 0.0], "a photo of bee.": [0.0, 1.0, 1.0]}
    text = {prompt: torch.tensor(feature) for prompt, feature in text.items()}
    got = evaluation.class_features(FakeCLIP(text), ["ant", "bee"], ["a {}.", "a photo of {}."],
                                    torch.device("cpu"))
    ant = torch.tensor([0.6 + 0.0, 0.8 + 0.0, 0.0 + 1.0]) / 2  # (3, 4, 0) / 5 and (0, 0, 1)
    bee = torch.tensor([0.0, 1.0 + 0.5 ** 0.5, 0.5 ** 0.5]) / 2  # (0, 1, 0) and (0, 1, 1) / sqrt 2
    expected = torch.stack([ant / ant.norm(), bee / bee.norm()])
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(expected[0], torch.tensor([0.3, 0.4, 0.5]) / 0.5 ** 0.5)  # by hand
