"""`build_*(cfg)`: the one place where the model's modules read the config."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torchvision.models.detection._utils import BoxCoder

from ..layers import ROIPooler, get_norm
from ..utils import comm
from .backbone import ResNetTrunk, WeightLoadReport, build_res5, load_resnet_weights, read_resnet_weights
from .detector import FasterRCNN
from .roi_heads import FastRCNNOutputLayers, Res5ROIHeads
from .rpn import RPN, AnchorGenerator, RPNHead
from .test_time import TestTimeAugmentation
from .weight_formats import settings_problems

logger = logging.getLogger(__name__)


def build_backbone(cfg) -> ResNetTrunk:
    b = cfg.MODEL.BACKBONE
    return ResNetTrunk(
        depth=b.DEPTH,
        width=b.WIDTH,
        norm_layer=get_norm(b.NORM, gn_groups=b.GN_GROUPS),
        freeze_at=b.FREEZE_AT,
        stride_in_1x1=b.STRIDE_IN_1X1,
    )


def rpn_settings(cfg, *, stride: int) -> dict:
    """The MODEL.RPN options shared by the detector's RPN and the localization system's class-specific RPN: anchors,
    box coding, anchor matching and sampling, NMS and the losses (not the head, not the top-k)."""
    r = cfg.MODEL.RPN
    return dict(
        anchor_generator=AnchorGenerator(
            sizes=r.ANCHOR_SIZES, aspect_ratios=r.ASPECT_RATIOS, stride=stride, offset=r.ANCHOR_OFFSET
        ),
        box_coder=BoxCoder(tuple(r.BBOX_REG_WEIGHTS)),
        positive_iou=r.POSITIVE_IOU,
        negative_iou=r.NEGATIVE_IOU,
        batch_size_per_image=r.BATCH_SIZE_PER_IMAGE,
        positive_fraction=r.POSITIVE_FRACTION,
        boundary_thresh=r.BOUNDARY_THRESH,
        nms_thresh=r.NMS_THRESH,
        min_size=r.MIN_SIZE,
        smooth_l1_beta=r.SMOOTH_L1_BETA,
        loss_weight=r.LOSS_WEIGHT,
    )


def build_rpn(cfg, *, in_channels: int, stride: int) -> RPN:
    r = cfg.MODEL.RPN
    settings = rpn_settings(cfg, stride=stride)
    head = RPNHead(
        in_channels=in_channels,
        head_channels=r.HEAD_CHANNELS or in_channels,
        num_anchors=settings["anchor_generator"].num_anchors,
    )
    return RPN(
        head=head,
        pre_nms_topk=(r.PRE_NMS_TOPK_TRAIN, r.PRE_NMS_TOPK_TEST),
        post_nms_topk=(r.POST_NMS_TOPK_TRAIN, r.POST_NMS_TOPK_TEST),
        **settings,
    )


def build_roi_heads(cfg, *, stride: int) -> Res5ROIHeads:
    b, h = cfg.MODEL.BACKBONE, cfg.MODEL.ROI_HEADS
    res5, res5_channels = build_res5(
        depth=b.DEPTH, width=b.WIDTH, norm_layer=get_norm(b.NORM, gn_groups=b.GN_GROUPS),
        stride_in_1x1=b.STRIDE_IN_1X1,
    )
    predictor = FastRCNNOutputLayers(
        in_channels=2 * res5_channels if h.GLOBAL_CONTEXT else res5_channels,
        num_classes=cfg.MODEL.NUM_CLASSES,
        box_coder=BoxCoder(tuple(h.BBOX_REG_WEIGHTS)),
        smooth_l1_beta=h.SMOOTH_L1_BETA,
        score_thresh=h.SCORE_THRESH_TEST,
        nms_thresh=h.NMS_THRESH_TEST,
        detections_per_image=h.DETECTIONS_PER_IMAGE,
        empty_boxes=h.EMPTY_BOXES,
    )
    return Res5ROIHeads(
        pooler=ROIPooler(
            kind=h.POOLER,
            output_size=h.POOLER_RESOLUTION,
            spatial_scale=1.0 / stride,
            sampling_ratio=h.POOLER_SAMPLING_RATIO,
            aligned=h.POOLER_ALIGNED,
        ),
        res5=res5,
        predictor=predictor,
        batch_size_per_image=h.BATCH_SIZE_PER_IMAGE,
        positive_fraction=h.POSITIVE_FRACTION,
        fg_iou_thresh=h.FG_IOU_THRESH,
        bg_iou_thresh_lo=h.BG_IOU_THRESH_LO,
        proposal_append_gt=h.PROPOSAL_APPEND_GT,
        global_context=h.GLOBAL_CONTEXT,
        inference_chunk=None,  # by the device it runs on: a model built on the CPU may be moved to a GPU
    )


def build_test_time(cfg) -> TestTimeAugmentation:
    """The test-time add-ons switched on under TEST (docs/addons.md)."""
    t = cfg.TEST
    return TestTimeAugmentation(
        scales=tuple(t.MULTI_SCALE.SCALES) if t.MULTI_SCALE.ENABLED else (),
        reference_size=t.MULTI_SCALE.REFERENCE_SIZE,
        flip=t.FLIP,
        refine_nms_thresh=t.BOX_REFINEMENT.NMS_THRESH if t.BOX_REFINEMENT.ENABLED else None,
        vote_iou_thresh=t.BOX_VOTING.IOU_THRESH if t.BOX_VOTING.ENABLED else None,
    )


def resolve_device(name: str) -> torch.device:
    """MODEL.DEVICE: "" picks CUDA when available, else the CPU. In a distributed job, "" and "cuda" mean this
    process's own GPU, cuda:LOCAL_RANK."""
    if not name:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"MODEL.DEVICE={name!r} but CUDA is not available; use MODEL.DEVICE=cpu")
    if device.type == "cuda" and device.index is None and comm.is_distributed():
        device = torch.device("cuda", comm.get_local_rank())
    return device


