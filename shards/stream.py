"""Streaming shards into training: ``build_loader(urls, cfg, rank=, world_size=, epoch=)``.

One epoch is exactly ``len(loader)`` batches on every rank, whatever the shard
sizes: each rank takes a disjoint slice of the shards (``urls[rank::world]``),
each data-loader worker a disjoint slice of that (``[worker::workers]``), and
every worker *resamples* shards from its slice forever; the loader stops after
``len(loader)`` batches. No rank runs dry early, so no collective waits on a
rank that has left the loop. Build a new loader per epoch: the epoch enters
every seed, which derives from (seed, epoch, rank, worker).

Each worker runs a WebDataset pipeline (``wds.DataPipeline``):
``ResampledShards`` over its slice -> tar reading (``tar_file_expander``,
``group_by_keys``) -> member check (``wds.map``) -> ``wds.shuffle`` of the
raw bytes -> decoding (``wds.map``) -> ``wds.batched``; errors go to one
counting handler.

Shards can be local paths, ``http(s)://`` URLs or ``pipe:`` commands, opened by
WebDataset's ``gopen``, or object-store URIs (``s3://bucket/prefix/train-000000.tar``),
streamed through ``shards.store`` (no copy first). With ``cache_dir`` a streamed
shard is also teed into a local file, read from there next time; the cache is
kept under ``cache_bytes`` by dropping the least recently used shards.

Members are decoded by our own safe decoders only: PNG through PIL, raw
``.u8`` levels, ``cls`` as an ASCII integer. A sample holding any other member
is refused — ``.pyd``/``.pickle``/``.pth`` would otherwise be unpickled by
WebDataset's default decoders, and unpickling runs arbitrary code.

Decode errors (unreadable or unreachable shard, corrupt PNG, refused member, wrong size) skip
the sample, are counted and logged at most once per ``log_interval_s`` per
worker. The count is exposed as ``loader.decode_errors``: cumulative over the
epoch for this rank (sum over its workers), updated with every batch, so
training can export it as a counter (add the increase since the last read).

Batches are uint8, as decoded: a quarter of float32's bytes to pin and to copy
to the device, where ``facesr.step.to_device`` converts them. Augmentation
(the priors' flips and crops) happens on the device too (``facesr.augment``):
the loader only decodes.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import random
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.handlers import reraise_exception
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from facesr.prefetch import prefetched
from facesr.vocab import LEVELS, SIZES

from .store import ObjectPath, is_uri

log = logging.getLogger(__name__)
# the only members a sample may hold: each level as PNG or as raw uint8 bytes (`facesr prep --members`)
MEMBERS = {f"{k}.png" for k in LEVELS} | {f"{k}.u8" for k in LEVELS} | {"cls", "json"}


@dataclass(frozen=True)
class StreamConfig:
    batch_size: int = 8  # per rank; the paper's stage 2 uses 8, stage 1 (priors) 128
    num_samples: int = 0  # samples in the split (manifest; see shards.manifest.split_samples): sets the epoch
    batches_per_epoch: int = 0  # per rank; 0 = num_samples // (world_size * batch_size)
    workers: int = 2  # data-loader processes per rank (0 = decode in a prefetch thread of the training process)
    shuffle: int = 1000  # shuffle buffer in samples per worker; shards already mix identities; 0 = off
    labelled_only: bool = False  # drop cls == -1 samples (the priors learn only the label set)
    levels: tuple[str, ...] = LEVELS  # levels to decode; the priors need only x2, x4, hr
    seed: int = 0  # with (epoch, rank, worker) seeds shard resampling, shuffling and augmentation
    prefetch: int = 4  # batches prefetched per worker
    log_interval_s: float = 60.0  # at most one decode-error log line per worker per interval
    meta: bool = False  # add "key" and "url" lists and "worker" to batches (tests, debugging)
    max_empty_reads: int = 50  # consecutive shard reads with no good sample before giving up
    pin_memory: bool = False  # page-locked batches, so a CUDA copy with non_blocking=True is asynchronous
    cache_dir: str = ""  # local folder keeping object-store shards once streamed; "" = stream them every time
    cache_bytes: int = 0  # bound on cache_dir (least recently used shards dropped); 0 = no bound
    num_classes: int = 0  # the manifest's class count: a cls outside -1..num_classes-1 is refused; 0 = unchecked

    def epoch_batches(self, world_size: int) -> int:
        n = self.batches_per_epoch or self.num_samples // (world_size * self.batch_size)
        if n <= 0:
            raise ValueError(f"epoch is empty: set StreamConfig.num_samples (from the manifest) or batches_per_epoch "
                             f"(num_samples={self.num_samples}, world_size={world_size}, batch={self.batch_size})")
        return n


class DecodeError(ValueError):
    """A sample that cannot become tensors; counted and skipped."""


def stream_seed(seed: int, epoch: int, rank: int, worker: int) -> int:
    """A 64-bit seed from (seed, epoch, rank, worker); hashing keeps neighbouring tuples unrelated."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}:{rank}:{worker}".encode()).digest()[:8], "little")


