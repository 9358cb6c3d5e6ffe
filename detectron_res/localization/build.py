"""`build_*(cfg)` of the localization pipeline: the two stages' models, their loaders, the R-CNN stage's config."""

from __future__ import annotations

from pathlib import Path

from torch import nn
from torchvision.models.detection._utils import BoxCoder

from ..config import merge_overrides
from ..data.build import build_train_data_loader
from ..data.datasets.base import DetectionDataset
from ..data.loader import build_test_loader
from ..data.mapper import DatasetMapper
from ..layers import get_norm
from ..modeling.backbone import ResNetTrunk, build_res5
from ..modeling.build import build_backbone, load_backbone_weights, resolve_device, rpn_settings
from ..modeling.roi_heads import FastRCNNOutputLayers
from ..modeling.rpn.class_specific_rpn import ClassSpecificRPN, ClassSpecificRPNHead
from .class_predictions import TorchvisionClassifier
from .mappers import CenterCropTestMapper, LocCropMapper, OriginalImageMapper, RoIMapper
from .rcnn_stage import CLS_LOSSES, PerClassLogisticOutputs, RCNNLocalizer
from .rpn_stage import LocalizationRPN

RPN_FOLDER = "rpn"
RCNN_FOLDER = "rcnn"


def _load_backbone_weights(cfg, trunk: nn.Module, res5: nn.Module) -> None:
    if cfg.MODEL.BACKBONE.WEIGHTS:
        load_backbone_weights(cfg, trunk=trunk, res5=res5)


def build_class_specific_rpn(cfg, *, in_channels: int, stride: int) -> ClassSpecificRPN:
    """MODEL.RPN's options with a per-class head; the top-k are per class, at inference (the *_TEST keys)."""
    r = cfg.MODEL.RPN
    settings = rpn_settings(cfg, stride=stride)
    head = ClassSpecificRPNHead(
        in_channels=in_channels,
        head_channels=r.HEAD_CHANNELS or in_channels,
        num_anchors=settings["anchor_generator"].num_anchors,
        num_classes=cfg.MODEL.NUM_CLASSES,
    )
    return ClassSpecificRPN(
        head=head, pre_nms_topk=r.PRE_NMS_TOPK_TEST, post_nms_topk=r.POST_NMS_TOPK_TEST, **settings
    )


def build_localization_rpn(cfg) -> LocalizationRPN:
    """The RPN stage on MODEL.DEVICE, with MODEL.BACKBONE.WEIGHTS' trunk loaded (their layer4 and fc unused)."""
    backbone = build_backbone(cfg)
    _load_backbone_weights(cfg, backbone, nn.Module())
    model = LocalizationRPN(
        backbone=backbone,
        rpn=build_class_specific_rpn(cfg, in_channels=backbone.out_channels, stride=backbone.stride),
        pixel_mean=cfg.MODEL.PIXEL_MEAN,
        pixel_std=cfg.MODEL.PIXEL_STD,
        input_format=cfg.INPUT.FORMAT,
        size_divisibility=cfg.INPUT.SIZE_DIVISIBILITY,
        candidate_classes=cfg.LOC.CANDIDATE_CLASSES,
    )
    return model.to(resolve_device(cfg.MODEL.DEVICE))


