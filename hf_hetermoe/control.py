"""The control channel: point-to-point messages between the leader (global attention rank 0) and the servers.

The leader is the single source of commands, so every server sees them in one total order. Commands (their
encoding is hf_hetermoe/protocol.py) are sent point-to-point on the control group, which is always gloo on CPU
tensors. Bulk tensors (weights, optimizer state) follow as self-describing tensor dicts: a JSON manifest, then
each tensor's raw bytes (any dtype travels as uint8). See docs/architecture.md.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import torch

from . import health
from .protocol import HEADER_LEN, Command, decode, encode, payload_size

_TAG_COMMAND = 11
_MAX_COMMANDS_IN_FLIGHT = 64
_TAG_BYTES = 12
_TAG_TENSOR = 13


class _Bounded:
    """A Work whose wait() gives up after `timeout_s` (gloo then raises "Timed out waiting")."""

    def __init__(self, work: Any, timeout_s: float):
        self.work, self.timeout = work, datetime.timedelta(seconds=timeout_s)

    def wait(self) -> Any:
        return self.work.wait(self.timeout)


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"hetermoe: unknown dtype {name!r} in a transfer manifest.")
    return dtype


class CommandChannel:
    """Point-to-point messages on the control group between the leader and the expert servers."""

    def __init__(self, group: Any, *, rank: int, leader: int, servers: tuple[int, ...]):
        self.group = group
        self.rank = rank
        self.leader = leader
        self.servers = servers
        # Commands are sent without waiting: a server busy with expert work posts its receive only when it is
        # done, and waiting for that would stall the leader's attention work (the zebra overlap). Each entry keeps
        # a send's buffer alive until gloo reports it complete.
        self._in_flight: list[tuple[Any, torch.Tensor, int]] = []

    # ---- bytes and tensors ----------------------------------------------------------------------------
    # Every wait is named (health.wait), so a failure says which transfer with which rank was cut.
    def _send(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        health.wait(self.group.send([tensor], dst, tag), f"a control-channel transfer to rank {dst}", self.rank)

    def _recv(self, tensor: torch.Tensor, src: int, tag: int) -> None:
        what = (f"the next command from the leader (rank {src})" if tag == _TAG_COMMAND
                else f"a control-channel transfer from rank {src}")
        health.wait(self.group.recv([tensor], src, tag), what, self.rank)

    def send_bytes(self, dst: int, data: bytes) -> None:
        self._send(torch.tensor([len(data)], dtype=torch.int64), dst, _TAG_BYTES)
        if data:
            self._send(torch.frombuffer(bytearray(data), dtype=torch.uint8), dst, _TAG_BYTES)

    def recv_bytes(self, src: int) -> bytes:
        size = torch.zeros(1, dtype=torch.int64)
        self._recv(size, src, _TAG_BYTES)
        if size.item() == 0:
            return b""
        buf = torch.empty(int(size.item()), dtype=torch.uint8)
        self._recv(buf, src, _TAG_BYTES)
        return buf.numpy().tobytes()

    def send_tensor_dict(self, dst: int, tensors: dict[str, torch.Tensor]) -> None:
        """Send named tensors (any dtype, any device) to `dst`; `recv_tensor_dict` on `dst` returns them on CPU."""
        cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        manifest = [[name, list(t.shape), str(t.dtype)] for name, t in cpu.items()]
        self.send_bytes(dst, json.dumps(manifest).encode())
        for t in cpu.values():
            if t.numel():
                self._send(t.reshape(-1).view(torch.uint8), dst, _TAG_TENSOR)

    def recv_tensor_dict(self, src: int) -> dict[str, torch.Tensor]:
        manifest = json.loads(self.recv_bytes(src).decode())
        out = {}
        for name, shape, dtype_name in manifest:
            t = torch.empty(shape, dtype=_dtype_from_name(dtype_name))
            if t.numel():
                buf = torch.empty(t.numel() * t.element_size(), dtype=torch.uint8)
                self._recv(buf, src, _TAG_TENSOR)
                t = buf.view(t.dtype).reshape(shape)
            out[name] = t
        return out

    def _post(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        # A gloo send's Work reports completion only once waited on, so completed sends cannot be recognised by
        # polling; keep the list bounded by waiting on the oldest ones (long delivered: servers take commands in
        # order and run at most a few behind; if one is further behind, waiting is the right back-pressure).
        if len(self._in_flight) >= _MAX_COMMANDS_IN_FLIGHT:
            for work, _, dst_old in self._in_flight[: _MAX_COMMANDS_IN_FLIGHT // 2]:
                health.wait(work, f"the delivery of a command to rank {dst_old}", self.rank)
            del self._in_flight[: _MAX_COMMANDS_IN_FLIGHT // 2]
        try:
            work = self.group.send([tensor], dst, tag)
        except RuntimeError as exc:  # gloo posts a send at once, and refuses it on a connection already closed
            raise RuntimeError(f"hetermoe: rank {self.rank} failed sending a command to rank {dst}: {exc}"
                               f"{health.peer_report()}") from exc
        self._in_flight.append((work, tensor, dst))

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every command sent so far has left (before exiting, or before a blocking transfer).

        `timeout_s` bounds the wait (the control group's own timeout is days): used when aborting, where a dead
        or stuck server must not keep the leader from exiting."""
        while self._in_flight:
            work, _, dst = self._in_flight[0]  # stays listed (its buffer alive) until it completed
            what = f"the delivery of a command to rank {dst}"
            if timeout_s is None:
                health.wait(work, what, self.rank)
            else:  # gloo raises when a bounded wait times out
                health.wait(_Bounded(work, timeout_s), what, self.rank)
            self._in_flight.pop(0)

    # ---- commands -------------------------------------------------------------------------------------
    def broadcast(self, command: Command) -> None:
        """Leader only: send one command to every expert server (in server order)."""
        assert self.rank == self.leader, "only the leader issues commands"
        header, data = encode(command)
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else None
        for server in self.servers:
            self._post(header, server, _TAG_COMMAND)
            if payload is not None:
                self._post(payload, server, _TAG_COMMAND)

    def receive(self) -> Command:
        """Expert server only: wait for the next command from the leader."""
        header = torch.zeros(HEADER_LEN, dtype=torch.int64)
        self._recv(header, self.leader, _TAG_COMMAND)
        size = payload_size(header)
        data = b""
        if size:
            buf = torch.empty(size, dtype=torch.uint8)
            self._recv(buf, self.leader, _TAG_COMMAND)
            data = buf.numpy().tobytes()
        return decode(header, data)
