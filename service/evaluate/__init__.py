"""Evaluation: segmentation and image-level metrics (``metrics``) and the evaluation protocol."""
