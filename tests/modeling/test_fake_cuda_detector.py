"""CUDA placement of the detector without a GPU (tests/fake_cuda.py): its training step (forward, the four losses,
backward), its inference, plain and with every Appendix B add-on (global context, box refinement, box voting,
multi-scale maxout, flip), an ensemble, and inference under autocast, run on fake cuda tensors. Any tensor that the
package makes on the CPU beside cuda ones fails the run; the values must equal a CPU run of the same weights exactly
(the fake device computes with the CPU kernels; RoIAlign is torchvision's kernel on both, as on a GPU), and so must
the gradients, which shows that the whole graph ran."""

import copy

import pytest
import torch
import torch.nn.functional as F
from fake_cuda import (
    CUDA,
    CudaTagged,
    DeviceMixError,
    cuda_amp_available,
    fake_backward,
    fake_cuda,
    to_cpu,
    to_fake_cuda,
)
from test_detector import make_batch, tiny_config

from detectron_res.config import merge_overrides
from detectron_res.layers import ROIPooler
from detectron_res.modeling import DetectorEnsemble, TestTimeAugmentation, build_model
from detectron_res.modeling.roi_heads import res5_head

ADDONS = TestTimeAugmentation(scales=(48, 64, 96), reference_size=32, flip=True, refine_nms_thresh=0.3,
                              vote_iou_thresh=0.5)


# ------------------------------------------------------------------------------------------- the fake device itself
def test_the_fake_device_refuses_a_cpu_tensor_beside_a_cuda_one_and_computes_the_real_values():
    with fake_cuda() as mode:
        x = torch.tensor([1.0, 2.0, 3.0], device="cuda")
        assert isinstance(x, CudaTagged) and x.device == CUDA
        checked = mode.checked_by_fake
        y = x * torch.tensor(2.0) + 1  # a 0-dim CPU tensor beside cuda ones: allowed, as on a GPU
        assert y.device == CUDA and to_cpu(y).tolist() == [3.0, 5.0, 7.0]
        assert mode.checked_by_fake == checked + 1  # that mix was judged by FakeTensorMode's rules
        assert torch.zeros(2).device.type == "cpu"  # a factory without a device makes a CPU tensor
        with pytest.raises(DeviceMixError, match=r"aten.add.Tensor mixes devices: cuda\(3,\), cpu\(3,\)"):
            x + torch.ones(3)
        with pytest.raises(DeviceMixError, match="aten.index.Tensor"):  # CUDA copies CPU indices; refused here
            x[torch.tensor([0, 2])]
        assert to_cpu(x[x > 1.5]).tolist() == [2.0, 3.0]  # data-dependent shapes run on the real values
        assert x.sum().item() == 6.0 and x.tolist() == [1.0, 2.0, 3.0]
        with pytest.raises(TypeError, match="can't convert cuda:0 device type tensor to numpy"):
            x.numpy()
        assert x.cpu().numpy().tolist() == [1.0, 2.0, 3.0] and x.cpu().device.type == "cpu"


def test_fake_backward_gives_the_gradients_of_the_engine_broadcasts_included():
    with fake_cuda():
        w = torch.tensor([1.0, 2.0, 3.0], device="cuda", requires_grad=True)
        b = torch.tensor(0.5, device="cuda", requires_grad=True)
        x = torch.tensor([[1.0, 0.0, 2.0], [3.0, 1.0, -1.0]], device="cuda")
        fake_backward(((w * x + b) ** 2).sum())
        # d/dw = sum over rows of 2 (w x + b) x; d/db = sum of 2 (w x + b) over the 6 entries
        # w x + b = [[1.5, 0.5, 6.5], [3.5, 2.5, -2.5]]
        assert w.grad.device == CUDA
        assert to_cpu(w.grad).tolist() == [2 * (1.5 * 1 + 3.5 * 3), 2 * (0.5 * 0 + 2.5 * 1), 2 * (6.5 * 2 - 2.5 * -1)]
        assert to_cpu(b.grad).item() == 2 * (1.5 + 0.5 + 6.5 + 3.5 + 2.5 - 2.5)