def assign_shards(urls: list[str], rank: int, world_size: int, worker: int, workers: int) -> list[str]:
    """This (rank, worker)'s shards: disjoint from every other pair's while there are enough shards."""
    node = urls[rank::world_size] if len(urls) >= world_size else urls
    return node[worker::workers] if len(node) >= workers else node


class _ErrorCounter:
    """WebDataset exception handler that counts, logs at a limited rate, and lets the stream go on."""

    def __init__(self, where: str, interval: float):
        self.where, self.interval = where, interval
        self.count, self.since_log, self.last_log = 0, 0, -float("inf")

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        self.since_log += 1
        now = time.monotonic()
        if now - self.last_log >= self.interval:
            log.warning("%s: %d decode errors (%d since last message); latest: %s",
                        self.where, self.count, self.since_log, str(exn)[:300])
            self.last_log, self.since_log = now, 0
        return True

    def decode_error(self, exn: Exception) -> bool:
        """Handler of the member-check and decode stages: a ``DecodeError`` is damage, anything else a bug."""
        if not isinstance(exn, DecodeError):
            raise exn
        return self(exn)


def decode_png(data: bytes, size: int) -> torch.Tensor:
    """PNG bytes -> uint8 (3, size, size); refuses anything but an RGB PNG of that size.

    PIL, not torchvision.io.decode_png: that is ~20% faster but deprecated since torchvision 0.29.
    """
    with warnings.catch_warnings():  # the size check below refuses what PIL would only warn about
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data), formats=["PNG"])  # the header only
    if img.mode != "RGB" or img.size != (size, size):  # before a pixel is decoded: a 13000² PNG costs nothing
        raise DecodeError(f"expected a {size}x{size} RGB PNG, got {img.size[0]}x{img.size[1]} {img.mode}")
    img.load()
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)  # (3, S, S) uint8


def decode_u8(data: bytes, size: int) -> torch.Tensor:
    """Raw level bytes -> uint8 (3, size, size); refuses any other length."""
    if len(data) != 3 * size * size:
        raise DecodeError(f"expected {3 * size * size} bytes of a {size}x{size} RGB level, got {len(data)}")
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy()).view(3, size, size)


def check_members(raw: dict, num_classes: int = 0) -> int:
    """Refuse a sample holding any member outside ``MEMBERS`` (before anything is decoded); returns its cls, which
    must be -1 (unlabelled) or a class index below ``num_classes`` (when given): an index past the class map
    would reach the loss as an out-of-range target."""
    refused = sorted(k for k in raw if not k.startswith("__") and k not in MEMBERS)
    if refused:
        raise DecodeError(f"{raw.get('__key__')}: refusing members {refused} (only {sorted(MEMBERS)} are decoded; "
                          "pickle-capable members are never loaded)")
    try:
        cls = int(raw["cls"][:20].decode("ascii"))
    except (KeyError, UnicodeDecodeError, ValueError):
        raise DecodeError(f"{raw.get('__key__')}: missing or malformed cls") from None
    if cls < -1 or num_classes and cls >= num_classes:
        raise DecodeError(f"{raw.get('__key__')}: cls {cls} outside -1..{num_classes - 1 if num_classes else 'N'}")
    return cls


def decode_sample(raw: dict, levels=LEVELS, num_classes: int = 0) -> dict:
    """A WebDataset raw sample (bytes per member) -> {level: uint8 (3, S, S), "cls": int}; never unpickles."""
    out = {"cls": check_members(raw, num_classes)}
    for lvl in levels:
        raw_bytes = f"{lvl}.u8" in raw
        if not raw_bytes and f"{lvl}.png" not in raw:
            raise DecodeError(f"{raw.get('__key__')}: no {lvl}.png or {lvl}.u8")
        try:
            if raw_bytes:
                out[lvl] = decode_u8(raw[f"{lvl}.u8"], SIZES[lvl])
            else:
                out[lvl] = decode_png(raw[f"{lvl}.png"], SIZES[lvl])
        except Exception as exn:  # a wrong size or length, or whatever PIL found: name the sample and member
            raise DecodeError(f"{raw.get('__key__')}: {lvl}.{'u8' if raw_bytes else 'png'}: {exn}") from None
    return out


