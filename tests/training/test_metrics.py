import numpy as np
import pytest

from effiseg.training.metrics import image_scores, summarize


def test_hand_computed_values():
    target = np.zeros((4, 4), bool)
    target[0, :4] = True          # 4 true pixels
    pred = np.zeros((4, 4), bool)
    pred[0, :2] = True            # 2 TP
    pred[1, :1] = True            # 1 FP; 2 FN
    s = image_scores(pred, target)
    assert (s["tp"], s["fp"], s["fn"]) == (2, 1, 2)
    assert s["dice"] == pytest.approx(4 / 7)
    assert s["iou"] == pytest.approx(2 / 5)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 4)


def test_empty_mask_conventions():
    empty = np.zeros((3, 3), bool)
    some = empty.copy()
    some[1, 1] = True
    both_empty = image_scores(empty, empty)
    assert both_empty["dice"] == both_empty["iou"] == both_empty["precision"] == both_empty["recall"] == 1.0
    fp_only = image_scores(some, empty)
    assert fp_only["dice"] == fp_only["iou"] == fp_only["precision"] == 0.0 and fp_only["recall"] == 1.0
    missed = image_scores(empty, some)
    assert missed["dice"] == missed["iou"] == missed["recall"] == 0.0 and missed["precision"] == 1.0


def test_summary_means_over_images_and_pooled_f1():
    a = {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0, "tp": 90, "fp": 0, "fn": 0}
    b = {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0, "tp": 0, "fp": 10, "fn": 10}
    s = summarize([a, b])
    assert s["mean_dice"] == 0.5 and s["n_images"] == 2
    assert s["pooled_precision"] == pytest.approx(0.9) and s["pooled_recall"] == pytest.approx(0.9)
    assert s["f1_pooled"] == pytest.approx(0.9)
    with pytest.raises(ValueError):
        summarize([])
