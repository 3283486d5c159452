"""Inference engine: decode/preprocess, dynamic batcher, runner (device, precision, warm-up), postprocess."""
