"""CUDA streams and host-to-device metadata for the stripe threads (all no-ops on CPU).

Zebra runs each stripe in its own host thread. On a GPU each stripe also needs its own CUDA stream: an NCCL
`work.wait()` makes only the *current* stream wait for the collective, so on one shared stream stripe j+1's
attention would queue behind stripe j's wait for its experts, and nothing would overlap. And the current CUDA
device is per host thread: a new thread starts on device 0, so each stripe thread sets it first.

Stream rules followed here (see docs/architecture.md, "GPU streams"):
- a stripe stream first waits for the main stream, which produced the embeddings and masks it reads;
- the main stream waits for every stripe stream before it reads their outputs (the join), and those outputs
  are recorded as used on the main stream, so the caching allocator does not hand their memory to a stripe
  stream's next allocation while the main stream may still read it;
- backward needs nothing here: autograd runs each backward op on its forward op's stream and syncs the
  gradients it returns with the calling thread's current stream.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class StripeStreams:
    """One CUDA stream per stripe of a runner, created once and reused (torch draws them from its pool)."""

    def __init__(self, device: torch.device, num_stripes: int):
        self.device = device
        self.cuda = device.type == "cuda"
        self.streams = [torch.cuda.Stream(device) for _ in range(num_stripes)] if self.cuda else []
        self.main: torch.cuda.Stream | None = None

    def begin(self) -> None:
        """On the forward's own thread, before the stripe threads start: remember its (main) stream."""
        if self.cuda:
            self.main = torch.cuda.current_stream(self.device)

    @contextlib.contextmanager
    def stripe(self, index: int, reads: tuple[torch.Tensor, ...] = ()) -> Iterator[None]:
        """In stripe thread `index`: its device and stream are current; `reads` came from the main stream."""
        if not self.cuda:
            yield
            return
        torch.cuda.set_device(self.device)
        stream = self.streams[index]
        stream.wait_stream(self.main)
        for tensor in reads:
            tensor.record_stream(stream)
        with torch.cuda.stream(stream):
            yield

    def join(self, outputs: list[torch.Tensor]) -> None:
        """On the main thread after the stripe threads ended: the main stream waits for all of them."""
        if not self.cuda:
            return
        for stream in self.streams:
            self.main.wait_stream(stream)
        for tensor in outputs:
            tensor.record_stream(self.main)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Small host metadata (row indices) to `device` without blocking the host: on CUDA the copy goes from pinned
    memory, asynchronously, in stream order; a pageable copy would wait for the stream to drain."""
    if device.type != "cuda" or tensor.device == device:
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
