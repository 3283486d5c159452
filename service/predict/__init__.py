"""dhrclip predict: offline scoring of image files through the engine runner and postprocess."""
