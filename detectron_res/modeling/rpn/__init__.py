"""Region Proposal Network: anchors, head, losses and proposal selection."""

from .anchors import AnchorGenerator, make_cell_anchors
from .rpn import RPN, NonFiniteProposalsError, RPNHead

__all__ = ["RPN", "AnchorGenerator", "NonFiniteProposalsError", "RPNHead", "make_cell_anchors"]
