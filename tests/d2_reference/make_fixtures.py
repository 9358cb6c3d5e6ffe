"""Records detectron2's own outputs on the seeded R50-C4 weights of d2_weights.py as this folder's fixtures
(fixtures.json, fixtures.npz); README.md says how it was run. Needs detectron2 importable (its source on PYTHONPATH),
runs on the CPU; the tests that read the fixtures never import detectron2.

    PYTHONPATH=path/to/detectron2:path/to/its/deps python tests/d2_reference/make_fixtures.py [--out DIR]

Steps:
1. write the weights of d2_weights.SEED as a detectron2 model-zoo .pkl (a temporary file);
2. inference, configs/COCO-Detection/faster_rcnn_R_50_C4_3x.yaml as it is (800 px, 1000 proposals), through
   detectron2's DefaultPredictor on each image of images/ read as its demo reads it (detection_utils.read_image, BGR):
   a digest of the decoded and the resized image, res4 statistics (mean, std, per-channel means), the RPN's proposals
   (input pixels), the final detections (original pixels);
3. one training step of the same model on a batch of two images (detectron2's DatasetMapper, one fixed short side,
   no flip) with fixed proposals (drawn here, recorded) in place of the RPN's and d2_sampling's fixed-order rule in
   place of both samplers' random draws: the four losses, the sampled anchors and RoIs, gradient norms.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import d2_sampling  # noqa: E402
import d2_weights  # noqa: E402

INFERENCE_IMAGES = ("000000000536.jpg", "000000000643.jpg", "000000000472.jpg")
TRAIN_IMAGES = ("000000000536.jpg", "000000000472.jpg")
TRAIN_SHORT_SIDE = 320
TRAIN_ROIS_PER_IMAGE = 64  # ROI_HEADS.BATCH_SIZE_PER_IMAGE of the training step (512 in the config): res5 per RoI
FIXED_PROPOSALS_PER_IMAGE = 150
PROPOSAL_SEED = 22
# the parameters whose gradient norms are recorded (detectron2's names); also per-stage totals in GRADIENT_GROUPS
GRADIENT_PARAMETERS = (
    "backbone.res3.0.conv1.weight",
    "backbone.res3.3.conv3.weight",
    "backbone.res4.0.shortcut.weight",
    "backbone.res4.5.conv2.weight",
    "roi_heads.res5.0.conv1.weight",
    "roi_heads.res5.2.conv3.weight",
    "proposal_generator.rpn_head.conv.weight",
    "proposal_generator.rpn_head.conv.bias",
    "proposal_generator.rpn_head.objectness_logits.weight",
    "proposal_generator.rpn_head.anchor_deltas.weight",
    "roi_heads.box_predictor.cls_score.weight",
    "roi_heads.box_predictor.cls_score.bias",
    "roi_heads.box_predictor.bbox_pred.weight",
    "roi_heads.box_predictor.bbox_pred.bias",
)
GRADIENT_GROUPS = ("backbone.res3.", "backbone.res4.", "roi_heads.res5.", "proposal_generator.rpn_head.",
                   "roi_heads.box_predictor.")
D2_CONFIG = "configs/COCO-Detection/faster_rcnn_R_50_C4_3x.yaml"


def digest(array: np.ndarray) -> str:
    """sha256 of a C-contiguous array's bytes, with its shape and dtype."""
    array = np.ascontiguousarray(array)
    return f"{array.dtype}{list(array.shape)}:" + hashlib.sha256(array.tobytes()).hexdigest()


