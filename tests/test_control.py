"""The command channel (leader -> expert servers): what the leader keeps while commands are in flight."""

import torch

from hf_hetermoe import protocol
from hf_hetermoe.control import CommandChannel


class _SendWork:
    """Like a gloo send's Work: reports completion only once waited on."""

    def __init__(self):
        self.waited = False

    def is_completed(self):
        return self.waited

    def wait(self, *args):
        self.waited = True
        return True


class _Group:
    def __init__(self):
        self.works = []

    def send(self, tensors, dst, tag):
        self.works.append(_SendWork())
        return self.works[-1]


def test_commands_in_flight_stay_bounded_over_a_long_run():
    group = _Group()
    channel = CommandChannel(group, rank=0, leader=0, servers=(1, 2))
    for step in range(2000):
        channel.broadcast(protocol.Forward(layer=0, stripe=0, session=step, keep=True, autocast=None,
                                           row_dtype=torch.float32, seq_len=16))
        assert len(channel._in_flight) <= 64
    assert sum(w.waited for w in group.works) >= len(group.works) - 64  # the older ones were waited on
    channel.flush()
    assert channel._in_flight == [] and all(w.waited for w in group.works)
