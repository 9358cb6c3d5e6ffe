"""Export of the detector's plain inference path to TorchScript and ONNX (`tools/export.py`, docs/tools.md).

`ExportableDetector` wraps a `FasterRCNN` as a module of one image in, (boxes, scores, labels) out, and runs the
steps of `FasterRCNN.inference` with the model's own modules (`normalize`, the trunk, the RPN's head and anchors,
`rpn.select_proposals`, the RoI pooler, res5 and the box predictor, `postprocess.per_class_nms`), written so that a
trace keeps every size that depends on the image or on the data: the padding to `size_divisibility`, the anchors,
the RPN's top-k count, the clipping limits and the RoI, proposal and detection counts are computed in the graph,
not taken from the example image. Its input is one uint8 (or float) (3, h, w) RGB image already resized to the network's
input size, as the test mapper (`DatasetMapper.map_image`) produces it; the model does not resize (the mapper's
OpenCV resize is not a torch operation), so its boxes are in that image's pixels: multiplied by (W / w, H / h),
clipped and without the boxes that become empty, they are `FasterRCNN.inference`'s in the original image's. The
ONNX model's input has the example's dtype (uint8 from the tool); a TorchScript module also takes float images.

Not exported (refused by name): the test-time add-ons (TEST.MULTI_SCALE, TEST.FLIP, TEST.BOX_REFINEMENT,
TEST.BOX_VOTING), inference under autocast (TEST.AMP) and compiled modules (TEST.COMPILE).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..modeling.detector import FasterRCNN
from ..modeling.rpn.rpn import select_proposals
from ..postprocess import per_class_nms
from ..utils import atomic_write
from ..utils.io import DiskFullError

FORMATS = ("torchscript", "onnx")
ONNX_OPSET = 17  # RoiAlign's half-pixel mode (ROIAlignV2) needs 16; torchvision's NonMaxSuppression 11
INPUT_NAMES = ["image"]
OUTPUT_NAMES = ["boxes", "scores", "labels"]
INSTALL_HINT = "pip install 'detectron_res[export]'"


def export_blockers(model: FasterRCNN) -> list[str]:
    """The config keys of the settings of `model` that the export does not support; [] when it can be exported."""
    test_time = model.test_time
    blockers = []
    if test_time.scales:
        blockers.append("TEST.MULTI_SCALE.ENABLED")
    if test_time.flip:
        blockers.append("TEST.FLIP")
    if test_time.refine_nms_thresh is not None:
        blockers.append("TEST.BOX_REFINEMENT.ENABLED")
    if test_time.vote_iou_thresh is not None:
        blockers.append("TEST.BOX_VOTING.ENABLED")
    if model.inference_dtype is not None:
        blockers.append("TEST.AMP.ENABLED")
    if any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules()):
        blockers.append("TEST.COMPILE")
    return blockers


def check_exportable(model: FasterRCNN) -> None:
    """Raises ValueError naming the config keys of `model`'s settings that the export does not support."""
    blockers = export_blockers(model)
    if blockers:
        raise ValueError(
            f"Only the plain inference path is exported, and this model has {', '.join(blockers)} on: export it "
            f"with {' '.join(f'{key}=false' for key in blockers)} (the add-ons stay available to the eager model)"
        )


