"""The localization pipeline's class predictions: files of each form read into hand-written dicts, errors naming
the line, the oracle's ground-truth classes, and the torchvision ResNet classifier checked against crops cut by
hand (slicing) from the resized image."""

import numpy as np
import pytest
import torch
import torchvision
from torchvision.transforms.v2 import functional as F

from detectron_res.config import load_config
from detectron_res.localization.build import build_class_predictor
from detectron_res.localization.class_predictions import (
    TorchvisionClassifier,
    dense_probabilities,
    oracle_classes,
    read_class_predictions,
)

# labels 1..7 in this order
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331", "n01498041"]


def write(tmp_path, text, name="predictions.txt"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_ids_with_labels_and_wnids_separated_by_spaces(tmp_path):
    path = write(
        tmp_path,
        "ILSVRC2012_val_00000001.JPEG 3 n01443537 7 1 4 5\n"  # six classes: the first five kept
        "\n"  # blank lines are skipped
        "ILSVRC2012_val_00000002 n01498041   5\n",
    )
    assert read_class_predictions(path, wnids=WNIDS) == {
        "ILSVRC2012_val_00000001": [2, 1, 6, 0, 3],
        "ILSVRC2012_val_00000002": [6, 4],
    }


def test_repeated_classes_count_once_before_the_first_five_are_kept(tmp_path):
    path = write(tmp_path, "img 3 n01484850 1 3 2 4 5 6\n")  # label 3 is n01484850
    assert read_class_predictions(path, wnids=WNIDS) == {"img": [2, 0, 1, 3, 4]}


def test_comma_separated_and_csv_with_a_header(tmp_path):
    path = write(tmp_path, "ILSVRC2012_val_00000001.JPEG,3,n01443537,7\nILSVRC2012_val_00000002,1\n")
    assert read_class_predictions(path, wnids=WNIDS) == {
        "ILSVRC2012_val_00000001": [2, 1, 6],
        "ILSVRC2012_val_00000002": [0],
    }
    path = write(tmp_path, "ImageId,PredictionString\nimg1,n01440764 n01484850 2\nimg2,7\n", "classes.csv")
    assert read_class_predictions(path, wnids=WNIDS) == {"img1": [0, 2, 1], "img2": [6]}


def test_csv_of_box_groups_takes_their_wnids_in_order(tmp_path):
    path = write(
        tmp_path,
        "ImageId,PredictionString\n"
        "img1,n01491361 1 2 30 40 n01440764 0 0 9 9 n01491361 5 5 6 6 \n"  # a repeated class counts once
        "img2,n01498041 0.5 1 2.5 3 \n",
        "LOC_val_solution.csv",
    )
    assert read_class_predictions(path, wnids=WNIDS) == {"img1": [3, 0], "img2": [6]}


def test_a_wnid_then_a_number_is_a_box_group_only_under_the_csv_header(tmp_path):
    values = "n01440764 2 3 4 5 n01484850 6 7 8 9"
    path = write(tmp_path, f"img {values}\n")  # no header: every value a class (labels 2..9: 8 and 9 too big)
    with pytest.raises(ValueError, match="line 1: label 8 is outside"):
        read_class_predictions(path, wnids=WNIDS)
    path = write(tmp_path, "img n01440764 2 3 4 5\n")
    assert read_class_predictions(path, wnids=WNIDS) == {"img": [0, 1, 2, 3, 4]}
    path = write(tmp_path, f"ImageId,PredictionString\nimg,{values}\n")  # header: two groups
    assert read_class_predictions(path, wnids=WNIDS) == {"img": [0, 2]}


def test_with_image_ids_the_result_follows_them(tmp_path):
    path = write(tmp_path, "b.JPEG 2\nextra 5\na 1 3\n")
    assert read_class_predictions(path, wnids=WNIDS, image_ids=["a", "b.JPEG"]) == {"a": [0, 2], "b": [1]}
    assert list(read_class_predictions(path, wnids=WNIDS, image_ids=["a", "b"])) == ["a", "b"]


def test_the_devkit_form_of_labels_only_line_i_for_image_i(tmp_path):
    path = write(tmp_path, "3 1 2 7 5\nn01440764 2\n1,2,3,4,5,6\n\n")  # a blank line at the end is no image
    assert read_class_predictions(path, wnids=WNIDS, image_ids=["a.JPEG", "b", "c"]) == {
        "a": [2, 0, 1, 6, 4],
        "b": [0, 1],
        "c": [0, 1, 2, 3, 4],
    }


@pytest.mark.parametrize(
    ("text", "image_ids", "message"),
    [
        ("img1 1\nimg2 n09999999\n", None, r"line 2: wnid 'n09999999' is not in the synset mapping"),
        ("img1 1\nimg2 2 8\n", None, r"line 2: label 8 is outside 1\.\.7"),
        ("img1 1\nimg2 0\n", None, r"line 2: label 0 is outside 1\.\.7"),
        ("img1 1\n\nimg2 cat\n", None, r"line 3: 'cat' is neither a wnid of the synset mapping nor an integer label"),
        ("img1 1\nimg1.JPEG 2\n", None, r"line 2: image 'img1' already on line 1"),
        ("img1 1\nimg3 2\n", ["img1", "img2", "img3", "img4"], r"image 'img2' \(image_ids\[1\]\) has no line; 2 of 4"),
        ("img1 1\n3 2\n", None, r"line 2: starts with the class '3' where an image id is expected"),
        ("ImageId,PredictionString\nimg1,n01440764 0 0 9\n", None, r"line 2: 4 values, not groups of 5"),
        ("ImageId,PredictionString\nimg1,n01440764 0 0 9 9 n09999999 1 1 2 2\n", None, r"line 2: wnid 'n09999999'"),
        ("ImageId,PredictionString\nimg1,n01440764 0 0 9 x\n", None, r"line 2: group 1 has the coordinate 'x'"),
        ("1 2\n3 4\n", None, r"line 1: starts with the class '1': a file of classes only .* needs image_ids"),
        ("n01440764 2\n", None, r"line 1: starts with the class 'n01440764'"),
        ("1 2\n3 4\n", ["a", "b", "c"], r"2 lines of classes, but 3 image ids"),
        ("1 2\n3 9\n", ["a", "b"], r"line 2: label 9 is outside 1\.\.7"),
        ("1 2\n\n3 4\n", ["a", "b", "c"], r"line 2: an empty line in a file of classes \(.* image 'b'\)"),
        ("a 1\n", ["a", "b.JPEG", "b"], r"image_ids: 'b' at positions 1 and 2"),
        # an id without classes would give its image an empty submission line (issue 21, item 11)
        ("img1 1\nimg2\n", None, r"line 2: image 'img2' has no classes \(a line is 'IMAGE_ID c1 \.\.\. c5'\)$"),
        ("ImageId,PredictionString\nimg1,\n", None, r"line 2: image 'img1' has no classes"),
        ("img1 1\nimg2 , ,\n", ["img1", "img2"], r"line 2: image 'img2' has no classes"),
    ],
)
def test_errors_name_the_file_and_line(tmp_path, text, image_ids, message):
    path = write(tmp_path, text, "preds.txt")
    with pytest.raises(ValueError, match=message) as info:
        read_class_predictions(path, wnids=WNIDS, image_ids=image_ids)
    if not message.startswith("image_ids"):
        assert str(info.value).startswith(f"{path}")


def test_oracle_classes_are_the_distinct_ground_truth_classes_in_order(tmp_path):
    path = write(
        tmp_path,
        "ImageId,PredictionString\n"
        "img_b,n01484850 10 10 49 49 n01440764 0 0 5 5 n01484850 60 60 90 90 \n"  # two classes, two boxes of one
        "img_a,n01498041 1 1 2 2 \n",
        "LOC_val_solution.csv",
    )
    classes = oracle_classes(path, wnids=WNIDS)
    assert classes == {"img_b": [2, 0], "img_a": [6]} and list(classes) == ["img_b", "img_a"]


# The classifier: random ResNets saved to tmp_path, small images


def save_resnet(tmp_path, depth=18, num_classes=10, *, wrap=None, name="model.pth", edit=None):
    torch.manual_seed(0)
    model = getattr(torchvision.models, f"resnet{depth}")(weights=None, num_classes=num_classes)
    state = model.state_dict()
    if edit is not None:
        edit(state)
    path = tmp_path / name
    torch.save({wrap: state} if wrap else state, path)
    return path, model.eval()


def by_hand(model, crops):
    """The mean softmax of the uint8 (3, h, w) crops, each normalised and run alone."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        probabilities = [torch.softmax(model(((c.float() / 255 - mean) / std)[None]), dim=1)[0] for c in crops]
    return torch.stack(probabilities).mean(dim=0)


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 256, size=(10, 16, 3), dtype=np.uint8)  # H = 10, W = 16


def test_depth_and_classes_come_from_the_keys(tmp_path):
    path, model = save_resnet(tmp_path, 18, 10)
    classifier = TorchvisionClassifier(state_dict_path=path, resize=32, crop_size=24)
    assert (classifier.depth, classifier.num_classes) == (18, 10)
    assert torch.equal(classifier.model.fc.weight, model.fc.weight)
    assert not classifier.model.training
    path, model = save_resnet(tmp_path, 50, 7, wrap="model", name="r50.pth")  # a dict holding it under "model"
    classifier = TorchvisionClassifier(state_dict_path=path, resize=32, crop_size=24)
    assert (classifier.depth, classifier.num_classes) == (50, 7)
    assert torch.equal(classifier.model.layer3[5].conv3.weight, model.layer3[5].conv3.weight)


def test_checkpoint_wrappers_and_absent_batch_counters_load(tmp_path):
    path, _ = save_resnet(tmp_path, wrap="state_dict")
    assert TorchvisionClassifier(state_dict_path=path, resize=8, crop_size=4).depth == 18

    def prefix_and_drop_counters(state):
        for key in list(state):
            value = state.pop(key)
            if not key.endswith("num_batches_tracked"):
                state["module." + key] = value

    path, model = save_resnet(tmp_path, edit=prefix_and_drop_counters, name="ddp.pth")
    classifier = TorchvisionClassifier(state_dict_path=path, resize=8, crop_size=4)
    assert torch.equal(classifier.model.conv1.weight, model.conv1.weight)


def test_ten_crop_is_the_mean_of_the_corners_center_and_their_flips_cut_by_hand(tmp_path, image):
    path, model = save_resnet(tmp_path)
    classifier = TorchvisionClassifier(state_dict_path=path, crop="10crop", resize=8, crop_size=4)
    resized = F.resize(torch.from_numpy(image).permute(2, 0, 1), [8], antialias=True)
    assert resized.shape == (3, 8, 12)  # shorter side 10 -> 8, longer 16 -> int(8 * 16 / 10) = 12
    corners_and_center = [
        resized[:, 0:4, 0:4],  # top left
        resized[:, 0:4, 8:12],  # top right
        resized[:, 4:8, 0:4],  # bottom left
        resized[:, 4:8, 8:12],  # bottom right
        resized[:, 2:6, 4:8],  # center: top (8 - 4) / 2 = 2, left (12 - 4) / 2 = 4
    ]
    crops = corners_and_center + [c.flip(-1) for c in corners_and_center]
    expected = by_hand(model, crops)
    probabilities = classifier(image)
    assert probabilities.shape == (10,) and probabilities.dtype == torch.float32
    torch.testing.assert_close(probabilities, expected, atol=1e-6, rtol=1e-5)
    assert abs(float(probabilities.sum()) - 1) < 1e-5
    # the flips and the corners matter: neither the five unflipped crops nor the center alone give this
    assert not torch.allclose(probabilities, by_hand(model, corners_and_center), atol=1e-6)
    assert not torch.allclose(probabilities, by_hand(model, corners_and_center[4:]), atol=1e-6)
    assert classifier.top5(image) == torch.argsort(expected, descending=True)[:5].tolist()


def test_center_crop_is_the_middle_square_cut_by_hand(tmp_path, image):
    path, model = save_resnet(tmp_path)
    classifier = TorchvisionClassifier(state_dict_path=path, crop="center", resize=8, crop_size=5)
    resized = F.resize(torch.from_numpy(image).permute(2, 0, 1), [8], antialias=True)
    # top round((8 - 5) / 2) = round(1.5) = 2, left round((12 - 5) / 2) = round(3.5) = 4
    expected = by_hand(model, [resized[:, 2:7, 4:9]])
    torch.testing.assert_close(classifier(image), expected, atol=1e-6, rtol=1e-5)
    assert classifier.crops(image).shape == (1, 3, 5, 5)
    top5 = classifier.top5(image)
    assert len(top5) == 5 and top5 == torch.argsort(expected, descending=True)[:5].tolist()


def test_a_portrait_image_resizes_its_width_to_the_shorter_side(tmp_path):
    path, model = save_resnet(tmp_path)
    image = np.random.default_rng(1).integers(0, 256, size=(40, 30, 3), dtype=np.uint8)
    classifier = TorchvisionClassifier(state_dict_path=path, resize=32, crop_size=24)
    resized = F.resize(torch.from_numpy(image).permute(2, 0, 1), [32], antialias=True)
    assert resized.shape == (3, 42, 32)  # int(32 * 40 / 30) = 42
    # top round((42 - 24) / 2) = 9, left (32 - 24) / 2 = 4
    torch.testing.assert_close(classifier(image), by_hand(model, [resized[:, 9:33, 4:28]]), atol=1e-6, rtol=1e-5)


def test_files_that_are_not_resnet_state_dicts_name_the_key(tmp_path):
    def drop(key):
        return lambda state: state.pop(key)

    path, _ = save_resnet(tmp_path, edit=drop("layer2.0.bn1.running_mean"))
    with pytest.raises(ValueError, match=rf"{path}: not a torchvision resnet18 state_dict: missing key "
                                         r"'layer2\.0\.bn1\.running_mean'"):
        TorchvisionClassifier(state_dict_path=path)
    path, _ = save_resnet(tmp_path, edit=drop("fc.weight"), name="nofc.pth")
    with pytest.raises(ValueError, match=r"nofc\.pth: not a torchvision ResNet state_dict: missing key 'fc\.weight'"):
        TorchvisionClassifier(state_dict_path=path)
    path, _ = save_resnet(tmp_path, edit=lambda s: s.update({"head.weight": torch.zeros(1)}), name="extra.pth")
    with pytest.raises(ValueError, match=r"extra\.pth: .*unexpected key 'head\.weight'"):
        TorchvisionClassifier(state_dict_path=path)
    path, _ = save_resnet(tmp_path, edit=lambda s: s.update({"fc.bias": torch.zeros(3)}), name="shape.pth")
    with pytest.raises(ValueError, match=r"shape\.pth: does not fit torchvision's resnet18: .*fc\.bias"):
        TorchvisionClassifier(state_dict_path=path)
    text = write(tmp_path, "not a checkpoint\n", "text.pth")
    with pytest.raises(ValueError, match=r"Could not read classifier weights .*text\.pth: not a PyTorch file but text"):
        TorchvisionClassifier(state_dict_path=text)
    text = write(tmp_path, "hello weights\n", "hello.pth")  # torch's own error is a bare KeyError: 101
    with pytest.raises(ValueError, match=r"Could not read classifier weights .*hello\.pth: not a PyTorch file but text"):
        TorchvisionClassifier(state_dict_path=text)
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list\.pth: holds a list, not a state_dict"):
        TorchvisionClassifier(state_dict_path=tmp_path / "list.pth")


def test_bad_settings_and_images_are_refused(tmp_path):
    path, _ = save_resnet(tmp_path)
    with pytest.raises(ValueError, match="crop must be 'center', '10crop' or 'dense'"):
        TorchvisionClassifier(state_dict_path=path, crop="5crop")
    with pytest.raises(ValueError, match=r"the dense test's scales must be integers >= 16, got \[224, 8\]"):
        TorchvisionClassifier(state_dict_path=path, crop="dense", scales=(224, 8))
    with pytest.raises(ValueError, match="crop_size <= resize"):
        TorchvisionClassifier(state_dict_path=path, resize=8, crop_size=9)
    classifier = TorchvisionClassifier(state_dict_path=path, resize=8, crop_size=4)
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) uint8 RGB image"):
        classifier(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) uint8 RGB image"):
        classifier(np.zeros((10, 10), dtype=np.uint8))


# -- the paper's dense, multi-scale test (LOC.CLASSIFIER.TEST_CROP=dense) -----------------------------------------
def test_dense_probabilities_average_each_score_map_spatially_then_the_scales_softmaxes_by_hand():
    ln3 = float(np.log(3.0))
    # scale A, a 1 x 2 map: class 0 scores (0, 0), class 1 (ln 3 - 3, ln 3 + 3): means (0, ln 3) -> (1/4, 3/4)
    scale_a = torch.tensor([[[0.0, 0.0]], [[ln3 - 3, ln3 + 3]]])
    # scale B, a 2 x 1 map: class 0 (1, -1), class 1 (0, 0): means (0, 0) -> (1/2, 1/2)
    scale_b = torch.tensor([[[1.0], [-1.0]], [[0.0], [0.0]]])
    torch.testing.assert_close(dense_probabilities([scale_a, scale_b]), torch.tensor([3 / 8, 5 / 8]))
    torch.testing.assert_close(dense_probabilities([scale_a]), torch.tensor([1 / 4, 3 / 4]))
    # the softmax comes after the spatial mean: a softmax per position, then averaged, is another number
    per_position = torch.softmax(scale_a.flatten(1), dim=0).mean(dim=1)
    assert abs(float(per_position[1]) - 0.75) > 0.1
    with pytest.raises(ValueError, match="at least one scale"):
        dense_probabilities([])


def test_dense_test_runs_the_network_fully_convolutionally_on_the_whole_image_at_each_scale(tmp_path):
    path, model = save_resnet(tmp_path)
    image = np.random.default_rng(2).integers(0, 256, size=(30, 45, 3), dtype=np.uint8)
    classifier = TorchvisionClassifier(state_dict_path=path, crop="dense", scales=(32, 64))
    inputs = classifier.scaled_images(image)
    assert [tuple(x.shape) for x in inputs] == [(3, 32, 48), (3, 64, 96)]  # shorter side 30 -> 32 and 64, whole image
    resized = [F.resize(torch.from_numpy(image).permute(2, 0, 1), [s], antialias=True) for s in (32, 64)]
    with torch.no_grad():
        maps = [classifier.score_map(x[None])[0] for x in inputs]
        # layer4's map at stride 32: 1 x 2 and 2 x 3 positions, each scored by the fc
        assert [tuple(m.shape) for m in maps] == [(10, 1, 2), (10, 2, 3)]
        # the score map's spatial mean is the network's own logits (global average pooling, then fc)
        normalised = (resized[1].float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor(
            [0.229, 0.224, 0.225]
        ).view(3, 1, 1)
        torch.testing.assert_close(maps[1].mean(dim=(1, 2)), model(normalised[None])[0], atol=1e-5, rtol=1e-5)
    # the result: the mean over the scales of the softmax of the whole image's scores
    torch.testing.assert_close(classifier(image), by_hand(model, resized), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(classifier(image), by_hand(model, resized[:1]), atol=1e-6)  # both scales count
    with pytest.raises(ValueError, match="takes no crops"):
        classifier.crops(image)


def test_the_configs_test_reaches_the_classifier(tmp_path):
    path, _ = save_resnet(tmp_path, num_classes=5)
    config = "configs/loc_shapes_r18.yaml"
    dense = build_class_predictor(load_config(config, ["MODEL.DEVICE=cpu", "LOC.CLASSIFIER.TEST_CROP=dense"]), path)
    assert dense.classifier.crop == "dense" and dense.classifier.scales == (96, 112, 160, 208, 272)
    ten = build_class_predictor(load_config(config, ["MODEL.DEVICE=cpu", "LOC.CLASSIFIER.TEST_CROP=10crop"]), path)
    assert (ten.classifier.crop, ten.classifier.resize, ten.classifier.crop_size) == ("10crop", 112, 96)
    paper = load_config("configs/ilsvrc_loc_r101.yaml")
    assert paper.LOC.CLASSIFIER.TEST_CROP == "dense" and paper.LOC.CLASSIFIER.DENSE_SCALES == [224, 256, 384, 480, 640]