def build_model(cfg) -> FasterRCNN:
    """The detector of the config, with MODEL.BACKBONE.WEIGHTS loaded (not MODEL.WEIGHTS: the checkpointer
    loads whole-model checkpoints), on MODEL.DEVICE."""
    if cfg.MODEL.META_ARCHITECTURE != "FasterRCNN":
        raise ValueError(
            f"MODEL.META_ARCHITECTURE={cfg.MODEL.META_ARCHITECTURE} is the localization system, not a detector: train "
            "it with tools/train_loc.py and run it with tools/localize.py (docs/localization.md)"
        )
    device = resolve_device(cfg.MODEL.DEVICE)
    backbone = build_backbone(cfg)
    rpn = build_rpn(cfg, in_channels=backbone.out_channels, stride=backbone.stride)
    roi_heads = build_roi_heads(cfg, stride=backbone.stride)
    if cfg.MODEL.BACKBONE.WEIGHTS:
        load_backbone_weights(cfg, trunk=backbone, res5=roi_heads.res5)
    model = FasterRCNN(
        backbone=backbone,
        rpn=rpn,
        roi_heads=roi_heads,
        pixel_mean=cfg.MODEL.PIXEL_MEAN,
        pixel_std=cfg.MODEL.PIXEL_STD,
        input_format=cfg.INPUT.FORMAT,
        size_divisibility=cfg.INPUT.SIZE_DIVISIBILITY,
        test_time=build_test_time(cfg),
        channels_last=None,  # by the device it runs on, as the RoI chunks
        inference_dtype=inference_dtype(cfg.TEST.AMP, device=device),
    )
    return model.to(device)


def load_backbone_weights(cfg, *, trunk: nn.Module, res5: nn.Module) -> WeightLoadReport:
    """MODEL.BACKBONE.WEIGHTS into the trunk and res5, after checking the config against the settings the weights
    need (`check_weight_settings`); returns what was loaded, missing and unused."""
    source = cfg.MODEL.BACKBONE.WEIGHTS
    weights = read_resnet_weights(source, depth=cfg.MODEL.BACKBONE.DEPTH)
    check_weight_settings(cfg, weights.settings, source=f"MODEL.BACKBONE.WEIGHTS={source} ({weights.format})")
    return load_resnet_weights(trunk=trunk, res5=res5, state_dict=weights.state_dict, source=source)


def check_weight_settings(cfg, settings: Mapping[str, Any], *, source: str, strict: bool = True) -> None:
    """Compares the config with the settings weights were trained with (`weight_formats`: stride placement,
    channel order, pixel mean and std). Another PIXEL_MEAN is a warning (the features shift a little); any other
    difference makes the weights compute something else: a ValueError naming the keys, or with `strict=False` (the
    file cannot be sure, e.g. a detectron2 checkpoint) a warning.
    """
    values = {key: _config_value(cfg, key) for key in settings}
    mean = {k: v for k, v in settings.items() if k == "MODEL.PIXEL_MEAN"}
    for problem in settings_problems(values, mean):
        logger.warning("%s: %s", source, problem)
    problems = settings_problems(values, {k: v for k, v in settings.items() if k not in mean})
    if not problems:
        return
    message = f"{source} was trained with other settings than this config's: {'; '.join(problems)}"
    if strict:
        raise ValueError(f"{message}. Set those keys (e.g. on the command line) to use these weights")
    logger.warning("%s. Unless the weights were trained with this config's values, set those keys", message)


def _config_value(cfg, dotted_key: str) -> Any:
    node = cfg
    for part in dotted_key.split("."):
        node = node[part]
    return node


def compile_for_inference(model: FasterRCNN) -> FasterRCNN:
    """TEST.COMPILE: `torch.compile` the trunk and the res5 head in place (the state_dict keys stay), with
    inductor's freezing (the weights become constants of the compiled code: for a model that is not trained any
    more). The first images of each size wait for the compilation. See docs/benchmarks.md for what it gains."""
    for module in (model.backbone, model.roi_heads.res5):
        module.compile(options={"freezing": True})
    return model


def inference_dtype(amp_cfg, *, device: torch.device) -> torch.dtype | None:
    """TEST.AMP -> the autocast dtype of inference, or None for float32.

    Raises:
        ValueError: float16 on the CPU (autocast there supports bfloat16).
    """
    if not amp_cfg.ENABLED:
        return None
    if device.type == "cpu" and amp_cfg.DTYPE == "float16":
        raise ValueError("TEST.AMP.DTYPE=float16 needs CUDA; on the CPU use TEST.AMP.DTYPE=bfloat16")
    return getattr(torch, amp_cfg.DTYPE)


def count_parameters(module: nn.Module) -> int:
    """Weights of a module, frozen ones included: parameters plus FrozenBatchNorm's scale and shift, never
    running statistics. Equals torchvision's parameter count for the same network."""
    total = sum(p.numel() for p in module.parameters())
    for name, buffer in module.named_buffers():
        if name.rsplit(".", 1)[-1] in ("weight", "bias"):  # FrozenBatchNorm2d keeps its affine as buffers
            total += buffer.numel()
    return total