class _WorkerStream(IterableDataset):
    """What one data-loader worker yields: endless batches from its own shards (module-level: pickles)."""

    def __init__(self, urls: list[str], cfg: StreamConfig, rank: int, world_size: int, epoch: int):
        self.urls, self.cfg, self.rank, self.world_size, self.epoch = urls, cfg, rank, world_size, epoch
        self.stop: threading.Event | None = None  # set by an in-process consumer that has gone (workers=0)

    def __iter__(self) -> Iterator[dict]:
        # Built here, in the worker, so a pipeline is a pure function of (seed, epoch, rank, worker): a
        # ResampledShards iterated twice would move on to its own next "epoch".
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        cfg, where = self.cfg, f"rank {self.rank} worker {worker}"
        worker_seed = functools.partial(stream_seed, cfg.seed, self.epoch, self.rank, worker)
        errors = _ErrorCounter(where, cfg.log_interval_s)
        usable = _Usable(cfg, where, errors)
        return iter(wds.DataPipeline(
            # WebDataset's split_by_node/split_by_worker read the rank from the environment and split a stream
            # of shards; here the rank is an argument and the slices must stay disjoint while resampling
            # forever, so the split comes first (assign_shards) and ResampledShards resamples the slice.
            wds.ResampledShards(assign_shards(self.urls, self.rank, self.world_size, worker, workers),
                                worker_seed=worker_seed, deterministic=True),
            usable.reads,
            _read_shards(handler=errors, cache_dir=cfg.cache_dir, cache_bytes=cfg.cache_bytes, stop=self.stop),
            wds.map(usable, handler=errors.decode_error),
            # shuffle PNG bytes (~75 kB a sample), not tensors; fill the whole buffer before the first sample
            wds.shuffle(cfg.shuffle, initial=cfg.shuffle, rng=random.Random(worker_seed()))
            if cfg.shuffle > 1 else None,
            _until(self.stop),  # a gone consumer: don't decode (or log) the shuffle buffer to its end
            wds.map(functools.partial(_decoded, cfg=cfg, errors=errors), handler=errors.decode_error),
            wds.batched(cfg.batch_size, collation_fn=functools.partial(_collate, cfg=cfg, worker=worker),
                        partial=False),
        ))


class _Usable:
    """The member check (before anything is decoded; None, which ``wds.map`` drops, for an unlabelled sample with
    ``labelled_only``), and a give-up after ``max_empty_reads`` shard reads in a row without one usable sample:
    resampling shards that are all damaged (or unlabelled) would otherwise read forever."""

    def __init__(self, cfg: StreamConfig, where: str, errors: _ErrorCounter):
        self.cfg, self.where, self.errors = cfg, where, errors
        self.empty = 0  # shard reads since the last usable sample, the one under way included

    def reads(self, shards: Iterator[dict]) -> Iterator[dict]:
        for shard in shards:
            if self.empty >= self.cfg.max_empty_reads:
                raise RuntimeError(f"{self.where}: {self.empty} shard reads in a row gave no usable sample "
                                   f"({self.errors.count} errors{', labelled_only' if self.cfg.labelled_only else ''}"
                                   f"; latest shard {shard['url']})")
            self.empty += 1
            yield shard

    def __call__(self, raw: dict) -> dict | None:
        if check_members(raw, self.cfg.num_classes) < 0 and self.cfg.labelled_only:
            return None
        self.empty = 0
        return raw


def _until_(samples: Iterator[dict], stop: threading.Event | None) -> Iterator[dict]:
    for s in samples:
        if stop is not None and stop.is_set():
            return
        yield s


_until = wds.pipelinefilter(_until_)


def _decoded(raw: dict, cfg: StreamConfig, errors: _ErrorCounter) -> dict:
    s = decode_sample(raw, cfg.levels, cfg.num_classes)
    if cfg.meta:
        s["key"], s["url"] = raw["__key__"], raw["__url__"]
    # the count as this sample is ready: wds.batched hands a batch on only after pulling the next sample, whose
    # errors belong to the next batch
    s["__errors__"] = errors.count
    return s


def _collate(batch: list[dict], cfg: StreamConfig, worker: int) -> dict:
    out = {k: torch.stack([s[k] for s in batch]) for k in cfg.levels}  # (B, 3, S, S) uint8
    out["cls"] = torch.tensor([s["cls"] for s in batch], dtype=torch.int64)  # (B,)
    if cfg.meta:
        out["key"], out["url"], out["worker"] = [s["key"] for s in batch], [s["url"] for s in batch], worker
    out["__worker__"], out["__errors__"] = worker, batch[-1]["__errors__"]
    return out


