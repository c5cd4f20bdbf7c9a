"""One vocabulary from shard keys to metric names.

A sample is a quadruplet ``lr`` (24²), ``x2`` (48²), ``x4`` (96²), ``hr`` (192²)
plus ``cls``. Network outputs are keyed by the target they are compared with
(``x2``, ``x4``, ``hr``); metric ``scale`` labels name the magnification
(``x2``, ``x4``, ``x8``).
"""

LEVELS = ("lr", "x2", "x4", "hr")  # shard and batch keys, coarse to fine
SIZES = {"lr": 24, "x2": 48, "x4": 96, "hr": 192}  # side length in pixels
TARGETS = ("x2", "x4", "hr")  # supervised outputs of the cascade, coarse to fine
SCALE_OF = {"x2": "x2", "x4": "x4", "hr": "x8"}  # batch key -> metric scale label
KEY_OF = {v: k for k, v in SCALE_OF.items()}  # metric scale label -> batch key
SCALES = tuple(SCALE_OF[k] for k in TARGETS)  # ("x2", "x4", "x8")
