"""Stand-ins shared by the RPN and detector tests: a head with fixed outputs, and an RPN built with small defaults
(one 16-px square anchor per cell centred at (i + 0.5) * 16, box coder weights 1, every anchor sampled)."""

import torch
from torch import nn
from torchvision.models.detection._utils import BoxCoder

from detectron_res.modeling.rpn import RPN, AnchorGenerator, RPNHead


class FixedHead(nn.Module):
    """Returns the given (N, A, H, W) objectness and (N, 4A, H, W) deltas whatever the features."""

    def __init__(self, objectness: torch.Tensor, deltas: torch.Tensor):
        super().__init__()
        self.objectness, self.deltas = objectness, deltas

    def forward(self, features):
        return self.objectness, self.deltas


def make_rpn(head=None, **overrides) -> RPN:
    args = dict(
        head=head if head is not None else RPNHead(in_channels=4, head_channels=4, num_anchors=1),
        anchor_generator=AnchorGenerator(sizes=[16], aspect_ratios=[1.0], stride=16, offset=0.5),
        box_coder=BoxCoder((1.0, 1.0, 1.0, 1.0)),
        positive_iou=0.7,
        negative_iou=0.3,
        batch_size_per_image=1000,
        positive_fraction=0.5,
        boundary_thresh=-1,
        pre_nms_topk=(100, 100),
        post_nms_topk=(100, 100),
        nms_thresh=0.7,
        min_size=0.0,
        smooth_l1_beta=0.5,
    )
    args.update(overrides)
    return RPN(**args)