class ExportableDetector(nn.Module):
    """One image in, its detections out: the plain inference path of a `FasterRCNN`, traceable with
    `torch.jit.trace` and exportable to ONNX with dynamic height and width.

    Input: uint8 or float (3, h, w) RGB image on the model's device, already resized to the network's input size.
    Output: boxes float32 (D, 4) XYXY in that image's pixels, scores float32 (D,), labels int64 (D,) class indices,
    by descending score: `FasterRCNN.inference` of {"image": image, "height": h, "width": w} to float rounding.
    """

    def __init__(self, *, model: FasterRCNN):
        """
        Args:
            model: the detector, in any mode. A copy is wrapped, in eval mode and without gradients, whose RoIAlign
                runs torchvision's kernel (`ROIPooler.roi_align_kernel`; the CPU's embedding-bag kernel has no ONNX
                form and sizes its work from the data, which a trace would freeze); `model` is left as it is.
        Raises:
            ValueError: `model` has settings the export does not support (`export_blockers`).
        """
        super().__init__()
        check_exportable(model)
        model = copy.deepcopy(model).eval().requires_grad_(False)  # outputs without autograd history
        model.roi_heads.pooler.roi_align_kernel = "torchvision"
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        features, limits = self.features(image)
        proposals = self.propose(features, limits)
        return self.detect(features, proposals, limits)

    def features(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """`FasterRCNN.prepare` for one image: its res4 features (1, C4, H/16, W/16) and the float32 limits
        (w, h, w, h) of its boxes."""
        # Under torch.jit.trace, image.shape holds 0-dim tensors and the arithmetic on them is recorded, so the
        # padding and everything after it follow the image's size; `torch._shape_as_tensor` gives the size as a
        # tensor in both modes (ONNX: Shape), for the clipping limits. That tensor is always on the CPU: moved to
        # the image's device, or clipping boxes on a GPU would mix devices.
        model = self.model
        limits = torch._shape_as_tensor(image)[[2, 1, 2, 1]].to(device=image.device, dtype=torch.float32)
        x = model.normalize(image)  # (3, h, w) float, the trunk's channel order
        divisor = model.size_divisibility
        if divisor > 1:  # zero padding at the bottom and right, as `structures.batch_images`
            pad_h = (divisor - image.shape[-2] % divisor) % divisor
            pad_w = (divisor - image.shape[-1] % divisor) % divisor
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return model.backbone(model.trunk_batch(x[None])), limits  # (1, 3, H, W), the eager model's layout

    def propose(self, features: Tensor, limits: Tensor) -> Tensor:
        """`RPN.find_top_proposals` for one image: (P, 4) proposals in input pixels, by descending objectness."""
        rpn = self.model.rpn
        objectness, deltas = rpn.head(features)  # (1, A, Hf, Wf), (1, 4A, Hf, Wf)
        anchors = rpn.anchor_generator((objectness.shape[-2], objectness.shape[-1]))  # (Hf*Wf*A, 4)
        scores = objectness[0].permute(1, 2, 0).reshape(-1)  # (A, Hf, Wf) -> (Hf, Wf, A) -> (Hf*Wf*A,)
        # (4A, Hf, Wf) -> (A, 4, Hf, Wf) -> (Hf, Wf, A, 4) -> (Hf*Wf*A, 4)
        deltas = deltas[0].unflatten(0, (-1, 4)).permute(2, 3, 0, 1).reshape(-1, 4)
        proposals, _ = select_proposals(
            scores, deltas, anchors, clip=lambda boxes: _clip(boxes, limits), box_coder=rpn.box_coder,
            pre_nms_topk=rpn.pre_nms_topk[1], post_nms_topk=rpn.post_nms_topk[1], nms_thresh=rpn.nms_thresh,
            min_size=rpn.min_size,
        )
        return proposals

    def detect(self, features: Tensor, proposals: Tensor, limits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`Res5ROIHeads` at inference for one image: res5 on each proposal's pooled res4 features (and the whole
        image's with global context), class probabilities, class-specific boxes, per-class NMS, top-k."""
        heads = self.model.roi_heads
        predictor = heads.predictor
        rois = torch.cat([torch.zeros_like(proposals[:, :1]), proposals], dim=1)  # (P, 5) [image 0, x1, y1, x2, y2]
        if heads.global_context:  # the whole image [0, 0, w, h] as a last RoI
            rois = torch.cat([rois, torch.cat([limits.new_zeros(3), limits[:2]])[None]])
        x = heads.res5(heads.pooler(features, rois)).mean(dim=(2, 3))  # (P, C4, S, S) -> (P, C5, S/2, S/2) -> (P, C5)
        if heads.global_context:  # (P, 2 C5): each RoI's feature and the image's
            x = torch.cat([x[:-1], x[-1:].expand_as(x[:-1])], dim=1)
        logits, deltas = predictor(x)  # (P, K+1), (P, 4K)
        probs = F.softmax(logits, dim=1)[:, : predictor.num_classes]  # background dropped
        boxes = predictor.box_coder.decode_single(deltas, proposals)  # (P, 4K)
        boxes = _clip(boxes.reshape(-1, 4), limits).reshape(-1, predictor.num_classes, 4)  # (P, K, 4)
        return per_class_nms(
            boxes,
            probs,
            score_thresh=predictor.score_thresh,
            nms_thresh=predictor.nms_thresh,
            max_detections=predictor.detections_per_image,
        )


def _clip(boxes: Tensor, limits: Tensor) -> Tensor:
    """(R, 4) XYXY boxes clipped to [0, w] x [0, h], `limits` = (w, h, w, h): torchvision's `clip_boxes_to_image`
    with the size as a tensor of the graph."""
    return torch.minimum(boxes.clamp(min=0), limits)


# ------------------------------------------------------------------------------------------------ export and check
def check_example(detector: ExportableDetector, example: Tensor) -> None:
    """Raises ValueError unless `example` is a (3, h, w) image on which the RPN proposes boxes: a trace records the
    path the example takes, and on an image without proposals the RoI pooler's shortcut for no RoIs would be
    recorded as the whole second stage."""
    if example.dim() != 3 or example.shape[0] != 3:
        raise ValueError(f"the export example must be one (3, h, w) image, got shape {tuple(example.shape)}")
    with torch.no_grad():
        proposals = detector.propose(*detector.features(example))
    if len(proposals) == 0:
        raise ValueError("the RPN proposes no box on the export example image: export with another image")


@contextlib.contextmanager
def _tracing_notices_silenced():
    """Silences what tracing prints about itself: torch.jit's deprecation notices (TorchScript stays what
    torch.jit.load and libtorch read) and the tracer's warnings, which here name only settings and shape checks
    recorded as constants (the decoder's 0.5, `len(rois) == 0` of the RoI pooler, torchvision's roi_align box
    check and batched_nms's choice of its traceable path), never a size of the example image; the tests run every
    exported model on images of other sizes. The ONNX exporter's notice that it is the TorchScript-based one, and
    its remark that advanced indexing with negative indices is wrong (the indices here come from nonzero), too."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*`torch\.jit")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*legacy TorchScript-based ONNX")
        warnings.filterwarnings("ignore", category=UserWarning, message=".*aten::index operator of advanced indexing")
        yield


def export_torchscript(
    detector: ExportableDetector, path: str | os.PathLike, *, example: Tensor
) -> torch.jit.ScriptModule:
    """Traces `detector` on the `example` image (see `check_example`) and saves the TorchScript module to `path`
    (`write_exported`). The file needs torch and torchvision to load (`import torchvision` registers its nms and
    roi_align ops), not this package; it runs on the device it was traced on."""
    check_example(detector, example)
    buffer = io.BytesIO()
    with _tracing_notices_silenced(), torch.no_grad():
        traced = torch.jit.trace(detector.eval(), (example,), check_trace=False)
        torch.jit.save(traced, buffer)
    write_exported(path, buffer.getvalue())
    return traced


def export_onnx(
    detector: ExportableDetector, path: str | os.PathLike, *, example: Tensor, opset: int = ONNX_OPSET
) -> None:
    """Exports `detector` to an ONNX file at `path` (`write_exported`), traced on the `example` image (see
    `check_example`), by torch's TorchScript-based exporter (`dynamo=False`, with torchvision's ONNX forms of nms and
    roi_align; the default torch.export-based exporter stops at the first branch on a data-dependent count, the RoI
    pooler's `len(rois) == 0`, where the tracer records the example's path). The input "image" has the dtype
    of `example` and the shape (3, height, width) with height and width dynamic; the outputs "boxes", "scores",
    "labels" have a dynamic detection count."""
    check_example(detector, example)
    buffer = io.BytesIO()
    with _tracing_notices_silenced(), torch.no_grad():
        torch.onnx.export(
            detector.eval(),
            (example,),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            dynamic_axes={
                "image": {1: "height", 2: "width"},
                **{name: {0: "detections"} for name in OUTPUT_NAMES},
            },
        )
    write_exported(path, buffer.getvalue())


def write_exported(path: str | os.PathLike, data: bytes) -> None:
    """Writes an exported model's bytes to `path` atomically (`utils.atomic_write`: parent folders created, an
    existing file replaced only once the new one is complete).

    Raises:
        OSError: the file cannot be written; the message names `path` (the export itself succeeded).
    """
    try:
        atomic_write(path, lambda stream: stream.write(data))
    except DiskFullError:
        raise  # one line naming the file, the space left and what was kept
    except OSError as error:
        reason = error.strerror or str(error)
        raise OSError(f"could not write the exported model to {path}: {reason}") from error


def import_onnxruntime():
    """The onnxruntime module, or an ImportError saying how to install it."""
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError(f"running ONNX files needs onnxruntime: {INSTALL_HINT}", name="onnxruntime") from error
    return onnxruntime


def onnx_runner(path: str | os.PathLike) -> Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]:
    """An onnxruntime CPU session of the exported file as a function of one (3, h, w) image tensor."""
    onnxruntime = import_onnxruntime()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        outputs = session.run(OUTPUT_NAMES, {INPUT_NAMES[0]: image.cpu().numpy()})
        return tuple(torch.from_numpy(np.asarray(o)) for o in outputs)

    return run


def compare_detections(
    reference: tuple[Tensor, Tensor, Tensor], exported: tuple[Tensor, Tensor, Tensor]
) -> dict[str, float | int | bool]:
    """How far `exported` (boxes, scores, labels) is from `reference`: both detection counts, whether the labels
    agree one by one, and the largest box coordinate (pixels) and score differences (NaN unless the labels agree;
    0 for no detections)."""
    (ref_boxes, ref_scores, ref_labels), (boxes, scores, labels) = (
        [t.detach().cpu() for t in outputs] for outputs in (reference, exported)
    )
    same = len(ref_labels) == len(labels) and torch.equal(ref_labels.long(), labels.long())

    def largest_difference(a: Tensor, b: Tensor) -> float:
        if not same:
            return float("nan")
        return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0

    return {
        "reference_detections": len(ref_labels),
        "exported_detections": len(labels),
        "same_labels": same,
        "max_box_diff": largest_difference(ref_boxes, boxes),
        "max_score_diff": largest_difference(ref_scores, scores),
    }


def detections_agree(comparison: dict, *, box_tol: float, score_tol: float) -> bool:
    """Whether a `compare_detections` result has the same labels and boxes and scores within the tolerances."""
    return bool(
        comparison["same_labels"]
        and comparison["max_box_diff"] <= box_tol
        and comparison["max_score_diff"] <= score_tol
    )


def eager_detections(model: FasterRCNN, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`model`'s own inference on one input-size image, as (boxes, scores, labels) in that image's pixels."""
    height, width = int(image.shape[-2]), int(image.shape[-1])
    was_training = model.training
    model.eval()
    try:
        (result,) = model.inference([{"image": image, "height": height, "width": width}])
    finally:
        model.train(was_training)
    return result["boxes"], result["scores"], result["labels"]
