"""multifd/errors.py: which error is reported when several happen, and how errors render.

Pure tests of the policy: first_error over single errors and (nested) groups, the ordering
stamps (stamp, inherit_stamp, stamped_call), caused_by_shutdown, collapse_group, and the
"channel, stage: message" line every MultifdError renders as.
"""

from __future__ import annotations

import pytest
import trio

from multifd import errors as E
from multifd.errors import Stage


def a_cancelled() -> trio.Cancelled:
    """A real trio.Cancelled, as a cancelled checkpoint raises it."""
    async def catch() -> trio.Cancelled:
        with trio.CancelScope() as scope:
            scope.cancel()
            try:
                await trio.lowlevel.checkpoint()
            except trio.Cancelled as exc:
                return exc
        raise AssertionError("the checkpoint was not cancelled")
    return trio.run(catch)


def group(*excs: BaseException) -> BaseExceptionGroup:
    return BaseExceptionGroup("test", list(excs))


# --- first_error


def test_a_single_error_is_its_own_report():
    err = E.PeerTimeout("peer silent for 1s")
    assert E.first_error(err) is err
    foreign = ValueError("x")
    assert E.first_error(foreign) is foreign


def test_the_peers_reason_beats_an_older_peer_closed():
    closed = E.PeerClosed("connection lost")  # stamped first
    reason = E.PeerError("sender failed: disk full")
    assert E.stamp(closed) < E.stamp(reason)
    assert E.first_error(group(closed, reason)) is reason
    assert E.first_error(group(reason, closed)) is reason


def test_the_peers_reason_does_not_beat_an_older_error_of_our_own():
    ours = E.ChecksumMismatch("packet 3: checksum")
    reason = E.PeerError("sender failed: cancelled")
    closed = E.PeerClosed("connection lost")
    assert E.first_error(group(reason, closed, ours)) is ours


def test_an_injected_fault_older_than_a_cancellation_wins():
    fault = E.InjectedFault("connection reset by an injected fault")
    cancelled = a_cancelled()
    assert E.first_error(group(cancelled, fault)) is fault


def test_nested_groups_are_searched_depth_first():
    first = E.RemoteProtocolError("bad packet")
    later = E.PeerClosed("connection lost")
    nested = group(a_cancelled(), group(a_cancelled(), group(later, first)))
    assert E.first_error(nested) is first
    assert list(E.leaves(nested))[2:] == [later, first]


def test_a_group_of_only_cancellations_reports_a_cancellation():
    one, two = a_cancelled(), a_cancelled()
    report = E.first_error(group(one, group(two)))
    assert isinstance(report, trio.Cancelled)
    assert report in (one, two)


def test_a_foreign_error_is_reported_when_none_is_ours():
    foreign = ValueError("boom")
    assert E.first_error(group(a_cancelled(), foreign, a_cancelled())) is foreign


def test_our_error_beats_a_foreign_one_that_came_first():
    foreign = RuntimeError("boom")
    E.stamp(foreign)
    ours = E.PeerTimeout("peer silent")
    assert E.first_error(group(foreign, ours)) is ours


def test_the_earliest_of_our_errors_wins_whatever_the_order_in_the_group():
    early = E.PeerTimeout("peer silent for 1s")
    late = E.RemoteProtocolError("bad packet")
    assert E.first_error(group(late, early)) is early
    assert E.first_error(group(early, late)) is early


def test_an_explicit_stamp_orders_errors_not_their_creation():
    cause = TimeoutError("timed out")
    E.stamp(cause)  # it happened in a worker thread, before trio got round to it
    created_first = E.RemoteProtocolError("bad packet")
    created_later = E.PeerTimeout("peer silent")  # the translation of `cause`
    E.inherit_stamp(created_later, cause)
    assert E.first_error(group(created_first, created_later)) is created_later


# --- stamps


def test_stamp_is_taken_once():
    exc = OSError("x")
    first = E.stamp(exc)
    E.now()
    assert E.stamp(exc) == first
    assert E.now() > first


def test_inherit_stamp_takes_the_earlier_of_the_two():
    cause = ConnectionResetError("reset")
    cause_at = E.stamp(cause)
    err = E.PeerClosed("connection lost")  # stamped after the cause
    E.inherit_stamp(err, cause)
    assert E.stamp(err) == cause_at

    earlier = E.PeerTimeout("silent")
    late_cause = OSError("later")
    E.stamp(late_cause)
    earlier_at = E.stamp(earlier)
    E.inherit_stamp(earlier, late_cause)
    assert E.stamp(earlier) == earlier_at