def _read_shards_(shards: Iterator[dict], handler=reraise_exception, cache_dir: str = "", cache_bytes: int = 0,
                  stop: threading.Event | None = None) -> Iterator[dict]:
    # one tar_file_expander/group_by_keys per shard, not one over the stream: a damaged tar yields no end-of-shard
    # marker, and its partial last sample would be grouped with the next read's first one when the keys agree
    # (resampling reads the same shard again)
    for shard in shards:
        for raw in shard_samples(shard["url"], handler, cache_dir, cache_bytes):
            if stop is not None and stop.is_set():
                return  # the prefetch thread's consumer is gone: don't read (or log) any further
            yield raw


_read_shards = wds.pipelinefilter(_read_shards_)


def shard_samples(url: str, handler=None, cache_dir: str = "", cache_bytes: int = 0) -> Iterator[dict]:
    """Raw samples of one shard; an object-store URI is streamed (through ``cache_dir`` when given). ``handler``
    (an ``_ErrorCounter``) counts an unreachable object or damaged tar and the stream goes on; None raises."""
    handler = handler or reraise_exception
    if not is_uri(url):  # paths, http(s), pipe: WebDataset's gopen
        yield from group_by_keys(tar_file_expander(url_opener([{"url": url}], handler=handler), handler=handler),
                                 handler=handler)
        return
    # Object stores through shards.store rather than a gopen_schemes entry: that table is global, and the cache
    # (a per-loader setting) could not reach it. WebDataset's own cache_dir (FileCache) downloads a whole shard
    # before its first sample, names cached files by their last path part only (two prefixes' train-000000.tar
    # collide), evicts by creation time at most every 30 s, and retries a failed download 10 times with sleeps
    # whenever the handler says go on: hence ShardCache.
    try:
        stream = ShardCache(cache_dir, cache_bytes).open(url) if cache_dir else ObjectPath(url).open_input()
    except Exception as exn:  # unreachable endpoint, missing object, refused credentials
        if handler(exn):
            return
        raise
    try:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}], handler=handler),
                                 handler=handler)
    finally:
        stream.close()  # now, not when collected: the tee publishes the cached copy on close


class ShardCache:
    """Local copies of object-store shards, made while they stream (a tee), bounded by least-recent use."""

    TAIL = 1 << 16  # a tar read to its end-of-archive marker has at most this much padding left unread

    def __init__(self, folder: str, max_bytes: int = 0):
        self.folder, self.max_bytes = Path(folder), max_bytes
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, url: str) -> Path:
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        return self.folder / f"{digest}-{url.rsplit('/', 1)[-1]}"

    def open(self, url: str):
        local = self.path(url)
        try:
            f = open(local, "rb")
            os.utime(local)  # recently used: evicted last
            return f
        except FileNotFoundError:
            return _Tee(ObjectPath(url).open_input(), local, self)

    def evict(self, keep: Path) -> None:
        if not self.max_bytes:
            return
        files = []
        for p in self.folder.iterdir():
            try:
                if not p.name.startswith("."):
                    files.append((p.stat().st_mtime, p.stat().st_size, p))
            except FileNotFoundError:  # another worker evicted it
                continue
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):
            if total <= self.max_bytes:
                break
            if p != keep:
                p.unlink(missing_ok=True)
                total -= size


