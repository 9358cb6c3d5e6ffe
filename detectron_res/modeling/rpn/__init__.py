"""Region Proposal Network: anchors, head, losses and proposal selection."""

from .anchors import AnchorGenerator, make_cell_anchors
from .rpn import RPN, RPNHead

__all__ = ["RPN", "AnchorGenerator", "RPNHead", "make_cell_anchors"]
