"""Where the localization system's classes come from (the paper's Appendix C): the top-5 classes of each image,
for which the class-specific RPN and the R-CNN stage then find boxes.

Three sources, each giving ``{image_id: [class, ...]}`` with 0-based class indices (line i of
LOC_synset_mapping.txt is class i - 1), best first, at most 5:

- `read_class_predictions`: a file of classification results (another network's, as in the paper);
- `oracle_classes`: the ground-truth classes of a ``LOC_*_solution.csv`` (localization with known classes);
- `TorchvisionClassifier`: a torchvision ResNet classification checkpoint run on the image, center crop or 10-crop.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torchvision
from torchvision.transforms.v2 import functional as F

from ..data.datasets.imagenet_loc import read_loc_solution, read_text_file
from ..utils.io import read_torch_file

__all__ = ["TorchvisionClassifier", "oracle_classes", "read_class_predictions"]

MAX_CLASSES = 5
_INTEGER = re.compile(r"[+-]?\d+")
_WNID_LIKE = re.compile(r"n\d{8}")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _strip_extension(image_id: str) -> str:
    return os.path.splitext(image_id)[0]


def _is_class(token: str, index: Mapping[str, int]) -> bool:
    return token in index or _INTEGER.fullmatch(token) is not None


def _class_index(token: str, *, index: Mapping[str, int], where: str) -> int:
    """The 0-based class of a wnid or a 1-based integer label."""
    if token in index:
        return index[token]
    if _INTEGER.fullmatch(token):
        label = int(token)
        if not 1 <= label <= len(index):
            raise ValueError(f"{where}: label {label} is outside 1..{len(index)} (the lines of the synset mapping)")
        return label - 1
    if _WNID_LIKE.fullmatch(token):
        raise ValueError(f"{where}: wnid {token!r} is not in the synset mapping")
    raise ValueError(f"{where}: {token!r} is neither a wnid of the synset mapping nor an integer label")


def _line_classes(tokens: list[str], *, index: Mapping[str, int], where: str, groups: bool = False) -> list[int]:
    """The classes of one line's class tokens: each a wnid or a label; with ``groups`` (a CSV's PredictionString),
    a string starting with a wnid followed by a number is read as groups ``wnid x1 y1 x2 y2`` whose wnids are taken
    in order. Repeated classes count once, at their first place; the first 5 distinct classes are kept."""
    if groups and len(tokens) >= 2 and tokens[0] in index and _NUMBER.fullmatch(tokens[1]):
        if len(tokens) % 5:
            raise ValueError(f"{where}: {len(tokens)} values, not groups of 5 'wnid x1 y1 x2 y2'")
        for start in range(0, len(tokens), 5):
            group = tokens[start : start + 5]
            if group[0] not in index:
                if _WNID_LIKE.fullmatch(group[0]):
                    raise ValueError(f"{where}: wnid {group[0]!r} is not in the synset mapping")
                raise ValueError(f"{where}: group {start // 5 + 1} starts with {group[0]!r}, not a wnid")
            bad = [v for v in group[1:] if not _NUMBER.fullmatch(v)]
            if bad:
                raise ValueError(f"{where}: group {start // 5 + 1} has the coordinate {bad[0]!r}, not a number")
        tokens = tokens[::5]
    classes = [_class_index(token, index=index, where=where) for token in tokens]
    return list(dict.fromkeys(classes))[:MAX_CLASSES]


def read_class_predictions(
    path: str | os.PathLike, *, wnids: Sequence[str], image_ids: Sequence[str] | None = None
) -> dict[str, list[int]]:
    """The predicted classes of each image from a text file: ``{image_id: [class, ...]}``, 0-based classes (class
    ``c`` is ``wnids[c]``) in the file's order, repeats dropped (a class counts at its first place), the first 5
    distinct ones kept. Values are separated by spaces and/or commas; blank lines are skipped (see form b).

    Two forms, told apart by the first data line:

    (a) one line per image, ``IMAGE_ID c1 c2 ... c5``, each class a 1-based integer label or a wnid; an image id
        may carry a file extension (``ILSVRC2012_val_00000001.JPEG``: stripped). An optional first line starting
        with ``ImageId`` is a CSV header: ``ImageId,PredictionString`` files whose string lists classes, or groups
        ``wnid x1 y1 x2 y2`` of which the wnids are taken in order (a ``LOC_*_solution.csv`` or a CSV submission):
        in a file with the header, a string whose first value is a wnid and second a number is read as groups
        (so such a file cannot list a wnid then a label); without the header every value is a class.
    (b) the devkit's classification submission: labels (or wnids) only, line i belonging to ``image_ids[i - 1]``;
        it needs ``image_ids``, and the file must have exactly ``len(image_ids)`` lines (blank lines at its end
        ignored; a blank line before them is an error, as it would shift the images after it).

    The file is of form (b) when it has no header, ``image_ids`` is given and the first token of its first
    non-blank line is a wnid of ``wnids`` or an integer; otherwise of form (a). So image ids must not be integers
    or wnids, and a file of form (b) read without ``image_ids`` is an error rather than read as (a).

    With ``image_ids`` (extensions stripped there too), the result holds exactly those images in that order (a
    form-(a) file may hold more images; they are left out); without it, every image of the file in file order.

    Raises:
        ValueError naming the file and line: not UTF-8 text, an image id without classes (a line or CSV row with
        the id alone: its submission line would be empty), an unknown wnid, a label outside 1..len(wnids), a token
        that is neither, a repeated image id, an image of ``image_ids`` missing from a form-(a) file (the first one,
        with its position), a form-(b) file whose line count differs from ``len(image_ids)``.
    """
    index = {wnid: number for number, wnid in enumerate(wnids)}
    if len(index) != len(wnids):
        raise ValueError("wnids: a wnid appears twice")
    wanted = None
    if image_ids is not None:
        wanted = [_strip_extension(str(i)) for i in image_ids]
        positions: dict[str, int] = {}
        for position, image_id in enumerate(wanted):
            if image_id in positions:
                raise ValueError(f"image_ids: {image_id!r} at positions {positions[image_id]} and {position}")
            positions[image_id] = position

    text = read_text_file(path, what="a file of class predictions (docs/localization.md)")
    lines = [line.replace(",", " ").split() for line in text.splitlines()]
    lines = [[token.strip('"') for token in tokens] for tokens in lines]
    data = [(number, tokens) for number, tokens in enumerate(lines, start=1) if tokens]
    header = bool(data) and data[0][1][0].lower() == "imageid"
    if header:
        data = data[1:]
    if not data:
        if wanted:
            raise ValueError(f"{path}: no predictions, but {len(wanted)} image ids (first {wanted[0]!r})")
        return {}

    first_number, first_tokens = data[0]
    if not header and _is_class(first_tokens[0], index):
        if wanted is None:
            raise ValueError(
                f"{path}, line {first_number}: starts with the class {first_tokens[0]!r}: a file of classes only "
                "(line i for image i) needs image_ids"
            )
        return _read_classes_only(path, lines, index=index, image_ids=wanted)

    predictions: dict[str, list[int]] = {}
    found_at: dict[str, int] = {}
    for number, tokens in data:
        where = f"{path}, line {number}"
        image_id = _strip_extension(tokens[0])
        if image_id in found_at:
            raise ValueError(f"{where}: image {image_id!r} already on line {found_at[image_id]}")
        if _is_class(tokens[0], index):
            raise ValueError(f"{where}: starts with the class {tokens[0]!r} where an image id is expected")
        found_at[image_id] = number
        predictions[image_id] = _line_classes(tokens[1:], index=index, where=where, groups=header)
        if not predictions[image_id]:  # its submission line would be empty: every guess of the image wrong
            raise ValueError(f"{where}: image {image_id!r} has no classes (a line is 'IMAGE_ID c1 ... c5')")
    if wanted is None:
        return predictions
    missing = [(position, i) for position, i in enumerate(wanted) if i not in predictions]
    if missing:
        position, image_id = missing[0]
        raise ValueError(
            f"{path}: image {image_id!r} (image_ids[{position}]) has no line; {len(missing)} of {len(wanted)} "
            "images missing"
        )
    return {image_id: predictions[image_id] for image_id in wanted}


def _read_classes_only(
    path: str | os.PathLike, lines: list[list[str]], *, index: Mapping[str, int], image_ids: list[str]
) -> dict[str, list[int]]:
    """Form (b): line i holds the classes of image_ids[i - 1]."""
    while lines and not lines[-1]:
        lines = lines[:-1]
    if len(lines) != len(image_ids):
        raise ValueError(
            f"{path}: {len(lines)} lines of classes, but {len(image_ids)} image ids (line i belongs to image i)"
        )
    predictions = {}
    for number, (tokens, image_id) in enumerate(zip(lines, image_ids), start=1):
        where = f"{path}, line {number}"
        if not tokens:
            raise ValueError(f"{where}: an empty line in a file of classes (line i belongs to image {image_id!r})")
        predictions[image_id] = _line_classes(tokens, index=index, where=where)
    return predictions


def oracle_classes(solution_csv: str | os.PathLike, *, wnids: Sequence[str]) -> dict[str, list[int]]:
    """The ground-truth classes of each image of a ``LOC_*_solution.csv`` (0-based, distinct, in order of first
    appearance on its row; all of them, not capped at 5), images in file order: localization with the classes
    known, the paper's measure of the localization stage alone."""
    truth = read_loc_solution(solution_csv, list(wnids))
    return {image_id: [int(label) - 1 for label in dict.fromkeys(gt.labels.tolist())] for image_id, gt in truth.items()}


