"""Counting host synchronisations: the calls that make the host wait for the device.

On a GPU every one of these stalls the launch queue until the device has caught up; on a CPU they
cost nothing, which is why a CPU test can only find them by counting the calls themselves. A training
step should make none outside its log steps (losses accumulate on the device and cross once).
On CUDA, ``torch.cuda.set_sync_debug_mode`` reports the syncs PyTorch itself knows of, including the
implicit ones (boolean-mask indexing, ``nonzero``); ``scripts/gpu_check.sh`` runs the step under it.
"""

from __future__ import annotations

import traceback
from collections import Counter
from contextlib import contextmanager

import torch

# Tensor methods that hand a device value to Python, hence wait for the device.
SYNC_METHODS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "nonzero", "numpy")


class SyncCounter:
    """``with SyncCounter() as c: ...``; ``c.total``, ``c.by_kind`` and ``c.where`` (the callers' frames)."""

    def __init__(self, keep_stacks: bool = True):
        self.by_kind: Counter = Counter()
        self.where: list[str] = []
        self.keep_stacks = keep_stacks
        self._saved: dict = {}
        self._depth = 0

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def reset(self) -> None:
        self.by_kind.clear()
        self.where.clear()

    def _wrap(self, kind: str, fn):
        counter = self

        def wrapper(*args, **kwargs):
            if counter._depth == 0:  # count the outermost call only (item() may call __float__ inside)
                counter.by_kind[kind] += 1
                if counter.keep_stacks:
                    frame = traceback.extract_stack(limit=4)[-2]
                    counter.where.append(f"{kind} at {frame.filename}:{frame.lineno}")
            counter._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                counter._depth -= 1

        return wrapper

    def __enter__(self) -> "SyncCounter":
        for name in SYNC_METHODS:
            self._saved[("tensor", name)] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        self._saved[("cuda", "synchronize")] = torch.cuda.synchronize
        torch.cuda.synchronize = self._wrap("cuda.synchronize", torch.cuda.synchronize)
        return self

    def __exit__(self, *exc) -> None:
        for (owner, name), fn in self._saved.items():
            setattr(torch.Tensor if owner == "tensor" else torch.cuda, name, fn)
        self._saved.clear()


@contextmanager
def count_syncs(keep_stacks: bool = True):
    with SyncCounter(keep_stacks) as c:
        yield c
