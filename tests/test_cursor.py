"""The per-subscription cursor and the resync decision, as pure synchronous code (no loop, no backend).

A :class:`~rtbroadcast.cursor.Cursor` delivers into its connection's outbound queue; these tests read that
queue with ``get_nowait()``, which needs no event loop.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rtbroadcast import CloseCode, Connection, ConnectionLimitReached, Envelope, QueueLimits, ResumePoint
from rtbroadcast.cursor import Cursor
from rtbroadcast.protocol import ResyncReason, resync_reason, with_seq
from rtbroadcast.registry import ConnectionRegistry

EPOCH = "e1"


def envelope(seq: int, epoch: str = EPOCH, channel: str = "c") -> Envelope:
    return Envelope(channel, seq, epoch, with_seq('{"type":"t"}', seq))


def delivered(connection: Connection) -> list[int]:
    """Drain the connection's queue; return the seqs of the envelopes in it, in order."""
    seqs = []
    while (item := connection.get_nowait()) is not None:
        assert not isinstance(item, str), item
        seqs.append(item.seq)
    return seqs


def live_cursor(position: int = 0, *, limits: QueueLimits | None = None) -> tuple[Connection, list[Envelope]]:
    """A connection whose cursor stands at ``EPOCH/position``, delivering live; returns it and its gaps."""
    connection = Connection("c") if limits is None else Connection("c", limits=limits)
    gaps: list[Envelope] = []
    connection.cursor.set_gap_handler(lambda _cursor, env: gaps.append(env))
    connection.cursor.set_position(EPOCH, position)
    connection.cursor.end_buffering()
    return connection, gaps


def test_a_connection_has_one_cursor_and_its_shorthands_read_it() -> None:
    connection = Connection("room:1")
    cursor = connection.cursor
    assert isinstance(cursor, Cursor)
    assert cursor.connection is connection
    assert connection.cursors == (cursor,)
    assert connection.cursor_for("room:1") is cursor
    assert connection.cursor_for("room:2") is None
    assert connection.buffering and cursor.buffering  # a new cursor holds live envelopes back
    cursor.set_position(EPOCH, 7)
    assert (connection.channel, connection.epoch, connection.last_seq) == ("room:1", EPOCH, 7)


def test_a_new_cursor_holds_live_envelopes_back_then_releases_them_in_order_once() -> None:
    connection = Connection("c")
    cursor = connection.cursor
    for seq in (5, 3, 4, 3, 2):
        cursor.push(envelope(seq))
    assert delivered(connection) == []
    cursor.set_position(EPOCH, 1)
    cursor.deliver_history(envelope(2))  # read from history while live ones wait
    cursor.end_buffering()
    assert delivered(connection) == [2, 3, 4, 5]
    assert not cursor.buffering and cursor.last_seq == 5


def test_a_gap_holds_back_and_calls_the_handler_once_and_a_repair_fills_it() -> None:
    connection, gaps = live_cursor()
    cursor = connection.cursor
    cursor.push(envelope(1))
    cursor.push(envelope(3))  # 2 is missing
    cursor.push(envelope(4))
    assert gaps == [envelope(3)]
    assert cursor.buffering
    assert delivered(connection) == [1]
    for seq in (2, 3):  # the repair reads history after last_seq
        cursor.deliver_history(envelope(seq))
    cursor.end_buffering()
    assert delivered(connection) == [2, 3, 4]


def test_another_epoch_is_a_gap_even_at_the_next_seq() -> None:
    connection, gaps = live_cursor(3)
    connection.cursor.push(envelope(4, epoch="e2"))
    assert gaps == [envelope(4, epoch="e2")]
    assert delivered(connection) == []


def test_a_closed_connection_stops_its_cursor() -> None:
    connection, gaps = live_cursor(limits=QueueLimits(max_messages=2))
    cursor = connection.cursor
    for seq in (1, 2, 3):
        cursor.push(envelope(seq))
    assert connection.closed and connection.close_code == CloseCode.SLOW_CONSUMER
    cursor.push(envelope(9))  # a gap on a closed connection: not reported, nothing held
    assert gaps == [] and not cursor.buffering
    assert delivered(connection) == []


# A live arrival is either a seq of the current stream or one of another epoch (after history was lost).
arrivals = st.lists(
    st.one_of(st.integers(1, 12).map(lambda s: (EPOCH, s)), st.integers(1, 3).map(lambda s: ("e2", s))),
    max_size=40,
)


@given(start=st.integers(0, 4), arrivals=arrivals)
def test_live_envelopes_are_delivered_once_in_order_or_a_gap_is_signalled(
    start: int, arrivals: list[tuple[str, int]]
) -> None:
    connection, gaps = live_cursor(start)
    position, gap_at = start, None
    for epoch, seq in arrivals:
        connection.cursor.push(envelope(seq, epoch))
        if gap_at is None:
            if epoch == EPOCH and seq == position + 1:
                position = seq
            elif epoch != EPOCH or seq > position + 1:
                gap_at = (epoch, seq)
    seqs = delivered(connection)
    assert seqs == list(range(start + 1, position + 1))  # consecutive, each once, nothing after a gap
    assert [(g.epoch, g.seq) for g in gaps] == ([gap_at] if gap_at else [])
    assert connection.cursor.buffering == (gap_at is not None)