def coco_records(names: tuple[str, ...]) -> list[dict]:
    """The images' records from coco128's annotation file, boxes XYXY in original pixels, categories as contiguous
    indices in the order of the category ids (detectron2's and detectron_res's COCO order)."""
    annotation_file = HERE.parents[2] / "shared" / "data" / "coco128" / "annotations" / "instances_train2017.json"
    data = json.loads(annotation_file.read_text())
    contiguous = {c["id"]: index for index, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))}
    images = {image["file_name"]: image for image in data["images"]}
    records = []
    for name in names:
        image = images[name]
        annotations = [
            {"bbox": [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]],
             "category_id": contiguous[a["category_id"]], "iscrowd": int(a.get("iscrowd", 0))}
            for a in data["annotations"] if a["image_id"] == image["id"]
        ]
        records.append({"file_name": name, "image_id": image["id"], "height": image["height"],
                        "width": image["width"], "annotations": annotations})
    return records


def d2_cfg(weights: Path, *, overrides: list[str] = ()):
    import detectron2
    from detectron2.config import get_cfg

    cfg = get_cfg()  # the config from detectron2's source tree (model_zoo.get_config_file needs an installed copy)
    cfg.merge_from_file(str(Path(detectron2.__file__).resolve().parents[1] / D2_CONFIG))
    cfg.merge_from_list(["MODEL.WEIGHTS", str(weights), "MODEL.DEVICE", "cpu", *overrides])
    cfg.freeze()
    return cfg


def record_inference(weights: Path, arrays: dict, meta: dict) -> None:
    """Step 2: DefaultPredictor on each image."""
    from detectron2.data.detection_utils import read_image
    from detectron2.engine import DefaultPredictor

    cfg = d2_cfg(weights)
    predictor = DefaultPredictor(cfg)
    seen: dict = {}
    predictor.model.backbone.register_forward_hook(lambda m, i, o: seen.__setitem__("res4", o["res4"]))
    predictor.model.proposal_generator.register_forward_hook(lambda m, i, o: seen.__setitem__("proposals", o[0]))
    meta["inference"] = {"config": D2_CONFIG, "overrides": [], "images": {}}
    for name in INFERENCE_IMAGES:
        image = read_image(str(HERE / "images" / name), format="BGR")
        resized = predictor.aug.get_transform(image).apply_image(image)
        predictions = predictor(image)["instances"]
        res4 = seen["res4"][0]
        proposals = seen["proposals"][0]
        key = name.removesuffix(".jpg")
        arrays[f"{key}/res4_channel_mean"] = res4.mean(dim=(1, 2)).numpy().astype(np.float32)
        arrays[f"{key}/proposals"] = proposals.proposal_boxes.tensor.numpy().astype(np.float32)
        arrays[f"{key}/boxes"] = predictions.pred_boxes.tensor.numpy().astype(np.float32)
        arrays[f"{key}/scores"] = predictions.scores.numpy().astype(np.float32)
        arrays[f"{key}/classes"] = predictions.pred_classes.numpy().astype(np.int64)
        meta["inference"]["images"][name] = {
            "original_hw": list(image.shape[:2]),
            "input_hw": list(resized.shape[:2]),
            "decoded_rgb": digest(image[:, :, ::-1]),
            "input_rgb": digest(resized[:, :, ::-1]),
            "res4_shape": list(res4.shape),
            "res4_mean": float(res4.mean()),
            "res4_std": float(res4.std()),
            "res4_abs_max": float(res4.abs().max()),
            "proposals": len(proposals),
            "detections": len(predictions),
        }
        print(name, meta["inference"]["images"][name], flush=True)


def fixed_proposals(gt_boxes: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """`FIXED_PROPOSALS_PER_IMAGE` boxes in input pixels: half jittered copies of the ground-truth boxes (to give
    foreground RoIs), half random boxes in the image, clipped."""
    count = FIXED_PROPOSALS_PER_IMAGE // 2
    gt = gt_boxes[rng.integers(len(gt_boxes), size=count)]
    size = np.stack([gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]] * 2, axis=1)
    jittered = gt + rng.normal(0.0, 0.15, (count, 4)) * size
    x = np.sort(rng.uniform(0, width, (FIXED_PROPOSALS_PER_IMAGE - count, 2)), axis=1)
    y = np.sort(rng.uniform(0, height, (FIXED_PROPOSALS_PER_IMAGE - count, 2)), axis=1)
    boxes = np.concatenate([jittered, np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1)])
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1.0)  # no empty box
    return boxes.astype(np.float32)


