"""Optimizer state kept in host memory, in pages that visit the device one at a time.

A page is one flat byte buffer in host memory (pinned when CUDA is available) holding the state
tensors of several parameter segments. A segment is a contiguous run of a flattened parameter, so
a parameter larger than a page is split across pages and device memory stays O(page) whatever the
model. On a CUDA step the pager copies page i+1 in on a side stream while page i is updated, and
copies each page back once its update is done; two device buffers of one page each are all the
device memory the states ever take. On CPU the update works on the host pages directly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

# Offsets inside a page are multiples of this, so any dtype view of the bytes is aligned (16 B also
# keeps vectorised loads in the update kernels aligned).
ALIGN = 16


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: a DTensor's local shard (FSDP2 shards parameters and their
    gradients along dim 0, and each rank steps its own shard), any other tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


@dataclass(frozen=True)
class StateSpec:
    """One state tensor of a segment: its dtype and element count as a function of the segment length."""
    key: str
    dtype: torch.dtype
    per_block: int = 1  # 1: one element per parameter element; 256: one per block of 256

    def numel(self, length: int) -> int:
        return -(-length // self.per_block)

    def nbytes(self, length: int) -> int:
        return _aligned(self.numel(length) * self.dtype.itemsize)


@dataclass
class Segment:
    param: torch.Tensor
    group: int  # index of the param group
    start: int  # first element of the flattened parameter
    length: int
    specs: tuple[StateSpec, ...]
    offsets: dict[str, int] = field(default_factory=dict)  # byte offset of each state in the page
    page: Optional["Page"] = field(default=None, repr=False)

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """The segment's state tensors as views into a page buffer (host or device)."""
        return {spec.key: buffer[self.offsets[spec.key]:self.offsets[spec.key] + spec.nbytes(self.length)]
                .view(spec.dtype)[:spec.numel(self.length)] for spec in self.specs}

    def param_view(self) -> torch.Tensor:
        return local_tensor(self.param.detach()).view(-1)[self.start:self.start + self.length]

    def grad_view(self) -> torch.Tensor:
        return local_tensor(self.param.grad).reshape(-1)[self.start:self.start + self.length]


@dataclass
class Page:
    segments: list[Segment]
    nbytes: int
    # The bytes: in host memory when paged (pinned with CUDA), on the parameters' device when not.
    storage: Optional[torch.Tensor] = None


class StateLayout:
    """Where every parameter's optimizer state lives: its segments, packed into pages."""

    def __init__(self, page_bytes: int):
        self.page_bytes = page_bytes
        self.pages: list[Page] = []
        self.segments: dict[torch.Tensor, list[Segment]] = {}

    def __contains__(self, param: torch.Tensor) -> bool:
        return param in self.segments

    def add(self, param: torch.Tensor, group: int, specs: tuple[StateSpec, ...], split_multiple: int) -> None:
        """Lay out `param`'s states, filling the last open page first; splits fall on multiples of
        `split_multiple` elements (the quantization block, so that each segment holds whole blocks)."""
        local = local_tensor(param)
        if not local.is_contiguous():
            raise ValueError(f"paged optimizer states need contiguous parameters; got one of shape {tuple(local.shape)} "
                             f"with strides {local.stride()}: make it contiguous before building the optimizer")
        per_element = sum(s.dtype.itemsize / s.per_block for s in specs)
        total, start = local.numel(), 0
        self.segments[param] = []
        while start < total:
            page = self.pages[-1] if self.pages and self.pages[-1].storage is None else None
            used = page.nbytes if page is not None else 0
            fits = int((self.page_bytes - used - ALIGN * len(specs)) // per_element) // split_multiple * split_multiple
            if page is None or fits <= 0:
                page = Page([], 0)
                self.pages.append(page)
                # A page holds at least one block, even when page_bytes is smaller than that.
                fits = max(int((self.page_bytes - ALIGN * len(specs)) // per_element) // split_multiple * split_multiple,
                           split_multiple)
            length = min(fits, total - start)
            segment = Segment(param, group, start, length, specs, page=page)
            for spec in specs:
                segment.offsets[spec.key] = page.nbytes
                page.nbytes += spec.nbytes(length)
            page.segments.append(segment)
            self.segments[param].append(segment)
            start += length

    def seal(self, initial: Callable[[StateSpec], float], device: torch.device, pin: bool) -> None:
        """Allocate the open pages on `device`, each state filled with initial(spec)."""
        for page in self.pages:
            if page.storage is not None:
                continue
            page.storage = torch.zeros(page.nbytes, dtype=torch.uint8, device=device, pin_memory=pin)
            for segment in page.segments:
                views = segment.views(page.storage)
                for spec in segment.specs:
                    if initial(spec):
                        views[spec.key].fill_(initial(spec))

    def state_bytes(self) -> int:
        return sum(page.nbytes for page in self.pages)

    def max_page_bytes(self) -> int:
        return max((page.nbytes for page in self.pages), default=0)


class DevicePager:
    """Double-buffered host <-> device copies of pages around an update, on a side stream."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffers: list[torch.Tensor] = []
        self.copy_stream = torch.cuda.Stream(device)

    def _buffer(self, index: int, nbytes: int) -> torch.Tensor:
        while len(self.buffers) < 2:
            self.buffers.append(torch.empty(0, dtype=torch.uint8, device=self.device))
        if self.buffers[index].numel() < nbytes:
            # Only when pages were added: let queued copies finish reading the old buffer before
            # the allocator may hand its memory out again.
            self.copy_stream.synchronize()
            self.buffers[index] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return self.buffers[index][:nbytes]

    def run(self, pages: list[Page], update: Callable[[Page, torch.Tensor], None]) -> None:
        compute = torch.cuda.current_stream(self.device)
        # The side stream must not read the host pages before earlier work that wrote them, nor
        # the grads' producers: it starts after everything queued so far on the compute stream.
        self.copy_stream.wait_stream(compute)

        def fetch(i: int):
            # Buffer i % 2 was last used by page i - 2, whose copy back is queued earlier on this
            # same stream, so the copy in cannot overwrite it too soon.
            buffer = self._buffer(i % 2, pages[i].nbytes)
            with torch.cuda.stream(self.copy_stream):
                buffer.copy_(pages[i].storage, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self.copy_stream)
            return buffer, ready

        upcoming = fetch(0) if pages else None
        for i, page in enumerate(pages):
            buffer, ready = upcoming
            if i + 1 < len(pages):
                upcoming = fetch(i + 1)  # overlaps the update of page i
            compute.wait_event(ready)
            update(page, buffer)
            done = torch.cuda.Event()
            done.record(compute)
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(done)
                page.storage.copy_(buffer, non_blocking=True)

    def synchronize(self) -> None:
        """Wait until every copy back to the host has landed (before the CPU reads the pages)."""
        self.copy_stream.synchronize()

