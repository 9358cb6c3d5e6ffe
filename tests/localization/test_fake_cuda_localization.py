"""CUDA placement of the localization stages without a GPU (tests/fake_cuda.py): the RPN stage's class-specific RPN
(training losses and backward with boxes, ignore regions and a crop without boxes; inference for given classes, for
its own best classes and over a pyramid; the best box per class) and the R-CNN stage (losses and backward; inference in
chunks), run on fake cuda tensors. A tensor made on the CPU beside cuda ones fails the run; the values and gradients
must equal a CPU run of the same weights exactly."""

import copy

import torch
import torch.nn.functional as F
from fake_cuda import CUDA, fake_backward, fake_cuda, to_cpu, to_fake_cuda
from test_rcnn_stage import make_localizer
from test_rpn_stage import image, tiny_rpn

from detectron_res.localization.pipeline import Localizer
from detectron_res.localization.rpn_stage import best_per_class


def assert_equal_outputs(found, expected):
    assert len(found) == len(expected)
    for result, reference in zip(found, expected):
        assert set(result) == set(reference)
        for key, value in result.items():
            assert value.device == CUDA, key
            torch.testing.assert_close(to_cpu(value), reference[key], rtol=0, atol=0, msg=key)


def assert_equal_gradients(model, reference):
    for (name, param), (_, cpu_param) in zip(model.named_parameters(), reference.named_parameters()):
        assert param.grad is not None and param.grad.device == CUDA, name
        torch.testing.assert_close(to_cpu(param.grad), cpu_param.grad, rtol=0, atol=0, msg=name)


def test_rpn_stage_training_on_cuda_gives_the_cpu_losses_and_gradients():
    model = tiny_rpn()
    reference = copy.deepcopy(model)
    batch = [
        {"image": image(96, 96), "gt_boxes": torch.tensor([[10.0, 10.0, 70.0, 80.0]]), "gt_classes": torch.tensor([2]),
         "image_classes": torch.tensor([2]), "ignore_boxes": torch.tensor([[60.0, 0.0, 96.0, 40.0]])},
        # no box in the crop: the negatives train a class of the image, drawn on the device
        {"image": image(96, 96, 1), "gt_boxes": torch.zeros(0, 4), "gt_classes": torch.zeros(0, dtype=torch.long),
         "image_classes": torch.tensor([4, 1])},
    ]
    torch.manual_seed(3)
    expected = reference.train()(batch)
    sum(expected.values()).backward()
    with fake_cuda():
        to_fake_cuda(model).train()
        torch.manual_seed(3)
        losses = model(batch)
        fake_backward(sum(losses.values()))
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc"} and float(to_cpu(losses["loss_rpn_loc"])) > 0
    assert_equal_outputs([losses], [expected])
    assert_equal_gradients(model, reference)


def test_the_class_specific_rpn_takes_the_classes_of_an_image_without_boxes_from_the_cpu():
    """A direct caller's CPU `image_classes`: the anchors of a box-less crop train classes drawn from them."""
    model = tiny_rpn().rpn
    reference = copy.deepcopy(model)
    args = dict(gt_boxes=[torch.zeros(0, 4)], gt_classes=[torch.zeros(0, dtype=torch.long)],
                image_classes=[torch.tensor([4, 1])], image_sizes=[(32, 48)])
    torch.manual_seed(4)
    expected = reference.label_and_sample_anchors(reference.anchor_generator((2, 3)), **args)
    with fake_cuda():
        to_fake_cuda(model)
        gt = {"gt_boxes": [torch.zeros(0, 4, device="cuda")],
              "gt_classes": [torch.zeros(0, dtype=torch.long, device="cuda")]}
        torch.manual_seed(4)
        found = model.label_and_sample_anchors(model.anchor_generator((2, 3)), **{**args, **gt})
    assert set(to_cpu(found[1]).flatten().tolist()) == {4, 1}  # 2 x 3 cells x 5 anchors drew both classes
    for value, reference_value in zip(found, expected):
        assert value.device == CUDA
        torch.testing.assert_close(to_cpu(value), reference_value, rtol=0, atol=0)


