"""Batches from the data loader to the device, one batch ahead (issue 15: uint8 batches, pinned,
non-blocking, prefetched on a side stream).

The loader's worker processes decode and augment; its pin-memory thread puts each batch in
page-locked host memory (``pin_memory=True``), from which a copy to the GPU runs asynchronously.
`DeviceFeed` issues batch k+1's copy on a side CUDA stream while step k runs on the current stream,
so the copy overlaps compute instead of preceding it. A uint8 224x224 image is 150 KB on the wire,
a float32 one 602 KB.

With ``--decode gpu`` the batch carries JPEG files' bytes instead of images (``deferred``, see
`maefast.train.data.collate`): the same side stream decodes them (nvJPEG), crops, resizes and
flips them (`maefast.train.gpu_decode.DeviceDecode`), one batch ahead as well.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

BATCH_TENSORS = ("images", "noise")  # the tensors of a `data.collate` batch that go to the device


def bytes_per_image(input_size: int, dtype: torch.dtype, channels: int = 3) -> int:
    """Bytes one image of the batches takes on the way to the device (the masking noise aside)."""
    return channels * input_size * input_size * torch.empty((), dtype=dtype).element_size()


def describe_batches(decode: str, image_dtype: str, input_size: int, device_type: str) -> str:
    """The start's line on what a batch is and how it travels (``maefast train``)."""
    from .config import IMAGE_DTYPES

    if decode == "gpu":
        return (f"batches: the JPEG files to the {device_type}, decoded (nvJPEG), cropped and resized there one "
                f"batch ahead on a side stream into {image_dtype} images; other files made on the CPU")
    kb = {name: bytes_per_image(input_size, dt) / 1e3 for name, dt in IMAGE_DTYPES.items()}
    return (f"batches: {image_dtype} images, {kb[image_dtype]:.1f} KB each to the {device_type}"
            + (f" (float32: {kb['float32']:.1f} KB)" if image_dtype != "float32" else "")
            + ("; pinned, copied one batch ahead on a side stream" if device_type == "cuda" else ""))


def stop_workers(loader) -> None:
    """Shuts a DataLoader's persistent workers down now: after an error, the exception's traceback keeps
    the training loop's frame (and its loader) alive as long as the caller holds it (a notebook does),
    and with it the worker processes and their prefetched batches."""
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
        loader._iterator = None


class DeviceFeed:
    """Iterates ``loader``'s batches (``data.collate`` dicts) with their tensors on ``device``.

    On CUDA, the copy of the next batch is issued on a side stream before the current batch is
    handed out. Stream rules that keep this correct: the consumer's stream waits for the side stream
    before it gets a batch (``wait_stream``: the copy is complete when the step reads it), and each
    copied tensor is recorded as used by the consumer's stream (``record_stream``: the caching
    allocator does not give its memory to a later copy on the side stream until the step that read it
    is done). The host side needs no care: a non-blocking copy from pinned memory records its own
    event, so the pinned block is not reused before the copy completes. Anywhere else (the CPU) the
    tensors are moved with ``.to(device)`` and no stream is involved. A batch without images (every
    file unreadable) passes with None.

    Args:
        loader: yields `maefast.train.data.collate` batches.
        device: where the batches go.
        decode: the dataset's ``device_decode`` (``decode="gpu"``): makes the images of batches that
            carry a ``deferred`` part; its unreadable files join the batch's ``bad`` list.
    """

    def __init__(self, loader: Iterable[dict], device: torch.device,
                 decode: Callable[[dict, torch.device], tuple] | None = None):
        self.loader, self.device, self.decode = loader, torch.device(device), decode
        self.cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(device=self.device) if self.cuda else None

    def _decode(self, batch: dict) -> dict:
        """A batch with a ``deferred`` part -> its images made on the device, the noise of the samples
        that made it (a file that fails here is dropped and listed in ``bad``)."""
        if self.decode is None:
            raise RuntimeError("DeviceFeed: a batch to decode on the device (decode='gpu') but no decode= given")
        images, keep, bad = self.decode(batch["deferred"], self.device)
        noise = batch["noise"] if bool(keep.all()) else batch["noise"][keep]
        out = {k: v for k, v in batch.items() if k != "deferred"}
        out.update(images=images, noise=noise if images is not None else None, bad=list(batch["bad"]) + bad)
        return out

    def _issue(self, batch: dict | None) -> dict | None:
        if batch is None:
            return None
        if not self.cuda:
            if batch.get("deferred") is not None:
                batch = self._decode(batch)
            return {k: (v.to(self.device) if k in BATCH_TENSORS and v is not None else v) for k, v in batch.items()}
        # no wait on the consumer: the pinned source was filled by the host, and the memory of earlier
        # batches is protected by record_stream
        with torch.cuda.stream(self._stream):
            if batch.get("deferred") is not None:
                # nvJPEG's hardware decoder writes its outputs without waiting for the work queued on its
                # stream (pytorch/vision#9606, meta-pytorch/torchcodec#1634): the output blocks the caching
                # allocator hands it may be ones this stream's kernels still read (the last batch's crops).
                # Draining this side stream first costs no step time: the training stream goes on
                self._stream.synchronize()
                batch = self._decode(batch)
            out = dict(batch)
            for k in BATCH_TENSORS:
                if batch.get(k) is not None:
                    out[k] = batch[k].to(self.device, non_blocking=True)
        return out

    def _hand_out(self, batch: dict) -> dict:
        if self.cuda:
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_stream(self._stream)
            for k in BATCH_TENSORS:
                if batch.get(k) is not None:
                    batch[k].record_stream(consumer)
        return batch

    def __iter__(self) -> Iterator[dict]:
        it = iter(self.loader)
        ahead = self._issue(next(it, None))
        while ahead is not None:
            batch = self._hand_out(ahead)
            ahead = self._issue(next(it, None))  # in flight while the caller steps on `batch`
            yield batch

    def __len__(self) -> int:
        return len(self.loader)