def record_training(weights: Path, arrays: dict, meta: dict) -> None:
    """Step 3: one training step with fixed proposals and fixed-order sampling."""
    import detectron2.modeling.proposal_generator.rpn as d2_rpn
    import detectron2.modeling.roi_heads.roi_heads as d2_roi_heads
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import DatasetMapper
    from detectron2.modeling import build_model
    from detectron2.structures import BoxMode, Boxes, Instances

    overrides = ["INPUT.MIN_SIZE_TRAIN", f"({TRAIN_SHORT_SIDE},)", "INPUT.RANDOM_FLIP", "none",
                 "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", str(TRAIN_ROIS_PER_IMAGE)]
    cfg = d2_cfg(weights, overrides=overrides)
    d2_rpn.subsample_labels = d2_sampling.fixed_subsample_labels
    d2_roi_heads.subsample_labels = d2_sampling.fixed_subsample_labels
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(weights))
    model.train()

    records = coco_records(TRAIN_IMAGES)
    mapper = DatasetMapper(cfg, is_train=True)
    batch = []
    for record in records:
        d2_record = {**record, "file_name": str(HERE / "images" / record["file_name"]),
                     "annotations": [{**a, "bbox_mode": BoxMode.XYXY_ABS} for a in record["annotations"]]}
        batch.append(mapper(d2_record))
    rng = np.random.default_rng(PROPOSAL_SEED)
    proposals = []
    for index, x in enumerate(batch):
        height, width = x["image"].shape[1:]
        boxes = fixed_proposals(x["instances"].gt_boxes.tensor.numpy(), height, width, rng)
        arrays[f"train/{index}/proposals"] = boxes
        arrays[f"train/{index}/gt_boxes"] = x["instances"].gt_boxes.tensor.numpy().astype(np.float32)
        arrays[f"train/{index}/gt_classes"] = x["instances"].gt_classes.numpy().astype(np.int64)
        instances = Instances((height, width))
        instances.proposal_boxes = Boxes(torch.from_numpy(boxes))
        instances.objectness_logits = torch.zeros(len(boxes))
        proposals.append(instances)

    rpn_forward = model.proposal_generator.forward
    seen: dict = {}

    def fixed_proposal_forward(*args, **kwargs):
        _, losses = rpn_forward(*args, **kwargs)
        return proposals, losses

    model.proposal_generator.forward = fixed_proposal_forward
    label_anchors = model.proposal_generator.label_and_sample_anchors

    def keep_anchor_labels(*args, **kwargs):
        labels, matched = label_anchors(*args, **kwargs)
        seen["anchor_labels"] = labels
        return labels, matched

    model.proposal_generator.label_and_sample_anchors = keep_anchor_labels
    sample_proposals = model.roi_heads.label_and_sample_proposals

    def keep_rois(*args, **kwargs):
        sampled = sample_proposals(*args, **kwargs)
        seen["rois"] = sampled
        return sampled

    model.roi_heads.label_and_sample_proposals = keep_rois
    from detectron2.utils.events import EventStorage

    with EventStorage(0):  # where detectron2's training forward logs its statistics
        losses = model(batch)
    sum(losses.values()).backward()

    for index, labels in enumerate(seen["anchor_labels"]):
        arrays[f"train/{index}/anchors_positive"] = torch.nonzero(labels == 1).flatten().numpy().astype(np.int64)
        arrays[f"train/{index}/anchors_negative"] = torch.nonzero(labels == 0).flatten().numpy().astype(np.int64)
    for index, rois in enumerate(seen["rois"]):
        order = np.lexsort(rois.proposal_boxes.tensor.numpy().T[::-1])  # sorted by x1, y1, x2, y2
        arrays[f"train/{index}/rois"] = rois.proposal_boxes.tensor.numpy()[order].astype(np.float32)
        arrays[f"train/{index}/roi_classes"] = rois.gt_classes.numpy()[order].astype(np.int64)
    parameters = dict(model.named_parameters())
    gradient_norms = {name: float(parameters[name].grad.norm()) for name in GRADIENT_PARAMETERS}
    for group in GRADIENT_GROUPS:
        squares = [p.grad.double().pow(2).sum() for n, p in parameters.items()
                   if n.startswith(group) and p.grad is not None]
        gradient_norms[group + "*"] = float(torch.stack(squares).sum().sqrt())
    frozen = [n for n, p in parameters.items() if not p.requires_grad]
    meta["training"] = {
        "config": D2_CONFIG,
        "overrides": overrides,
        "images": list(TRAIN_IMAGES),
        "records": records,
        "input_hw": [list(x["image"].shape[1:]) for x in batch],
        "inputs_rgb": [digest(x["image"].numpy()[::-1].transpose(1, 2, 0)) for x in batch],
        "fixed_proposals_per_image": FIXED_PROPOSALS_PER_IMAGE,
        "proposal_seed": PROPOSAL_SEED,
        "losses": {k: float(v) for k, v in losses.items()},
        "gradient_norms": gradient_norms,
        "frozen_parameters": len(frozen),
        "trainable_parameters": [n for n, p in parameters.items() if p.requires_grad],
    }
    print(json.dumps(meta["training"]["losses"]), json.dumps(gradient_norms, indent=1), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(HERE), help="folder for fixtures.json and fixtures.npz")
    parser.add_argument("--part", choices=("all", "inference", "training"), default="all",
                        help="record only this part, keeping the other one of --out's files")
    args = parser.parse_args()
    import detectron2
    import PIL

    torch.set_num_threads(int(os.environ.get("FIXTURE_THREADS", "2")))
    out = Path(args.out)
    d2_root = Path(detectron2.__file__).resolve().parents[1]
    commit = subprocess.run(["git", "-C", str(d2_root), "rev-parse", "HEAD"], capture_output=True, text=True)
    meta = {
        "detectron2": {"version": detectron2.__version__, "source": "facebookresearch/detectron2",
                       "commit": commit.stdout.strip() or "02b5c4e295e990042a714712c21dc79b731e8833"},
        "torch": torch.__version__, "numpy": np.__version__, "pillow": PIL.__version__,
        "weights": {"generator": "tests/d2_reference/d2_weights.py", "seed": d2_weights.SEED},
    }
    state = d2_weights.detectron2_r50_c4_state(seed=d2_weights.SEED)
    meta["weights"].update(tensors=len(state), sha256=d2_weights.state_digest(state))
    arrays: dict = {}
    if args.part != "all":
        kept = "training" if args.part == "inference" else "inference"
        meta[kept] = json.loads((out / "fixtures.json").read_text())[kept]
        with np.load(out / "fixtures.npz") as data:
            arrays.update({k: data[k] for k in data.files if k.startswith("train/") == (kept == "training")})
    with tempfile.TemporaryDirectory() as folder:
        weights = d2_weights.write_detectron2_pkl(Path(folder) / "d2_r50_c4_seeded.pkl", state=state)
        if args.part != "training":
            record_inference(weights, arrays, meta)
            save(out, meta, arrays)
        if args.part != "inference":
            record_training(weights, arrays, meta)
            save(out, meta, arrays)


def save(out: Path, meta: dict, arrays: dict) -> None:
    """fixtures.json (the figures a reader may want to see) and fixtures.npz (the arrays) in `out`."""
    (out / "fixtures.json").write_text(json.dumps(meta, indent=1) + "\n")
    np.savez_compressed(out / "fixtures.npz", **arrays)


if __name__ == "__main__":
    main()
