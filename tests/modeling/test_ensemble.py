"""The paper's ensemble ("the union set of proposals are processed by an ensemble of per-region classifiers"): each
RoI's class probabilities and decoded boxes averaged over the models, by hand for two heads with known outputs
(also through box refinement's second pass), and on tiny detectors: one model, or two copies of it, give that model's
detections; the merges' arguments are checked."""

import math

import pytest
import torch

from detectron_res.modeling import DetectorEnsemble, TestTimeAugmentation
from detectron_res.modeling.ensemble import average_predictions, averaged_candidates
from detectron_res.modeling.test_time import FeaturePyramid
from test_detector import make_batch
from test_roi_heads import coordinate_features, make_heads
from test_test_time import assert_same_detections
from test_test_time import tiny_model  # noqa: F401 (a fixture)

SIZES = [(96, 128), (96, 128)]


def constant_heads(class_bias: list[float], class_0_deltas: list[float]):
    """A head (2 classes) whose predictions do not depend on the RoI: logits = `class_bias` (classes 0, 1,
    background), deltas of class 0 = `class_0_deltas` (dx, dy, dw, dh before the 10, 10, 5, 5 weights), class 1's 0."""
    heads = make_heads()
    with torch.no_grad():
        heads.predictor.cls_score.bias.copy_(torch.tensor(class_bias))
        heads.predictor.bbox_pred.bias.copy_(torch.tensor([*class_0_deltas, 0.0, 0.0, 0.0, 0.0]))
    return heads


def two_predictors():
    """A: logits (ln 3, 0, 0) -> probabilities (3/5, 1/5) for the classes, class 0 moved right by a tenth of its
    width (dx 1 / 10). B: logits (0, ln 2, 0) -> (1/4, 2/4), class 0 twice as wide about its centre (dw 5 ln 2 / 5)."""
    a = constant_heads([math.log(3.0), 0.0, 0.0], [1.0, 0.0, 0.0, 0.0])
    b = constant_heads([0.0, math.log(2.0), 0.0], [0.0, 0.0, 5.0 * math.log(2.0), 0.0])
    pyramid = FeaturePyramid.single(coordinate_features(), SIZES)
    return [lambda boxes, heads=heads: heads.predict(pyramid, boxes, SIZES) for heads in (a, b)]


def test_each_roi_is_scored_and_regressed_by_every_model_and_averaged():
    proposals = [torch.tensor([[16.0, 16.0, 80.0, 48.0]]), torch.tensor([[40.0, 8.0, 60.0, 88.0]])]
    candidates = averaged_candidates(
        two_predictors(), proposals, refine=False, score_thresh=0.05, empty_boxes="before_nms"
    )
    # image 0, the 64 x 32 box centred at x 48: A's class 0 box moves by 6.4 -> [22.4, 16, 86.4, 48]; B's doubles
    # to 128 wide -> [-16, 16, 112, 48], clipped to [0, 16, 112, 48]; their mean [11.2, 16, 99.2, 48]. Class 1: the
    # box itself in both. Scores: class 0 (3/5 + 1/4) / 2 = 0.425, class 1 (1/5 + 1/2) / 2 = 0.35.
    expected = torch.tensor([[11.2, 16.0, 99.2, 48.0], [16.0, 16.0, 80.0, 48.0]])
    torch.testing.assert_close(candidates[0]["boxes"], expected)
    torch.testing.assert_close(candidates[0]["scores"], torch.tensor([0.425, 0.35]))
    assert candidates[0]["labels"].tolist() == [0, 1]
    # image 1, 20 x 80 centred at x 50: A -> [42, 8, 62, 88]; B -> [30, 8, 70, 88]; mean [36, 8, 66, 88]
    torch.testing.assert_close(candidates[1]["boxes"], torch.tensor([[36.0, 8.0, 66.0, 88.0], [40.0, 8.0, 60.0, 88.0]]))
    torch.testing.assert_close(candidates[1]["scores"], torch.tensor([0.425, 0.35]))


