"""The dataset splits a command may read (standard library only: ``dhrclip train`` takes its choices from here).

``"all"`` is the train entries, then the test entries, of every class (:func:`service.data.load_dataset`).
"""

SPLITS = ("train", "test", "all")
