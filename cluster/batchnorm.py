"""BatchNorm statistics over the whole data-parallel batch, without a host sync (``engine.batchnorm: sync``).

``torch.nn.SyncBatchNorm`` gathers every rank's mean, inverse std and count, then drops ranks with empty
inputs by boolean-mask indexing (``torch/nn/modules/_functions.py``): the mask's size lives on the GPU, so
every BN layer's forward waits for the device (the paper cascade has 48). Here every rank forwards the same
micro-batch size (the engine's batching rule), so the counts are known on the host: per layer, one
``all_gather`` of each rank's (mean, variance) in forward and one ``all_reduce`` of the two gradient sums in
backward, both enqueued on the device, nothing read back. The maths is torch's SyncBatchNorm's (weight and
bias gradients local, summed by the engine's gradient all-reduce like every other parameter's). It also runs
on gloo, so CPU workers can use it, which torch's refuses.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


class _GlobalBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps: float, momentum: float, group, world: int):
        xf = x.float()
        var, mean = torch.var_mean(xf, dim=(0, 2, 3), correction=0)  # this rank's (C,) statistics
        gathered = torch.empty(world * 2, x.shape[1], device=x.device)  # ranks concatenated along dim 0
        dist.all_gather_into_tensor(gathered, torch.stack([mean, var]), group=group)
        gathered = gathered.view(world, 2, -1)
        means = gathered[:, 0]  # (world, C); equal counts, so the global mean is their mean
        mean = means.mean(0)
        var = gathered[:, 1].mean(0) + (means - mean).pow(2).mean(0)  # within + between ranks
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None:
            total = x.numel() // x.shape[1] * world  # a host int: no count crosses from the device
            with torch.no_grad():
                running_mean.lerp_(mean, momentum)
                running_var.lerp_(var * (total / max(total - 1, 1)), momentum)  # unbiased, as nn.BatchNorm2d
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.group, ctx.total = group, x.numel() // x.shape[1] * world
        y = (xf - _per_channel(mean)) * _per_channel(invstd * weight) + _per_channel(bias)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        dyf = dy.float()
        xhat = (x.float() - _per_channel(mean)) * _per_channel(invstd)
        local = torch.stack([dyf.sum((0, 2, 3)), (dyf * xhat).sum((0, 2, 3))])  # (2, C): Σdy, Σdy·x̂ on this rank
        grad_bias, grad_weight = local.unbind(0)
        total = local.clone()
        dist.all_reduce(total, group=ctx.group)
        sum_dy, sum_dy_xhat = total.unbind(0)
        dx = (dyf - _per_channel(sum_dy / ctx.total) - xhat * _per_channel(sum_dy_xhat / ctx.total))
        dx = dx * _per_channel(invstd * weight)
        return dx.to(dy.dtype), grad_weight, grad_bias, None, None, None, None, None, None


class SyncBatchNorm(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same parameters, buffers and checkpoint keys) whose training statistics cover every
    rank's micro-batch; plain BatchNorm in eval mode and without a process group."""

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        if not self.affine or self.momentum is None:
            raise ValueError("SyncBatchNorm needs affine=True and a momentum (the models here use both)")
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
        world = dist.get_world_size(self.process_group)
        running = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        return _GlobalBatchNorm.apply(x, self.weight, self.bias, *running, self.eps, self.momentum,
                                      self.process_group, world)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Every ``nn.BatchNorm2d`` in ``module`` replaced by ``SyncBatchNorm`` holding the same tensors."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group=process_group)
        out.weight, out.bias = module.weight, module.bias  # the same tensors, as torch's converter shares them
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        return out
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, process_group))
    return module