class _Tee(io.RawIOBase):
    """A remote shard's stream that also writes what it reads to a cache file, published only when whole."""

    def __init__(self, remote, local: Path, cache: ShardCache):
        self.remote, self.local, self.cache = remote, local, cache
        self.tmp = local.with_name(f".{local.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        self.out, self.eof = open(self.tmp, "wb"), False

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.remote.read(n) if n is not None and n >= 0 else self.remote.read()
        if not data and n != 0:
            self.eof = True
        self.out.write(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self.closed:
            return
        try:
            if not self.eof:  # tarfile stops at the end-of-archive marker: read the padding after it
                self.read(self.TAIL)
                self.read(1) if not self.eof else None
            self.out.close()
            self.remote.close()
            if self.eof:
                os.replace(self.tmp, self.local)
                self.cache.evict(keep=self.local)
        finally:
            Path(self.tmp).unlink(missing_ok=True)
            super().close()

    TAIL = ShardCache.TAIL


_WARNED_SHARED: set[tuple] = set()  # shard sets already warned about in this process


class ShardLoader:
    """One epoch of exactly ``len(self)`` batches for one rank; ``decode_errors`` counts this epoch's errors."""

    def __init__(self, urls: list[str], cfg: StreamConfig, rank: int, world_size: int, epoch: int):
        self.cfg, self.n = cfg, cfg.epoch_batches(world_size)
        self.dataset = _WorkerStream(urls, cfg, rank, world_size, epoch)
        self._errors: dict[int, int] = {}
        shared = (tuple(urls), world_size, max(1, cfg.workers))
        if len(urls) < world_size * max(1, cfg.workers) and shared not in _WARNED_SHARED:
            _WARNED_SHARED.add(shared)  # once per process and shard set, not once per epoch's loader
            log.warning("%d shards for %d ranks x %d workers: some workers share shards, so samples can repeat "
                        "within an epoch; write smaller shards", len(urls), world_size, max(1, cfg.workers))

    def __len__(self) -> int:
        return self.n

    @property
    def decode_errors(self) -> int:
        return sum(self._errors.values())

    def __iter__(self) -> Iterator[dict]:
        self._errors = {}
        if self.cfg.workers == 0:  # decode in a thread of this process, ahead of the step that consumes it
            self.dataset.stop = threading.Event()
            it = prefetched(iter(self.dataset), self.cfg.prefetch, self.dataset.stop, "shard-prefetch")
        else:
            it = iter(DataLoader(self.dataset, batch_size=None, num_workers=self.cfg.workers,
                                 prefetch_factor=self.cfg.prefetch, persistent_workers=False,
                                 pin_memory=self.cfg.pin_memory))
        try:
            # next(), not islice or WebLoader(...).with_epoch(n): a stream that ended early must raise, not end
            # this rank's epoch short (or, with_epoch, start the same seeds again)
            for _ in range(self.n):
                batch = next(it)
                self._errors[batch.pop("__worker__")] = batch.pop("__errors__")
                if self.cfg.pin_memory and self.cfg.workers == 0:  # DataLoader pins only with worker processes
                    batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
                yield batch
        finally:
            del it  # shuts the worker processes down


def read_in_order(urls: list[str], levels=LEVELS, batch_size: int = 32, errors: list | None = None,
                  num_classes: int = 0) -> Iterator[dict]:
    """Every sample of ``urls`` exactly once, in shard order, decoded as training decodes it (evaluation:
    the training stream resamples, evaluation must not). Batches ``{level: uint8, "cls", "key"}``. With an
    ``errors`` list, damaged samples are skipped and appended to it as (key, reason), and a shard that cannot
    be read on (a damaged tar) as (its url, reason), the stream going on with the next shard: the caller
    reports them (an evaluation must not shrink silently). Without one, damage raises."""
    batch: list[dict] = []
    for raw in (raw for u in urls for raw in shard_samples(u, _Recorder(u, errors) if errors is not None else None)):
        try:
            s = decode_sample(raw, levels, num_classes)
        except DecodeError as exn:
            if errors is not None:
                errors.append((raw.get("__key__"), str(exn)))
                continue
            raise
        s["key"] = raw["__key__"]
        batch.append(s)
        if len(batch) == batch_size:
            yield _stack(batch, levels)
            batch = []
    if batch:
        yield _stack(batch, levels)


class _Recorder:
    """WebDataset handler of ``read_in_order``: a damaged tar is recorded against its shard and the stream goes on."""

    def __init__(self, url: str, errors: list):
        self.url, self.errors = url, errors

    def __call__(self, exn: Exception) -> bool:
        self.errors.append((self.url, " ".join(str(exn).split())[:300]))
        return True


def _stack(batch: list[dict], levels) -> dict:
    out = {k: torch.stack([s[k] for s in batch]) for k in levels}  # (B, 3, S, S) uint8
    out["cls"] = torch.tensor([s["cls"] for s in batch], dtype=torch.int64)
    out["key"] = [s["key"] for s in batch]
    return out


def build_loader(urls: list[str] | str, cfg: StreamConfig, *, rank: int, world_size: int, epoch: int) -> ShardLoader:
    """Batches ``{"lr","x2","x4","hr": uint8 (B,3,S,S), "cls": int64 (B,)}``; the same count on every rank."""
    urls = expand_urls(urls) if isinstance(urls, str) else list(urls)
    if not urls:
        raise ValueError("build_loader: no shards given")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    bad = [k for k in cfg.levels if k not in LEVELS]
    if bad:
        raise ValueError(f"unknown levels {bad}; choose from {LEVELS}")
    return ShardLoader(urls, cfg, rank, world_size, epoch)