@given(
    top=st.integers(0, 25),
    arrivals=st.lists(st.integers(1, 25), max_size=60),
    start=st.integers(0, 3),
)
def test_with_repairs_from_history_every_seq_is_delivered_exactly_once_in_order(
    top: int, arrivals: list[int], start: int
) -> None:
    """Live envelopes arrive late, twice, out of order or never; repairs read history; nothing is lost."""
    start = min(start, top)
    history = {seq: envelope(seq) for seq in range(1, top + 1)}
    connection, gaps = live_cursor(start)
    cursor = connection.cursor
    published = start

    def repair() -> None:
        # What the broadcaster does for a gap: read history after last_seq, then release what waited.
        assert resync_reason(ResumePoint(EPOCH, cursor.last_seq), EPOCH, published, complete=True) is None
        for seq in range(cursor.last_seq + 1, published + 1):
            cursor.deliver_history(history[seq])
        cursor.end_buffering()

    for seq in (s for s in arrivals if s <= top):
        published = max(published, seq)  # an envelope arrives only once it is published
        cursor.push(history[seq])
        while gaps:
            gaps.pop()
            repair()
    published = top  # the position check finds the stream's top, beyond what arrived live
    if cursor.last_seq < top:
        cursor.begin_buffering()
        repair()
    assert delivered(connection) == list(range(start + 1, top + 1))
    assert not cursor.buffering


@given(
    resume=st.integers(0, 5),
    top=st.integers(5, 15),
    live=st.lists(st.integers(1, 25), max_size=40),
)
def test_an_attach_merges_history_and_live_envelopes_that_arrived_meanwhile_in_any_order(
    resume: int, top: int, live: list[int]
) -> None:
    """Live envelopes arrive (late, twice, in any order) while history is read: the merge is exact."""
    connection = Connection("c")
    cursor = connection.cursor
    gaps: list[Envelope] = []
    cursor.set_gap_handler(lambda _cursor, env: gaps.append(env))
    for seq in live:
        cursor.push(envelope(seq))
    cursor.set_position(EPOCH, resume)
    for seq in range(resume + 1, top + 1):
        cursor.deliver_history(envelope(seq))
    cursor.end_buffering()
    # Past the history read's top, live envelopes follow on as long as they are contiguous.
    end = top
    while end + 1 in live:
        end += 1
    assert delivered(connection) == list(range(resume + 1, end + 1))
    beyond = [seq for seq in live if seq > end]
    assert [g.seq for g in gaps] == ([min(beyond)] if beyond else [])  # then a gap, for a repair
    assert cursor.buffering == bool(beyond)


def test_history_with_a_hole_is_not_skipped_over() -> None:
    connection, _ = live_cursor(1)
    cursor = connection.cursor
    cursor.begin_buffering()
    for seq in (2, 4, 5):  # 3 missing
        cursor.deliver_history(envelope(seq))
    assert delivered(connection) == [2]
    assert cursor.last_seq == 2


# -- the resync decision ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resume", "epoch", "seq", "complete", "reason"),
    [
        (ResumePoint(EPOCH, 3), EPOCH, 5, True, None),
        (ResumePoint(EPOCH, 5), EPOCH, 5, True, None),
        (ResumePoint(EPOCH, 0), EPOCH, 0, True, None),
        (ResumePoint("old", 3), EPOCH, 5, True, ResyncReason.EPOCH_CHANGED),
        (ResumePoint(EPOCH, 6), EPOCH, 5, True, ResyncReason.SEQ_AHEAD),
        (ResumePoint(EPOCH, 3), EPOCH, 5, False, ResyncReason.HISTORY_TRIMMED),
        (ResumePoint("old", 9), EPOCH, 5, False, ResyncReason.EPOCH_CHANGED),  # epoch first
        (ResumePoint(EPOCH, 9), EPOCH, 5, False, ResyncReason.SEQ_AHEAD),  # then seq ahead
    ],
)
def test_resync_reason(resume: ResumePoint, epoch: str, seq: int, complete: bool, reason: str | None) -> None:
    assert resync_reason(resume, epoch, seq, complete=complete) == reason


@given(
    resume_epoch=st.sampled_from(["a", "b"]),
    resume_seq=st.integers(0, 10),
    epoch=st.sampled_from(["a", "b"]),
    seq=st.integers(0, 10),
    complete=st.booleans(),
)
def test_a_client_resumes_exactly_when_history_covers_it(
    resume_epoch: str, resume_seq: int, epoch: str, seq: int, complete: bool
) -> None:
    reason = resync_reason(ResumePoint(resume_epoch, resume_seq), epoch, seq, complete=complete)
    coverable = resume_epoch == epoch and resume_seq <= seq and complete
    assert (reason is None) == coverable
    assert reason in (None, ResyncReason.EPOCH_CHANGED, ResyncReason.SEQ_AHEAD, ResyncReason.HISTORY_TRIMMED)


# -- the registry: channel -> cursors --------------------------------------------------------------


def test_the_registry_fans_out_to_cursors_and_counts_connections() -> None:
    registry = ConnectionRegistry(max_connections_per_channel=2)
    one, two, other = Connection("a"), Connection("a"), Connection("b")
    for connection in (one, two, other):
        registry.add(connection)
    registry.add(one)  # twice: no effect
    assert set(registry.cursors("a")) == {one.cursor, two.cursor}
    assert set(registry.fanout("a")) == {one, two}
    assert registry.cursors("nobody") == () and registry.fanout("nobody") == ()
    assert (len(registry), registry.count(), registry.count("a")) == (3, 3, 2)
    assert list(registry) == [one, two, other]
    with pytest.raises(ConnectionLimitReached):
        registry.add(Connection("a"))
    assert registry.count() == 3
    assert registry.remove(one) == []
    assert registry.remove(one) == []
    assert registry.remove(two) == ["a"]
    assert registry.channels() == ["b"]
    assert registry.stats().channels == {"b": 1}