def build_rcnn_localizer(cfg) -> RCNNLocalizer:
    """The R-CNN stage (a whole ResNet of MODEL.BACKBONE's depth, width and norm) on MODEL.DEVICE, with
    MODEL.BACKBONE.WEIGHTS loaded (their fc unused), and LOC.RCNN.CLS_LOSS's output layers: "sigmoid", the paper's
    per-class logistic outputs (C), or "softmax", Fast R-CNN's (C + 1)-way classifier; 4C box regressors in both."""
    b, r = cfg.MODEL.BACKBONE, cfg.LOC.RCNN
    norm = get_norm(b.NORM, gn_groups=b.GN_GROUPS)
    trunk = ResNetTrunk(
        depth=b.DEPTH, width=b.WIDTH, norm_layer=norm, freeze_at=b.FREEZE_AT, stride_in_1x1=b.STRIDE_IN_1X1
    )
    res5, channels = build_res5(depth=b.DEPTH, width=b.WIDTH, norm_layer=norm, stride_in_1x1=b.STRIDE_IN_1X1)
    _load_backbone_weights(cfg, trunk, res5)
    box_coder = BoxCoder(tuple(cfg.MODEL.ROI_HEADS.BBOX_REG_WEIGHTS))
    if r.CLS_LOSS not in CLS_LOSSES:
        raise ValueError(f"LOC.RCNN.CLS_LOSS must be one of {list(CLS_LOSSES)}, got {r.CLS_LOSS!r}")
    if r.CLS_LOSS == "sigmoid":
        predictor = PerClassLogisticOutputs(
            in_channels=channels, num_classes=cfg.MODEL.NUM_CLASSES, box_coder=box_coder,
            smooth_l1_beta=cfg.MODEL.ROI_HEADS.SMOOTH_L1_BETA,
        )
    else:
        predictor = FastRCNNOutputLayers(
            in_channels=channels,
            num_classes=cfg.MODEL.NUM_CLASSES,
            box_coder=box_coder,
            smooth_l1_beta=cfg.MODEL.ROI_HEADS.SMOOTH_L1_BETA,
            score_thresh=0.0,  # unused: the R-CNN stage re-scores given boxes, it does not select detections
            nms_thresh=1.0,
            detections_per_image=1,
        )
    model = RCNNLocalizer(
        trunk=trunk,
        res5=res5,
        predictor=predictor,
        pixel_mean=cfg.MODEL.PIXEL_MEAN,
        pixel_std=cfg.MODEL.PIXEL_STD,
        input_format=cfg.INPUT.FORMAT,
        crop_size=r.CROP_SIZE,
        sampling_ratio=r.SAMPLING_RATIO,
        fg_iou_thresh=r.FG_IOU_THRESH,
        crops_per_forward=r.CROPS_PER_FORWARD,
    )
    return model.to(resolve_device(cfg.MODEL.DEVICE))


def rcnn_stage_config(cfg):
    """The config the R-CNN stage trains with: LOC.RCNN's batch and schedule in SOLVER, OUTPUT_DIR/rcnn."""
    r = cfg.LOC.RCNN
    return merge_overrides(
        cfg,
        [
            f"SOLVER.IMS_PER_BATCH={r.IMS_PER_BATCH}",
            f"SOLVER.BASE_LR={r.BASE_LR}",
            f"SOLVER.MAX_ITER={r.MAX_ITER}",
            f"SOLVER.STEPS={list(r.STEPS)}",
            f"SOLVER.WARMUP_ITERS={r.WARMUP_ITERS}",
            f"OUTPUT_DIR={Path(cfg.OUTPUT_DIR) / RCNN_FOLDER}",
        ],
    )


def classifier_weights(cfg) -> Path | None:
    """LOC.CLASSIFIER.WEIGHTS, or None when it is empty."""
    return Path(cfg.LOC.CLASSIFIER.WEIGHTS) if cfg.LOC.CLASSIFIER.WEIGHTS else None


class ClassifierOnOriginal:
    """`Localizer`'s `classify`: a `TorchvisionClassifier`'s top-5 on an input's original image."""

    def __init__(self, classifier: TorchvisionClassifier) -> None:
        self.classifier = classifier

    def __call__(self, x: dict) -> list[int]:
        return self.classifier.top5(x["original"].permute(1, 2, 0).numpy())


def build_class_predictor(cfg, weights: str | Path) -> ClassifierOnOriginal:
    """The classifier of `weights` with LOC.CLASSIFIER's test: TEST_CROP center or 10crop (RESIZE, then LOC.CROP_SIZE
    crops), or dense (the whole image at each of DENSE_SCALES, fully convolutional)."""
    classifier = TorchvisionClassifier(
        state_dict_path=weights,
        crop=cfg.LOC.CLASSIFIER.TEST_CROP,
        resize=cfg.LOC.CLASSIFIER.RESIZE,
        crop_size=cfg.LOC.CROP_SIZE,
        scales=tuple(cfg.LOC.CLASSIFIER.DENSE_SCALES),
        device=resolve_device(cfg.MODEL.DEVICE),
    )
    if classifier.num_classes != cfg.MODEL.NUM_CLASSES:
        raise ValueError(f"{weights} classifies {classifier.num_classes} classes but MODEL.NUM_CLASSES={cfg.MODEL.NUM_CLASSES}")
    return ClassifierOnOriginal(classifier)