# ------------------------------------------------------------------------------------------------------ the detector
def model_and_cpu_copy(*overrides: str):
    """A tiny detector and a CPU copy of it with the settings that a cuda model picks: the pooler's kernel
    (torchvision's), NCHW images and all RoIs in one res5 pass."""
    torch.manual_seed(0)
    model = build_model(merge_overrides(tiny_config(), overrides))
    reference = copy.deepcopy(model)
    reference.roi_heads.pooler.roi_align_kernel = "torchvision"
    reference.channels_last, reference.roi_heads.inference_chunk = False, 0
    return model, reference


def assert_same_detections(found, expected):
    assert len(found) == len(expected)
    for image, reference in zip(found, expected):
        assert all(value.device == CUDA for value in image.values())
        assert set(image) == set(reference) and len(reference["boxes"]) > 0
        for key in reference:
            torch.testing.assert_close(to_cpu(image[key]), reference[key], rtol=0, atol=0)


def test_a_training_step_on_cuda_gives_the_cpu_losses_and_gradients():
    """With global context, whose whole-image RoIs add to the plain path (the same code up to the predictor)."""
    model, reference = model_and_cpu_copy("MODEL.ROI_HEADS.GLOBAL_CONTEXT=true")
    batch = make_batch()  # CPU tensors, as the data loader gives them: the model moves them
    torch.manual_seed(1)  # the anchor and RoI samplers draw from the generator
    expected = reference.train()(batch)
    sum(expected.values()).backward()
    with fake_cuda():
        to_fake_cuda(model).train()
        torch.manual_seed(1)
        losses = model(batch)
        assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}
        assert all(value.device == CUDA for value in losses.values())
        fake_backward(sum(losses.values()))
    for name, value in expected.items():
        torch.testing.assert_close(to_cpu(losses[name]), value, rtol=0, atol=0)
    for (name, param), (_, cpu_param) in zip(model.named_parameters(), reference.named_parameters()):
        assert param.grad is not None and param.grad.device == CUDA, name
        torch.testing.assert_close(to_cpu(param.grad), cpu_param.grad, rtol=0, atol=0, msg=name)


def test_plain_inference_on_cuda_gives_the_cpu_detections():
    model, reference = model_and_cpu_copy()
    batch = make_batch()
    expected = reference.eval()(batch)
    with fake_cuda():
        found = to_fake_cuda(model).eval()(batch)
    assert_same_detections(found, expected)


# the trunk's input strides for make_batch's padded (2, 3, 80, 96) batch
NCHW, NHWC = (3 * 80 * 96, 80 * 96, 96, 1), (3 * 80 * 96, 1, 96 * 3, 3)


def record_trunk_strides_and_res5_batches(model):
    """Two lists that fill at each call: the strides of the trunk's input and the RoI count of each res5 pass."""
    strides, batches = [], []
    model.backbone.register_forward_pre_hook(lambda module, args: strides.append(to_cpu(args[0]).stride()))
    model.roi_heads.res5.register_forward_pre_hook(lambda module, args: batches.append(len(args[0])))
    return strides, batches


def test_a_model_built_for_the_cpu_follows_the_device_it_is_moved_to(monkeypatch):
    """MODEL.DEVICE=cpu, then moved (as after loading a checkpoint, or in the Predictor): on cuda the trunk gets
    NCHW images and res5 all 64 RoIs (32 per image) at once; on the CPU, channels-last images and RoI chunks of the
    byte budget, here 10 RoIs' pooled float32 features (R18 width 8's res4 has 32 channels, pooled 14 x 14)."""
    monkeypatch.setattr(res5_head, "INFERENCE_CHUNK_BYTES", 10 * 32 * 14 * 14 * 4)
    model, _ = model_and_cpu_copy()
    strides, batches = record_trunk_strides_and_res5_batches(model.eval())
    model(make_batch())
    assert strides == [NHWC] and batches == [10, 10, 10, 10, 10, 10, 4]
    strides.clear(), batches.clear()
    model.train()(make_batch())  # training: NCHW, and the 2 x 32 sampled RoIs in one pass (BatchNorm sees them all)
    assert strides == [NCHW] and batches == [64]
    strides.clear(), batches.clear()
    with fake_cuda():
        to_fake_cuda(model).eval()(make_batch())
    assert strides == [NCHW] and batches == [64]


