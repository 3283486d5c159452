"""Names of the evaluation's protocols and report keys: standard library only, so that ``dhrclip evaluate`` defines
its options without loading OpenCV, scikit-learn or torch (the protocols are described in ``runner``)."""

PROTOCOLS = ("paper", "service")
PIXEL_KEYS = ("pixel_auroc", "pixel_aupro", "pixel_aupro_ref", "pixel_f1_max")
IMAGE_KEYS = ("image_auroc", "image_ap", "image_f1_max", "overkill_at_escape")
DEFAULT_ESCAPE_RATE = 0.02  # overkill_at_escape: share of defective images allowed to pass
