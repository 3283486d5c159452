"""Prompt training: losses (``losses``) and the training loop."""