def test_explicit_channels_last_and_chunks_are_kept_on_either_device():
    model, _ = model_and_cpu_copy()
    strides, batches = record_trunk_strides_and_res5_batches(model.eval())
    model.channels_last, model.roi_heads.inference_chunk = False, 0
    model(make_batch())
    assert strides == [NCHW] and batches == [64]
    strides.clear(), batches.clear()
    model.channels_last, model.roi_heads.inference_chunk = True, 24
    with fake_cuda():
        to_fake_cuda(model)(make_batch())
    assert strides == [NHWC] and batches == [24, 24, 16]


def with_pyramid(batch, scales):
    """The inputs with their "pyramid" images: each image resized to each shorter side of `scales`."""
    for x in batch:
        image = x["image"]
        shorter = min(image.shape[-2:])
        x["pyramid"] = [
            F.interpolate(image[None].float(), scale_factor=s / shorter, mode="bilinear")[0].round().to(torch.uint8)
            for s in scales
        ]
    return batch


def test_inference_with_every_addon_on_cuda_gives_the_cpu_detections():
    """Global context, multi-scale maxout over three scales, flip, box refinement and box voting at once."""
    model, reference = model_and_cpu_copy("MODEL.ROI_HEADS.GLOBAL_CONTEXT=true")
    model.test_time = reference.test_time = ADDONS
    batch = with_pyramid(make_batch(), ADDONS.scales)
    expected = reference.eval()(batch)
    with fake_cuda():
        found = to_fake_cuda(model).eval()(batch)
    assert_same_detections(found, expected)


def test_an_ensemble_on_shared_proposals_on_cuda_gives_the_cpu_detections():
    first, first_cpu = model_and_cpu_copy()
    second, second_cpu = model_and_cpu_copy("MODEL.ROI_HEADS.GLOBAL_CONTEXT=true")
    second.test_time = second_cpu.test_time = TestTimeAugmentation(refine_nms_thresh=0.3, vote_iou_thresh=0.5)
    batch = make_batch()
    expected = DetectorEnsemble(models=[first_cpu, second_cpu], shared_proposals=True).eval()(batch)
    with fake_cuda():
        ensemble = DetectorEnsemble(models=[to_fake_cuda(first), to_fake_cuda(second)], shared_proposals=True)
        found = ensemble.eval()(batch)
    assert_same_detections(found, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_inference_under_cuda_autocast_runs_the_trunk_in_that_dtype_and_keeps_boxes_float32(monkeypatch, dtype):
    cuda_amp_available(monkeypatch)
    model, _ = model_and_cpu_copy()
    model.inference_dtype = dtype
    seen = {}

    def record(module, args, out):
        seen["conv1"] = out.dtype

    model.backbone.conv1.register_forward_hook(record)
    with fake_cuda():
        found = to_fake_cuda(model).eval()(make_batch())
    assert seen["conv1"] == dtype  # torch.autocast("cuda") reached the cuda tensors
    for image in found:
        assert image["boxes"].device == CUDA and image["boxes"].dtype == torch.float32
        assert image["scores"].dtype == torch.float32 and len(image["boxes"]) > 0


@pytest.mark.parametrize("kind, kernel", [("ROIAlign", "bag"), ("ROIAlign", "auto"), ("ROIPool", "auto")])
def test_the_roi_poolers_on_cuda_give_the_cpu_features(kind, kernel):
    """The embedding-bag RoIAlign (MODEL.ROI_HEADS.ROI_ALIGN_KERNEL=bag also on a GPU), torchvision's and RoIPool."""
    pooler = ROIPooler(kind=kind, output_size=4, spatial_scale=0.5, sampling_ratio=0, roi_align_kernel=kernel)
    features = torch.rand(2, 3, 10, 12, generator=torch.Generator().manual_seed(0))
    boxes = [torch.tensor([[1.0, 2.0, 15.0, 17.0], [0.0, 0.0, 23.5, 19.0]]), torch.tensor([[4.0, 3.0, 9.0, 30.0]])]
    reference = ROIPooler(kind=kind, output_size=4, spatial_scale=0.5, sampling_ratio=0,
                          roi_align_kernel="torchvision" if kernel == "auto" else kernel)
    expected = reference(features, boxes)
    with fake_cuda():
        found = pooler(features.to("cuda"), [b.to("cuda") for b in boxes])
    assert found.device == CUDA and found.shape == (3, 3, 4, 4)
    torch.testing.assert_close(to_cpu(found), expected, rtol=0, atol=0)
