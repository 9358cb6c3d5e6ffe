"""CUDA placement of the engine without a GPU (tests/fake_cuda.py): a step of the Trainer itself under
`torch.autocast("cuda")` (float16 with a GradScaler), the export wrapper's forward on a cuda image, and
the Predictor of a cuda model (its numpy outputs come back through `.cpu()`). A tensor made on the CPU beside cuda
ones fails the run."""

import copy
import itertools

import numpy as np
import torch
from fake_cuda import CUDA, cuda_amp_available, fake_cuda, patched_backward, to_cpu, to_fake_cuda
from test_exportable_detector import CONFIG, EXAMPLE_SIZE, random_image, tiny_detector

from detectron_res.config import load_config
from detectron_res.data.build import build_test_mapper
from detectron_res.engine.export import ExportableDetector
from detectron_res.engine.predictor import Predictor
from detectron_res.engine.trainer import Trainer
from detectron_res.modeling import build_model

# a narrow shapes_r18 detector (width 8) with few proposals and RoIs, for the training step
SMALL = ("MODEL.BACKBONE.WIDTH=8", "MODEL.RPN.POST_NMS_TOPK_TRAIN=64", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE=32")


def training_batch():
    images = [random_image((64, 96), seed=1), random_image((80, 64), seed=2)]
    images[0][:, 8:40, 8:40] = 230
    return [
        {"image": images[0], "height": 64, "width": 96, "gt_boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]),
         "gt_classes": torch.tensor([1])},
        {"image": images[1], "height": 80, "width": 64, "gt_boxes": torch.zeros(0, 4),
         "gt_classes": torch.zeros(0, dtype=torch.int64)},
    ]


def test_a_trainer_step_under_cuda_autocast_casts_the_trunk_and_steps_the_weights(monkeypatch):
    """float16 with a GradScaler (bfloat16 takes the same autocast call, without the scaler)."""
    dtype = torch.float16
    cuda_amp_available(monkeypatch)
    model = tiny_detector(*SMALL).train()
    seen = {}

    def record(module, args, out):
        seen["conv1"] = out.dtype

    model.backbone.conv1.register_forward_hook(record)
    before = model.roi_heads.predictor.cls_score.weight.detach().clone()
    with fake_cuda(), patched_backward():
        to_fake_cuda(model)
        scaler = torch.amp.GradScaler("cuda")
        trainer = Trainer(
            model=model, data_loader=itertools.repeat(training_batch()), max_iter=1, amp_dtype=dtype,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), grad_scaler=scaler,
        )
        trainer.train()
        state = trainer.state_dict()
    assert trainer.completed and seen["conv1"] == dtype  # the Trainer's autocast reached the cuda tensors
    assert 0 < trainer.storage.latest("total_loss") < 10
    weight = model.roi_heads.predictor.cls_score.weight
    assert weight.device == CUDA and weight.grad.device == CUDA and weight.grad.dtype == torch.float32
    assert not torch.equal(to_cpu(weight), before)  # the optimizer stepped
    # one step without an overflow: the scale stays, the growth tracker counts it
    assert state["grad_scaler"]["scale"] == 2.0**16 and state["grad_scaler"]["_growth_tracker"] == 1


def test_the_export_wrapper_on_a_cuda_image_gives_the_cpu_detections():
    detector = ExportableDetector(model=tiny_detector("MODEL.ROI_HEADS.GLOBAL_CONTEXT=true"))  # its whole-image RoI too
    reference = copy.deepcopy(detector)
    reference.model.channels_last = False  # the NCHW images that the cuda model's trunk gets
    image = random_image(EXAMPLE_SIZE, seed=0)
    with torch.no_grad():
        expected = reference(image)
        with fake_cuda():
            found = to_fake_cuda(detector)(image.to("cuda"))
    assert len(expected[0]) > 0
    for value, reference_value in zip(found, expected):
        assert value.device == CUDA
        torch.testing.assert_close(to_cpu(value), reference_value, rtol=0, atol=0)


def test_the_predictor_of_a_cuda_model_gives_the_cpu_model_s_numpy_detections():
    cfg = load_config(CONFIG, ["MODEL.DEVICE=cpu", *SMALL, "INPUT.MIN_SIZE_TEST=96", "INPUT.MAX_SIZE_TEST=128"])
    torch.manual_seed(0)
    model = build_model(cfg)
    model.roi_heads.pooler.roi_align_kernel = "torchvision"  # the kernel a cuda model picks, for the CPU reference
    names = ["circle", "square", "triangle"]
    cpu_model = copy.deepcopy(model)
    cpu_model.channels_last, cpu_model.roi_heads.inference_chunk = False, 0  # as the cuda model runs
    reference = Predictor(cpu_model, mapper=build_test_mapper(cfg), class_names=names)
    image = random_image((100, 120), seed=3).permute(1, 2, 0).numpy()  # (H, W, 3) uint8 RGB
    expected = reference(image)
    with fake_cuda():
        found = Predictor(to_fake_cuda(model), mapper=build_test_mapper(cfg), class_names=names)(image)
    assert len(expected["labels"]) > 0 and found["class_names"] == expected["class_names"]
    for key in ("boxes", "scores", "labels"):
        assert isinstance(found[key], np.ndarray) and found[key].dtype == expected[key].dtype
        np.testing.assert_array_equal(found[key], expected[key])
