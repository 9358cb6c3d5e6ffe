"""`build_*(cfg)` for data: the data sets named in the config, their mappers and loaders."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .datasets import get_dataset
from .datasets.base import DetectionDataset
from .loader import build_test_loader, build_train_loader
from .mapper import DatasetMapper


def concatenate_datasets(datasets: Sequence[DetectionDataset]) -> DetectionDataset:
    """One data set holding the records of several with the same classes (e.g. VOC 07+12)."""
    if len(datasets) == 1:
        return datasets[0]
    first = datasets[0]
    for other in datasets[1:]:
        if other.class_names != first.class_names:
            raise ValueError(
                f"Cannot train on {first.name!r} and {other.name!r} together: their classes differ "
                f"({len(first.class_names)} vs {len(other.class_names)} classes)"
            )
    return DetectionDataset(
        name="+".join(d.name for d in datasets),
        records=[record for d in datasets for record in d.records],
        class_names=list(first.class_names),
        category_ids=list(first.category_ids),
    )


def load_dataset(cfg, name: str) -> DetectionDataset:
    """One data set by name, checked against MODEL.NUM_CLASSES."""
    dataset = get_dataset(name, root=cfg.DATASETS.ROOT)
    if dataset.num_classes != cfg.MODEL.NUM_CLASSES:
        raise ValueError(
            f"Data set {name!r} has {dataset.num_classes} classes but MODEL.NUM_CLASSES={cfg.MODEL.NUM_CLASSES}; "
            f"set MODEL.NUM_CLASSES={dataset.num_classes}"
        )
    return dataset


def build_train_dataset(cfg) -> DetectionDataset:
    return concatenate_datasets([load_dataset(cfg, name) for name in cfg.DATASETS.TRAIN])


def build_train_data_loader(
    cfg,
    dataset: DetectionDataset,
    *,
    start_iter: int = 0,
    rank: int = 0,
    world_size: int = 1,
    mapper: Callable[..., dict] | None = None,
):
    """Infinite loader of SOLVER.IMS_PER_BATCH / world_size images per batch for this process, from batch number
    `start_iter` on (the iterations a resumed run already trained). `mapper` defaults to the detector's training
    `DatasetMapper`; another one (the localization stages' crops) turns off aspect-ratio grouping, since its outputs'
    shapes do not follow the images'."""
    if cfg.SOLVER.IMS_PER_BATCH % world_size:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH={cfg.SOLVER.IMS_PER_BATCH} is not divisible by the {world_size} processes"
        )
    grouping = cfg.DATALOADER.ASPECT_RATIO_GROUPING and mapper is None
    return build_train_loader(
        dataset,
        mapper=build_train_mapper(cfg) if mapper is None else mapper,
        batch_size=cfg.SOLVER.IMS_PER_BATCH // world_size,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        aspect_ratio_grouping=grouping,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        seed=cfg.SEED,
        rank=rank,
        world_size=world_size,
        start_iter=start_iter,
        on_bad_image=cfg.DATALOADER.ON_BAD_IMAGE,
        timeout=cfg.DATALOADER.TIMEOUT,
    )


def build_train_mapper(cfg) -> DatasetMapper:
    """The detector's training mapper: a shorter side drawn from INPUT.MIN_SIZE_TRAIN, the longer at most
    MAX_SIZE_TRAIN, a flip with INPUT.HFLIP_PROB, resized with INPUT.RESIZE_BACKEND."""
    return DatasetMapper(
        min_size=cfg.INPUT.MIN_SIZE_TRAIN,
        max_size=cfg.INPUT.MAX_SIZE_TRAIN,
        hflip_prob=cfg.INPUT.HFLIP_PROB,
        is_train=True,
        resize_backend=cfg.INPUT.RESIZE_BACKEND,
    )


def build_test_mapper(cfg) -> DatasetMapper:
    """The inference mapper: INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST, plus the image pyramid of TEST.MULTI_SCALE,
    resized with INPUT.RESIZE_BACKEND."""
    multi_scale = cfg.TEST.MULTI_SCALE
    return DatasetMapper(
        min_size=cfg.INPUT.MIN_SIZE_TEST,
        max_size=cfg.INPUT.MAX_SIZE_TEST,
        is_train=False,
        test_scales=multi_scale.SCALES if multi_scale.ENABLED else (),
        resize_backend=cfg.INPUT.RESIZE_BACKEND,
    )


def build_test_data_loader(cfg, dataset: DetectionDataset, *, rank: int = 0, world_size: int = 1):
    return build_test_loader(
        dataset,
        mapper=build_test_mapper(cfg),
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        rank=rank,
        world_size=world_size,
        on_bad_image=cfg.DATALOADER.ON_BAD_IMAGE,
        timeout=cfg.DATALOADER.TIMEOUT,
    )
