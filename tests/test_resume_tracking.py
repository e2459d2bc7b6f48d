"""What a client does with an incoming event (``protocol.judge_event``), and that the server agrees.

The client's rule and the server cursor's inline rule are the same rule stated twice (the server keeps
its copy inline on the fan-out hot path): a property test drives both with the same seqs.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from rtbroadcast import Connection, Envelope, ResumePoint
from rtbroadcast.protocol import judge_event, with_seq


def test_the_next_seq_is_applied_older_ones_dropped_and_a_skip_is_a_gap() -> None:
    at = ResumePoint("e1", 4)
    assert [judge_event(at, seq) for seq in (0, 3, 4, 5, 6, 100)] == [
        "duplicate", "duplicate", "duplicate", "apply", "gap", "gap",
    ]  # fmt: skip
    assert judge_event(at, 5, epoch="e1") == "apply"


def test_without_a_position_or_in_another_stream_an_event_is_ignored() -> None:
    assert judge_event(None, 1) == "ignore"
    assert judge_event(None, 1, epoch="e1") == "ignore"
    # The connection delivers another stream than the position's: a resync_required is due first.
    assert judge_event(ResumePoint("e1", 4), 5, epoch="e2") == "ignore"


@given(start=st.integers(0, 20), seqs=st.lists(st.integers(0, 30), max_size=40))
def test_the_server_cursor_delivers_exactly_what_a_client_applies(start: int, seqs: list[int]) -> None:
    connection = Connection("c")
    cursor = connection.cursor
    gaps: list[int] = []
    cursor.set_gap_handler(lambda _cursor, envelope: gaps.append(envelope.seq))
    cursor.set_position("e1", start)
    cursor.end_buffering()
    position = ResumePoint("e1", start)
    for seq in seqs:
        verdict = judge_event(position, seq)
        cursor.push(Envelope("c", seq, "e1", with_seq('{"type":"t"}', seq)))
        if cursor.buffering:  # the server repairs a gap from history; a client reconnects
            assert verdict == "gap" and gaps == [seq]
            return
        item = connection.get_nowait()
        if verdict == "apply":
            assert item is not None and not isinstance(item, str) and item.seq == seq
            position = ResumePoint("e1", seq)
        else:
            assert verdict == "duplicate" and item is None
