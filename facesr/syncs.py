"""Counting host synchronisations: the calls that make the host wait for the device.

On a GPU every one of these stalls the launch queue until the device has caught up; on a CPU they
cost nothing, which is why a CPU test can only find them by counting the calls themselves. A training
step should make none outside its log steps (losses accumulate on the device and cross once).

Counted (each outermost call once, with the caller's file and line):

* reading a value: ``item``, ``tolist``, ``numpy``, ``float()``/``int()``/``bool()``/``operator.index``
  of a tensor, ``torch.equal``/``allclose`` (they return Python bools);
* data-dependent shapes: ``nonzero`` (method and function), ``argwhere``, one-argument ``torch.where``,
  ``masked_select``, ``unique``, and boolean-mask indexing (``x[mask]``, ``x[mask] = v``, ``index_put``
  with a bool index): their output size lives on the device;
* copies that block: ``.cpu()``, and ``.to(device)`` without ``non_blocking=True`` (on a GPU that is
  a device-to-host copy, or a host-to-device copy from pageable memory, each a full stream sync).
  A CPU run cannot see whether such a call crosses (on a GPU ``x.to(x.device)`` is free), so it counts
  every one made from this repository's code, where explicit moves must say ``non_blocking=True``, and
  from libraries only those that cross devices here (DeepSpeed's gradient norm calls
  ``.to(its own device)`` every step: free on a GPU, left to the GPU check);
* ``torch.cuda.synchronize`` and ``Stream``/``Event.synchronize``.

A CPU run cannot tell a tensor that would live on the GPU from a host one, so the count is conservative:
code that really works on the host uses numpy (``facesr.degradations`` draws its parameters that way). On
CUDA, ``torch.cuda.set_sync_debug_mode("error")`` checks the same for real (``python -m launch.gpu_check``).
"""

from __future__ import annotations

import sys
import traceback
from collections import Counter
from pathlib import Path
from contextlib import contextmanager

import torch

# Tensor methods that hand a device value to Python, hence wait for the device, whatever their arguments.
SYNC_METHODS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "nonzero", "numpy", "cpu",
                "argwhere", "masked_select", "unique", "unique_consecutive", "equal", "allclose")
SYNC_FUNCTIONS = ("nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "equal", "allclose",
                  "is_nonzero")
INDEXING = ("__getitem__", "__setitem__", "index_put", "index_put_")  # counted with a bool index only
REPO = str(Path(__file__).resolve().parents[1])  # this checkout: facesr/, cluster/, shards/, launch/, tests/


def _has_mask(index) -> bool:
    if isinstance(index, torch.Tensor):
        return index.dtype == torch.bool
    if isinstance(index, (tuple, list)):
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
    return False


def _blocking_copy(self: torch.Tensor, args, kwargs) -> bool:
    """Whether ``self.to(*args, **kwargs)`` may be a blocking copy between host and device (see the module doc)."""
    other = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("other")
    if isinstance(other, torch.Tensor):
        return other.device != self.device and not (args[1:2] == (True,) or kwargs.get("non_blocking", False))
    try:
        device, _, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
    except (TypeError, RuntimeError):
        return False
    if device is None or non_blocking:
        return False
    caller = sys._getframe(3).f_code.co_filename  # _blocking_copy <- when-lambda <- wrapper <- the caller
    return device != self.device or _ours(caller)


def _ours(filename: str) -> bool:
    """Whether code in ``filename`` is this repository's (a venv inside the checkout holds other people's)."""
    return filename.startswith(REPO) and "site-packages" not in filename and "dist-packages" not in filename


class SyncCounter:
    """``with SyncCounter() as c: ...``; ``c.total``, ``c.by_kind`` and ``c.where`` (the callers' frames)."""

    def __init__(self, keep_stacks: bool = True):
        self.by_kind: Counter = Counter()
        self.where: list[str] = []
        self.keep_stacks = keep_stacks
        self._saved: list[tuple[object, str, object]] = []
        self._depth = 0

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def reset(self) -> None:
        self.by_kind.clear()
        self.where.clear()

    def _count(self, kind: str) -> None:
        self.by_kind[kind] += 1
        if self.keep_stacks:
            frame = traceback.extract_stack(limit=4)[-3]
            self.where.append(f"{kind} at {frame.filename}:{frame.lineno}")

    def _wrap(self, kind: str, fn, when=None):
        counter = self

        def wrapper(*args, **kwargs):
            if counter._depth == 0 and (when is None or when(*args, **kwargs)):  # outermost calls only
                counter._count(kind)
            counter._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                counter._depth -= 1

        return wrapper

    def _patch(self, owner, name: str, kind: str, when=None) -> None:
        fn = getattr(owner, name)
        self._saved.append((owner, name, fn))
        setattr(owner, name, self._wrap(kind, fn, when))

    def __enter__(self) -> "SyncCounter":
        for name in SYNC_METHODS:
            self._patch(torch.Tensor, name, name)
        for name in SYNC_FUNCTIONS:
            self._patch(torch, name, f"torch.{name}")
        self._patch(torch, "where", "torch.where(cond)", lambda *a, **k: len(a) + len(k) == 1)
        for name in INDEXING:
            self._patch(torch.Tensor, name, "mask indexing", lambda self, index, *a, **k: _has_mask(index))
        self._patch(torch.Tensor, "to", "blocking .to()", lambda self, *a, **k: _blocking_copy(self, a, k))
        self._patch(torch.cuda, "synchronize", "cuda.synchronize")
        self._patch(torch.cuda.Stream, "synchronize", "cuda.Stream.synchronize")
        self._patch(torch.cuda.Event, "synchronize", "cuda.Event.synchronize")
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, fn in reversed(self._saved):
            setattr(owner, name, fn)
        self._saved.clear()


@contextmanager
def count_syncs(keep_stacks: bool = True):
    with SyncCounter(keep_stacks) as c:
        yield c