def rpn_stage_config(cfg):
    """The config the RPN stage trains with: the config itself, writing to OUTPUT_DIR/rpn."""
    return merge_overrides(cfg, [f"OUTPUT_DIR={Path(cfg.OUTPUT_DIR) / RPN_FOLDER}"])


def build_rpn_train_loader(cfg, dataset: DetectionDataset, *, start_iter: int = 0, rank: int = 0, world_size: int = 1):
    """RPN-stage batches of SOLVER.IMS_PER_BATCH random crops (`LocCropMapper`)."""
    mapper = LocCropMapper(
        crop_size=cfg.LOC.CROP_SIZE,
        scale_range=tuple(cfg.LOC.SCALE_RANGE),
        hflip_prob=cfg.INPUT.HFLIP_PROB,
        min_visible=cfg.LOC.MIN_VISIBLE,
    )
    return build_train_data_loader(cfg, dataset, mapper=mapper, start_iter=start_iter, rank=rank, world_size=world_size)


def build_rcnn_train_loader(cfg, rois: DetectionDataset, *, start_iter: int = 0, rank: int = 0, world_size: int = 1):
    """R-CNN-stage batches of SOLVER.IMS_PER_BATCH RoIs, each from another image of the pool (`rcnn_training_records`)."""
    mapper = RoIMapper(fg_fraction=cfg.LOC.RCNN.FG_FRACTION, hflip_prob=cfg.INPUT.HFLIP_PROB)
    return build_train_data_loader(cfg, rois, mapper=mapper, start_iter=start_iter, rank=rank, world_size=world_size)


LOC_TEST_MODES = ("center_crop", "dense", "dense_multiscale")  # Table 13's testing column


def build_localization_test_mapper(cfg) -> DatasetMapper | CenterCropTestMapper:
    """The RPN's test input by LOC.TEST_MODE: "center_crop", the central LOC.CROP_SIZE square of the image at
    INPUT.MIN_SIZE_TEST; "dense", the whole image at INPUT.MIN_SIZE_TEST (capped by MAX_SIZE_TEST); "dense_multiscale",
    that plus the image at each of LOC.TEST_SCALES (the pyramid whose boxes `LocalizationRPN` merges)."""
    mode = cfg.LOC.TEST_MODE
    if mode not in LOC_TEST_MODES:
        raise ValueError(f"LOC.TEST_MODE must be one of {list(LOC_TEST_MODES)}, got {mode!r}")
    if mode == "center_crop":
        return CenterCropTestMapper(
            size=cfg.INPUT.MIN_SIZE_TEST, crop_size=cfg.LOC.CROP_SIZE, resize_backend=cfg.INPUT.RESIZE_BACKEND
        )
    return DatasetMapper(
        min_size=cfg.INPUT.MIN_SIZE_TEST,
        max_size=cfg.INPUT.MAX_SIZE_TEST,
        is_train=False,
        test_scales=tuple(cfg.LOC.TEST_SCALES) if mode == "dense_multiscale" else (),
        resize_backend=cfg.INPUT.RESIZE_BACKEND,
    )


def build_localization_test_loader(cfg, dataset: DetectionDataset, *, rank: int = 0, world_size: int = 1):
    """Inference batches of one image: the RPN's input (`build_localization_test_mapper`) and the original."""
    return build_test_loader(
        dataset,
        mapper=OriginalImageMapper(test_mapper=build_localization_test_mapper(cfg)),
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        rank=rank,
        world_size=world_size,
        on_bad_image=cfg.DATALOADER.ON_BAD_IMAGE,
        timeout=cfg.DATALOADER.TIMEOUT,
    )
