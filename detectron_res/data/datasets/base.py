"""The in-memory form every data set loader returns: records plus the class metadata.

A *record* is one image, as a plain dict (the detectron2 convention):

    {
        "file_name": str,            # absolute or cwd-relative path of the image file
        "image_id": int | str,       # the data set's own id (COCO image id, VOC image name)
        "height": int, "width": int, # original image size in pixels
        "annotations": [             # may be empty
            {
                "bbox": [x1, y1, x2, y2],  # float, absolute pixels, original image, XYXY
                "category_id": int,        # contiguous class index in [0, num_classes)
                "iscrowd": 0 | 1,          # COCO crowd region (ignored for training)
                # optional: "difficult": 0 | 1, "truncated": 0 | 1 (VOC)
            },
        ],
    }
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DetectionDataset:
    """Records of one data set and what is needed to interpret and evaluate them.

    Attributes:
        name: the name the config used for this data set.
        records: one dict per image, see the module docstring.
        class_names: name of each contiguous class index.
        category_ids: the data set's own category id for each contiguous class index
            (COCO ids are not contiguous); used when writing COCO results json.
        json_file: the COCO ground-truth json these records came from, if any; COCO evaluation
            uses it directly so that areas and crowd flags are the official ones.
        extra: loader-specific metadata (for example the VOC root and split).
    """

    name: str
    records: list[dict]
    class_names: list[str]
    category_ids: list[int]
    json_file: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.records)