def test_stamped_call_returns_the_result_and_stamps_what_leaves_it():
    assert E.stamped_call(lambda a, b: a + b, 2, 3) == 5

    def fail():
        raise OSError("from the thread")

    before = E.now()
    with pytest.raises(OSError) as caught:
        E.stamped_call(fail)
    after = E.now()
    # stamped as it left the call: a first look now would stamp it after `after`
    assert before < E.stamp(caught.value) < after


def test_stamped_call_keeps_an_existing_stamp():
    err = E.RemoteProtocolError("bad")
    at = E.stamp(err)
    E.now()

    def fail():
        raise err

    with pytest.raises(E.RemoteProtocolError):
        E.stamped_call(fail)
    assert E.stamp(err) == at


# --- caused_by_shutdown


def test_an_error_after_the_shutdown_is_its_doing():
    shutdown_at = E.now()
    for exc in (E.ChecksumMismatch("bad"), E.InjectedFault("reset"), OSError("bad fd"),
                ConnectionResetError("reset")):
        assert E.caused_by_shutdown(exc, shutdown_at), exc


def test_a_connection_that_ended_before_the_shutdown_is_its_doing_too():
    reset = ConnectionResetError("reset")
    E.stamp(reset)
    closed = E.PeerClosed("connection closed by the peer")
    shutdown_at = E.now()
    assert E.caused_by_shutdown(reset, shutdown_at)
    assert E.caused_by_shutdown(closed, shutdown_at)


def test_our_own_failure_before_the_shutdown_is_not():
    fault = E.InjectedFault("connection reset by an injected fault")
    mismatch = E.ChecksumMismatch("packet 0: checksum")
    timeout = E.PeerTimeout("peer silent")
    foreign = ValueError("a bug")
    E.stamp(foreign)
    shutdown_at = E.now()
    for exc in (fault, mismatch, timeout, foreign):
        assert not E.caused_by_shutdown(exc, shutdown_at), exc


def test_an_unstamped_error_is_stamped_at_the_look_so_after_the_shutdown():
    exc = OSError("never stamped")
    shutdown_at = E.now()
    assert E.caused_by_shutdown(exc, shutdown_at)


# --- collapse_group


def test_collapse_group_reraises_the_one_error():
    early = E.PeerTimeout("silent")
    late = E.PeerClosed("gone")
    with pytest.raises(E.PeerTimeout) as caught:
        with E.collapse_group():
            raise ExceptionGroup("nursery", [late, early])
    assert caught.value is early


def test_collapse_group_passes_single_errors_and_success_through():
    err = ValueError("single")
    with pytest.raises(ValueError) as caught:
        with E.collapse_group():
            raise err
    assert caught.value is err
    with E.collapse_group() as ctx:
        pass
    assert isinstance(ctx, E.collapse_group)


# --- rendering


def test_error_lines_name_channel_and_stage():
    err = E.MultifdError("bad magic 0x0 (expected 0x4d464431)", channel="data channel 3",
                         stage=Stage.HELLO)
    assert str(err) == "data channel 3, hello: bad magic 0x0 (expected 0x4d464431)"
    assert err.where() == "data channel 3, hello"


@pytest.mark.parametrize("stage, word", [
    (Stage.CONNECT, "connect"), (Stage.TLS, "tls"), (Stage.HELLO, "hello"),
    (Stage.SETUP, "setup"), (Stage.DATA, "data"), (Stage.SYNC, "sync"),
    (Stage.FINISH, "finish"), (Stage.VERIFY, "verify"), (Stage.EXPLAIN, "explain")])
def test_every_stage_renders_as_its_word(stage, word):
    assert str(E.PeerTimeout("x", stage=stage)) == f"{word}: x"
    assert f"{stage}" == word


def test_an_error_without_a_place_is_its_message():
    assert str(E.VerificationError("digest differs")) == "digest differs"
    assert str(E.PeerClosed("gone", channel="control channel")) == "control channel: gone"


def test_exit_codes_and_who_may_explain():
    assert E.UsageError("x").exit_code == 2
    assert E.Terminated("x").exit_code == 143
    assert E.Interrupted("x").exit_code == 130
    assert E.PeerTimeout("x").exit_code == 1
    assert E.PeerClosed("x").peer_may_explain
    assert E.MissingChannels("x").peer_may_explain
    assert not E.PeerTimeout("x").peer_may_explain
    assert not E.InjectedFault("x").peer_may_explain
    assert E.TlsError("x", peer_may_explain=True).peer_may_explain
    assert not E.TlsError("x").peer_may_explain
