"""The command channel (leader -> expert servers): what the leader keeps while commands are in flight."""

from hf_hetermoe.control import CommandChannel, Op


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
        channel.broadcast(Op.FORWARD, ints=(0, 0, step, 1, 0, 1, 16))
        assert len(channel._in_flight) <= 64
    assert sum(w.waited for w in group.works) >= len(group.works) - 64  # the older ones were waited on
    channel.flush()
    assert channel._in_flight == [] and all(w.waited for w in group.works)
