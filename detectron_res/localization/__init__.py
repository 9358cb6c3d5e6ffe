"""The ILSVRC localization pipeline (the paper's Appendix C): class-specific RPN stage, R-CNN stage, class predictions and submissions."""