def test_rpn_stage_inference_on_cuda_gives_the_cpu_boxes_for_given_classes_its_own_best_and_a_pyramid():
    model = tiny_rpn(**{"LOC.CANDIDATE_CLASSES": 2}).eval()
    reference = copy.deepcopy(model)
    im = image(128, 160)
    big = F.interpolate(im[None].float(), scale_factor=1.5, mode="bilinear").round().byte()[0]
    batch = [
        {"image": im, "height": 256, "width": 320, "classes": [3, 0], "pyramid": [im, big]},
        {"image": image(96, 128, 2), "height": 96, "width": 128, "classes": [1], "pyramid": [image(96, 128, 2), big]},
    ]
    own = [{"image": im, "height": 128, "width": 160}]  # no classes: the RPN's two best
    expected = reference(batch), reference(own), reference(batch[:1] + [{**own[0], "classes": [2]}])
    with torch.no_grad():  # the RPN's boxes for classes given as a CPU tensor, as a direct caller may give them
        expected_direct = reference.rpn.class_boxes(*reference.features([im]), [torch.tensor([4, 1])])
    with fake_cuda():
        to_fake_cuda(model)
        found = model(batch), model(own), model(batch[:1] + [{**own[0], "classes": [2]}])
        best = best_per_class(found[0][0], image_size=(256, 320))
        with torch.no_grad():
            direct = model.rpn.class_boxes(*model.features([im]), [torch.tensor([4, 1])])
    assert_equal_outputs(direct, expected_direct)
    for result, reference_result in zip(found, expected):
        assert_equal_outputs(result, reference_result)
    assert all(len(result["boxes"]) > 0 for results in found for result in results)
    for value, reference_value in zip(best, best_per_class(expected[0][0], image_size=(256, 320))):
        assert value.device == CUDA
        torch.testing.assert_close(to_cpu(value), reference_value, rtol=0, atol=0)


def rcnn_inputs():
    first = image(40, 50, 3)
    return [
        {"image": first, "rois": torch.tensor([[4.0, 4, 30, 30], [0, 0, 50, 40]]),
         "gt_boxes": torch.tensor([[5.0, 5, 30, 30]]), "gt_classes": torch.tensor([1])},
        {"image": image(30, 44, 4), "rois": torch.tensor([[0.0, 0, 8, 8]]), "gt_boxes": torch.zeros(0, 4),
         "gt_classes": torch.zeros(0, dtype=torch.long)},
    ]


def test_rcnn_stage_training_on_cuda_gives_the_cpu_losses_and_gradients():
    model = make_localizer(num_classes=3).train()
    reference = copy.deepcopy(model)
    expected = reference(rcnn_inputs())
    sum(expected.values()).backward()
    with fake_cuda():
        losses = to_fake_cuda(model)(rcnn_inputs())
        fake_backward(sum(losses.values()))
    assert float(to_cpu(losses["loss_box_reg"])) > 0  # the foreground RoI's regression ran
    assert_equal_outputs([losses], [expected])
    assert_equal_gradients(model, reference)


def test_rcnn_stage_inference_on_cuda_in_chunks_gives_the_cpu_scores_and_boxes():
    model = make_localizer(num_classes=3, crops_per_forward=2).eval()
    reference = copy.deepcopy(model)
    original = image(40, 50, 5)
    batch = [
        {"original": original, "image": original[:, :10], "proposals": torch.tensor([[0.0, 0, 20, 20], [10, 5, 40, 35],
         [2, 3, 48, 39]]), "proposal_labels": torch.tensor([2, 0, 1])},
        {"image": image(30, 30, 6), "proposals": torch.zeros(0, 4),
         "proposal_labels": torch.zeros(0, dtype=torch.long)},
    ]
    boxes = [torch.tensor([[1.0, 2.0, 30.0, 25.0]]), torch.tensor([[0.0, 0.0, 12.0, 30.0]])]  # CPU boxes: moved
    expected = reference(batch), reference.crops([original, batch[1]["image"]], boxes)
    with fake_cuda():
        found = to_fake_cuda(model)(batch), model.crops([original, batch[1]["image"]], boxes)
    assert_equal_outputs(found[0], expected[0])
    assert found[1].device == CUDA and torch.equal(to_cpu(found[1]), expected[1])
    assert len(found[0][0]["boxes"]) == 3 and len(found[0][1]["boxes"]) == 0


def test_the_two_stage_localizer_on_cuda_gives_the_cpu_classes_boxes_and_scores():
    """RPN, R-CNN re-scoring, the best box per class and the system's own ranking of its classes."""
    rpn = tiny_rpn(**{"LOC.CANDIDATE_CLASSES": 2})
    rcnn = make_localizer(num_classes=5)
    inputs = [{"image": image(96, 128, 7), "original": image(96, 128, 7), "height": 96, "width": 128, "image_id": 1},
              {"image": image(64, 64, 8), "original": image(128, 128, 9), "height": 128, "width": 128, "image_id": 2}]
    cpu = [copy.deepcopy(rpn), copy.deepcopy(rcnn)]
    expected = Localizer(rpn=cpu[0], rcnn=cpu[1]).eval()(inputs)
    with fake_cuda():
        to_fake_cuda(rpn), to_fake_cuda(rcnn)
        found = Localizer(rpn=rpn, rcnn=rcnn).eval()(inputs)
    assert_equal_outputs(found, expected)
    assert [len(r["classes"]) for r in found] == [2, 2]
