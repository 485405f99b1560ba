"""The stripe baton (zebra_run.Baton): one stripe computes at a time, turns go round-robin, finished stripes are
skipped, and a failure wakes every waiter. Threads only, no processes."""

import threading

import pytest

from hf_hetermoe.zebra_run import Baton, _Aborted

JOIN_S = 10.0  # a deadlock fails the test instead of hanging it


def _run_stripes(rounds: list[int]) -> list[tuple[int, int]]:
    """Each stripe j computes `rounds[j]` times, passing the baton on between them (as at each exchange), then
    finishes; returns the (stripe, round) order in which they computed."""
    baton, log, errors = Baton(len(rounds)), [], []
    active = []

    def stripe(j: int) -> None:
        try:
            baton.acquire(j)
            for k in range(rounds[j]):
                active.append(j)
                assert len(active) == 1, f"stripes {active} compute at once"
                log.append((j, k))
                active.remove(j)
                if k < rounds[j] - 1:
                    baton.pass_on(j)
                    baton.acquire(j)
            baton.finish(j)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)
            baton.fail()

    # Started last stripe first: the order comes from the baton, not from when the threads start.
    threads = [threading.Thread(target=stripe, args=(j,)) for j in reversed(range(len(rounds)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
    assert not any(t.is_alive() for t in threads), "stripes deadlocked"
    assert not errors, errors
    return log


def test_turns_go_round_robin_in_stripe_order():
    assert _run_stripes([3, 3, 3]) == [(j, k) for k in range(3) for j in range(3)]


def test_a_finished_stripe_is_skipped():
    assert _run_stripes([3, 1, 2]) == [(0, 0), (1, 0), (2, 0), (0, 1), (2, 1), (0, 2)]


def test_one_stripe_keeps_the_baton():
    assert _run_stripes([4]) == [(0, k) for k in range(4)]


def test_finish_hands_the_turn_to_the_next_unfinished_stripe():
    baton = Baton(3)
    baton.finish(0)
    baton.acquire(1)  # returns at once: stripe 1's turn
    baton.finish(1)
    baton.acquire(2)
    baton.finish(2)  # nobody left: the turn goes to no stripe
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (_swallow(baton.acquire, 0), done.set()))
    waiter.start()
    assert not done.wait(0.2), "a finished stripe got the turn back"
    baton.fail()
    waiter.join(JOIN_S)
    assert done.is_set()


def _swallow(fn, *args):
    try:
        fn(*args)
    except _Aborted:
        pass


def test_fail_wakes_every_waiter_with_aborted():
    baton = Baton(3)  # stripe 0 holds the turn; 1 and 2 wait
    outcomes = {}

    def wait(j: int) -> None:
        try:
            baton.acquire(j)
            outcomes[j] = "acquired"
        except _Aborted:
            outcomes[j] = "aborted"

    waiters = [threading.Thread(target=wait, args=(j,)) for j in (1, 2)]
    for t in waiters:
        t.start()
    baton.fail()
    for t in waiters:
        t.join(JOIN_S)
    assert outcomes == {1: "aborted", 2: "aborted"}
    with pytest.raises(_Aborted):  # and every later acquire, including the holder's
        baton.acquire(0)
