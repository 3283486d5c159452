"""``dhrclip export``: the DHR vision path as an ONNX graph (or an INT8 OpenVINO IR) for the non-torch backends."""
