"""engine.batchnorm: sync (cluster/batchnorm.py): whole-batch BatchNorm over ranks, with no host sync."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from cluster.batchnorm import SyncBatchNorm, convert_sync_batchnorm
from facesr.syncs import SyncCounter

WORLD, BATCH = 2, 8


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1),
                         nn.BatchNorm2d(4))


def _batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(BATCH, 3, 12, 12, generator=g) * 3 + 1).contiguous(memory_format=torch.channels_last)


def _weights() -> torch.Tensor:
    """Fixed output weights over the whole batch: the loss is Σ w·y, summed over the ranks' halves."""
    return torch.arange(BATCH * 4 * 12 * 12).float().sin().view(BATCH, 4, 12, 12)


def _rank(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    net = convert_sync_batchnorm(_net()).train()
    x = _batch().chunk(WORLD)[rank].clone().requires_grad_(True)
    with SyncCounter() as c:
        for _ in range(2):  # twice: running statistics move twice
            net.zero_grad()
            x.grad = None
            y = net(x)
            (y * _weights().chunk(WORLD)[rank]).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    for g in grads:  # the engine's gradient all-reduce (sum over ranks, as the loss here is a sum)
        dist.all_reduce(g)
    out[rank] = {"y": y.detach(), "dx": x.grad, "grads": grads, "syncs": c.where,
                 "buffers": [b.clone() for b in net.buffers()]}
    dist.destroy_process_group()


def test_two_ranks_equal_one_batchnorm_over_the_whole_batch():
    """Two gloo ranks with half a batch each: outputs, input gradients, summed parameter gradients and running
    statistics equal nn.BatchNorm2d on the whole batch in one process, and no call waits for the device."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.start_processes(_rank, args=(port, out), nprocs=WORLD, start_method="spawn")  # fork deadlocks in OpenMP once the parent ran torch ops
    ref = _net().train()
    x = _batch().requires_grad_(True)
    for _ in range(2):
        ref.zero_grad()
        x.grad = None
        y = ref(x)
        (y * _weights()).sum().backward()
    assert torch.allclose(torch.cat([out[r]["y"] for r in range(WORLD)]), y.detach(), atol=1e-5)
    assert torch.allclose(torch.cat([out[r]["dx"] for r in range(WORLD)]), x.grad, atol=1e-4)
    for r in range(WORLD):
        for got, want in zip(out[r]["grads"], ref.parameters()):
            assert torch.allclose(got, want.grad, atol=1e-3, rtol=1e-4)
        assert out[r]["syncs"] == []
        for got, want in zip(out[r]["buffers"], ref.buffers()):
            assert torch.allclose(got.float(), want.float(), atol=1e-5)


def test_converted_model_keeps_its_checkpoint_keys_and_eval_is_plain_batchnorm():
    """Conversion shares the tensors (same state_dict keys and values); in eval mode it is nn.BatchNorm2d."""
    net = _net()
    keys = net.state_dict().keys()
    conv = convert_sync_batchnorm(_net()).eval()
    assert conv.state_dict().keys() == keys and isinstance(conv[1], SyncBatchNorm)
    x = _batch()
    assert torch.equal(conv(x), net.eval()(x))