def test_refinement_pools_the_averaged_box_of_the_top_class_again_in_every_model():
    proposals = [torch.tensor([[16.0, 16.0, 80.0, 48.0]]), torch.zeros((0, 4))]
    candidates = averaged_candidates(
        two_predictors(), proposals, refine=True, score_thresh=0.05, empty_boxes="before_nms"
    )
    # the first pass as above; its top class is 0 (0.425), whose averaged box [11.2, 16, 99.2, 48] (88 wide, centre
    # 55.2) is predicted again: A -> [20, 16, 108, 48]; B -> 176 wide [-32.8, 16, 143.2, 48], clipped [0, 16, 128, 48];
    # mean [10, 16, 118, 48]; class 1 keeps the pooled box
    expected = torch.tensor([
        [11.2, 16.0, 99.2, 48.0], [16.0, 16.0, 80.0, 48.0], [10.0, 16.0, 118.0, 48.0], [11.2, 16.0, 99.2, 48.0],
    ])
    torch.testing.assert_close(candidates[0]["boxes"], expected)
    torch.testing.assert_close(candidates[0]["scores"], torch.tensor([0.425, 0.35, 0.425, 0.35]))
    assert candidates[0]["labels"].tolist() == [0, 1, 0, 1] and len(candidates[1]["boxes"]) == 0


def test_average_predictions_is_the_per_roi_mean_over_the_models():
    probs = [[torch.tensor([[0.2, 0.4]])], [torch.tensor([[0.6, 0.0]])], [torch.tensor([[0.1, 0.2]])]]
    boxes = [[torch.full((1, 2, 4), 3.0)], [torch.full((1, 2, 4), 6.0)], [torch.full((1, 2, 4), 0.0)]]
    mean_probs, mean_boxes = average_predictions([(p, b) for p, b in zip(probs, boxes)])
    torch.testing.assert_close(mean_probs[0], torch.tensor([[0.3, 0.2]]))
    torch.testing.assert_close(mean_boxes[0], torch.full((1, 2, 4), 3.0))


@pytest.mark.parametrize("refine", [False, True])
def test_two_copies_of_a_model_averaged_on_the_union_give_that_model(tiny_model, refine):  # noqa: F811
    """The union holds every proposal twice; both copies predict the same, so the averages are the model's own
    predictions and the NMS removes the duplicates (the votes weigh each twice: the same means)."""
    batch = make_batch()
    tiny_model.test_time = TestTimeAugmentation(vote_iou_thresh=0.5, refine_nms_thresh=0.3 if refine else None)
    try:
        with torch.no_grad():
            expected = tiny_model(batch)
            alone = DetectorEnsemble(models=[tiny_model], shared_proposals=True, merge="average")(batch)
            pair = DetectorEnsemble(models=[tiny_model, tiny_model], shared_proposals=True)(batch)
    finally:
        tiny_model.test_time = TestTimeAugmentation()
    assert_same_detections(alone, expected)
    assert sum(len(e["boxes"]) for e in expected) > 10
    for a, e in zip(pair, expected):
        torch.testing.assert_close(a["boxes"], e["boxes"])
        torch.testing.assert_close(a["scores"], e["scores"])
        assert torch.equal(a["labels"], e["labels"])


def test_the_merges_and_their_defaults(tiny_model):  # noqa: F811
    assert DetectorEnsemble(models=[tiny_model, tiny_model], shared_proposals=True).merge == "average"
    assert DetectorEnsemble(models=[tiny_model, tiny_model]).merge == "nms"
    with pytest.raises(ValueError, match="must share their proposals"):
        DetectorEnsemble(models=[tiny_model, tiny_model], shared_proposals=False, merge="average")
    with pytest.raises(ValueError, match=r"one of \['average', 'nms'\], got 'vote'"):
        DetectorEnsemble(models=[tiny_model], merge="vote")
