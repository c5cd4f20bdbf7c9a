"""A cache for constant tensors (filter matrices, kernels) that serves training and evaluation alike."""

from __future__ import annotations

import functools

import torch


def tensor_cache(maxsize: int):
    """``functools.lru_cache`` for a function of hashable arguments returning constant tensors, each built outside
    inference mode: a cache first filled during evaluation (``torch.inference_mode``) would otherwise hold
    inference tensors, which autograd refuses to save for a later training step's backward."""

    def wrap(fn):
        @functools.lru_cache(maxsize=maxsize)
        @functools.wraps(fn)
        def cached(*args, **kwargs):
            with torch.inference_mode(False):
                return fn(*args, **kwargs)

        return cached

    return wrap