# depth by (bottleneck blocks?, blocks in layer3)
_DEPTHS = {(False, 2): 18, (False, 6): 34, (True, 6): 50, (True, 23): 101, (True, 36): 152}


def _load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    loaded = read_torch_file(path, what="classifier weights")  # weights-only; one line naming the file and why
    if isinstance(loaded, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping) or not loaded:
        raise ValueError(
            f"{path}: holds a {type(loaded).__name__}, not a state_dict (or one under 'model' or 'state_dict')"
        )
    bad = [k for k, v in loaded.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: not a state_dict: the entry {bad[0]!r} is not a tensor under a string key")
    state = dict(loaded)
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DistributedDataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


CLASSIFIER_TESTS = ("center", "10crop", "dense")
PAPER_DENSE_SCALES = (224, 256, 384, 480, 640)  # the paper's multi-scale classification test (its 4.6 % top-5)


def dense_probabilities(score_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """The dense, multi-scale test of a classifier (the ResNet paper's, after VGG's dense evaluation): per scale a
    (C, h_s, w_s) class score map (the classifier applied fully convolutionally to the whole image at that scale)
    is averaged spatially into C scores and turned into probabilities by a softmax; the result is the mean of
    the scales' probabilities, (C,) float32."""
    if not score_maps:
        raise ValueError("dense_probabilities needs the score map of at least one scale")
    return torch.stack([torch.softmax(m.float().mean(dim=(-2, -1)), dim=0) for m in score_maps]).mean(dim=0)


class TorchvisionClassifier:
    """A torchvision ResNet (18/34/50/101/152) classification checkpoint as a class predictor.

    The checkpoint is a state_dict saved by ``torch.save`` (or a dict holding it under ``"model"`` or
    ``"state_dict"``; a ``module.`` prefix on every key is dropped). The depth comes from the keys (the blocks of
    ``layer3`` and whether ``layer1.0.conv3.weight``, a bottleneck's third conv, exists), the number of classes
    from ``fc.weight``; the model is ``torchvision.models.resnet<depth>(weights=None, num_classes=...)`` with the
    weights loaded strictly (running-stat counters ``num_batches_tracked`` may be absent, as in torchvision's own
    files).

    ``crop="center"`` or ``"10crop"``: an image is resized so that its shorter side is ``resize`` (bilinear,
    antialiased, on the uint8 image like torchvision's reference evaluation), cropped to ``crop_size`` squares (the
    center crop; or the 4 corners, the center and their horizontal flips), scaled to [0, 1], normalised with
    ``mean`` / ``std`` and run in eval mode; the result is the mean of the crops' softmax probabilities.

    ``crop="dense"``: the paper's test of its 4.6 % top-5 classifier ("fully-convolutional form ... average the
    scores at multiple scales", shorter sides {224, 256, 384, 480, 640}; no flips are mentioned, none are taken):
    the whole image resized to each of ``scales`` (same resize and normalisation), the network applied fully
    convolutionally (its ``fc`` as a 1x1 conv on layer4's map: `score_map`), and `dense_probabilities` of the
    score maps. The spatial mean of the score map equals the logits of the network's own global average pooling
    on the whole image; it is computed from the map so that the test is the paper's form.

    Raises (in ``__init__``):
        ValueError naming the file: not a loadable state_dict, a depth that the keys do not give, the first
        missing or unexpected key, a tensor of the wrong shape (e.g. a ResNeXt's); bad crop settings.
    """

    def __init__(
        self,
        *,
        state_dict_path: str | os.PathLike,
        crop: str = "center",
        resize: int = 256,
        crop_size: int = 224,
        scales: Sequence[int] = PAPER_DENSE_SCALES,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        device: str | torch.device = "cpu",
    ):
        if crop not in CLASSIFIER_TESTS:
            raise ValueError(f"crop must be 'center', '10crop' or 'dense', got {crop!r}")
        if not scales or not all(isinstance(v, (int, np.integer)) and v >= 16 for v in scales):
            raise ValueError(f"the dense test's scales must be integers >= 16, got {list(scales)!r}")
        self.scales = tuple(int(v) for v in scales)
        if not (int(resize) == resize >= 1 and int(crop_size) == crop_size >= 1 and crop_size <= resize):
            raise ValueError(f"need integers 1 <= crop_size <= resize, got crop_size={crop_size!r}, resize={resize!r}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std positive; got {mean!r}, {std!r}")
        self.crop, self.resize, self.crop_size = crop, int(resize), int(crop_size)
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.device = torch.device(device)

        state = _load_state_dict(state_dict_path)
        for key in ("fc.weight", "layer1.0.conv1.weight", "layer3.0.conv1.weight"):
            if key not in state:
                raise ValueError(f"{state_dict_path}: not a torchvision ResNet state_dict: missing key {key!r}")
        blocks = 1 + max(int(m[1]) for k in state if (m := re.match(r"layer3\.(\d+)\.", k)))
        bottleneck = "layer1.0.conv3.weight" in state
        depth = _DEPTHS.get((bottleneck, blocks))
        if depth is None:
            raise ValueError(
                f"{state_dict_path}: {blocks} {'bottleneck' if bottleneck else 'basic'} blocks in layer3 match no "
                "torchvision ResNet (18/34: 2/6 basic, 50/101/152: 6/23/36 bottleneck)"
            )
        if state["fc.weight"].ndim != 2:
            raise ValueError(f"{state_dict_path}: fc.weight has shape {tuple(state['fc.weight'].shape)}, not (C, D)")
        self.depth = depth
        self.num_classes = int(state["fc.weight"].shape[0])
        model = getattr(torchvision.models, f"resnet{depth}")(weights=None, num_classes=self.num_classes)
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as error:  # tensors of the wrong shape
            message = str(error).strip().splitlines()
            detail = next((line.strip() for line in message[1:] if line.strip()), message[0] if message else "")
            raise ValueError(f"{state_dict_path}: does not fit torchvision's resnet{depth}: {detail}") from None
        if result.missing_keys:
            raise ValueError(
                f"{state_dict_path}: not a torchvision resnet{depth} state_dict: missing key {result.missing_keys[0]!r}"
                f" ({len(result.missing_keys)} missing)"
            )
        if result.unexpected_keys:
            raise ValueError(
                f"{state_dict_path}: not a torchvision resnet{depth} state_dict: unexpected key "
                f"{result.unexpected_keys[0]!r} ({len(result.unexpected_keys)} unexpected)"
            )
        self.model = model.to(self.device).eval()

    @staticmethod
    def _tensor(image: np.ndarray) -> torch.Tensor:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)

    def crops(self, image: np.ndarray) -> torch.Tensor:
        """The normalised crops (N, 3, crop_size, crop_size) float32 of an (H, W, 3) uint8 RGB image: N = 1 for the
        center crop, 10 for 10-crop (in `ten_crop`'s order)."""
        if self.crop == "dense":
            raise ValueError("the dense test takes no crops: see scaled_images")
        bilinear = F.InterpolationMode.BILINEAR
        tensor = F.resize(self._tensor(image), [self.resize], interpolation=bilinear, antialias=True)
        if self.crop == "center":
            crops = torch.stack([F.center_crop(tensor, [self.crop_size])])
        else:
            crops = torch.stack(F.ten_crop(tensor, [self.crop_size]))
        crops = F.to_dtype(crops, torch.float32, scale=True)
        return F.normalize(crops, mean=self.mean, std=self.std)

    def scaled_images(self, image: np.ndarray) -> list[torch.Tensor]:
        """The dense test's inputs: the whole (H, W, 3) uint8 RGB image with its shorter side resized to each of
        `scales`, normalised, (3, h_s, w_s) float32 each."""
        tensor = self._tensor(image)
        images = []
        for scale in self.scales:
            resized = F.resize(tensor, [scale], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
            images.append(F.normalize(F.to_dtype(resized, torch.float32, scale=True), mean=self.mean, std=self.std))
        return images

    def score_map(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) normalised images -> (N, C, h', w') class score maps: the network up to layer4, then its fc
        applied at every position (a 1x1 convolution)."""
        m = self.model
        features = m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(images))))))))
        return torch.einsum("nchw,kc->nkhw", features, m.fc.weight) + m.fc.bias.view(1, -1, 1, 1)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """The class probabilities (C,) float32 on the CPU of an (H, W, 3) uint8 RGB image: averaged over its crops,
        or over the scales of the dense test."""
        with torch.inference_mode():
            if self.crop == "dense":
                maps = [self.score_map(x[None].to(self.device))[0] for x in self.scaled_images(image)]
                return dense_probabilities(maps).cpu()
            crops = self.crops(image).to(self.device)
            probabilities = torch.softmax(self.model(crops).float(), dim=1).mean(dim=0)
        return probabilities.cpu()

    def top5(self, image: np.ndarray) -> list[int]:
        """The 5 most probable classes (0-based, best first; all of them when there are fewer)."""
        return self(image).topk(min(MAX_CLASSES, self.num_classes)).indices.tolist()
