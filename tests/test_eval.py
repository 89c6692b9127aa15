import pytest

from eval import compute_metrics

MTIL_ZERO_SHOT = [24.3, 88.4, 68.2, 44.6, 54.9, 71.0, 88.5, 59.4, 89.0, 64.7, 65.2]
XTAIL_ZERO_SHOT = [23.5, 76.8, 37.3, 36.7, 63.6, 84.0, 46.7, 86.7, 66.1, 63.7]


@pytest.mark.parametrize("row, paper_transfer, paper_mean", [(MTIL_ZERO_SHOT, 69.4, 65.3),
                                                              (XTAIL_ZERO_SHOT, 62.4, 58.5)])
def test_metrics_reproduce_paper_zero_shot_rows(row, paper_transfer, paper_mean):
    """A matrix whose every row is the paper's zero-shot row gives the paper's Transfer, Average,
    Last."""
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
