"""utils.signals: SIGTERM raises Terminated inside sigterm_raises(), once; the previous handler comes back."""

import os
import signal
import threading
import time

import pytest

from detectron_res.utils.signals import (
    Terminated,
    interruption_exit_status,
    interruption_name,
    sigterm_deferred,
    sigterm_raises,
    sigterm_requested,
)


def test_sigterm_raises_terminated_once_then_the_default_action_is_back(monkeypatch):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as error:
        with sigterm_raises():
            assert signal.getsignal(signal.SIGTERM) not in (before, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs at once; the sleep only bounds a failure
            raise AssertionError("SIGTERM did not interrupt the block")
    assert isinstance(error.value, KeyboardInterrupt)  # code that cleans up after Ctrl-C cleans up after SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_second_sigterm_during_the_clean_up_finds_the_default_action():
    seen = []
    with sigterm_raises():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        except Terminated:
            seen.append(signal.getsignal(signal.SIGTERM))
    assert seen == [signal.SIG_DFL]


def test_outside_the_main_thread_the_block_runs_unchanged():
    before = signal.getsignal(signal.SIGTERM)
    inside = []

    def run():
        with sigterm_raises():
            inside.append(signal.getsignal(signal.SIGTERM))
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert inside == [before]


def test_exit_statuses_and_names_are_a_shells():
    assert (interruption_exit_status(Terminated()), interruption_name(Terminated())) == (143, "SIGTERM")
    assert (interruption_exit_status(KeyboardInterrupt()), interruption_name(KeyboardInterrupt())) == (
        130, "Ctrl-C (SIGINT)")


def test_the_previous_handler_comes_back_after_the_block():
    def previous(signum, frame):
        pass

    original = signal.signal(signal.SIGTERM, previous)
    try:
        with sigterm_raises():
            assert signal.getsignal(signal.SIGTERM) is not previous
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, original)


def test_sigterm_deferred_records_a_request_and_a_second_sigterm_finds_the_default_action():
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(Terminated):
            with sigterm_deferred():
                assert not sigterm_requested()
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)  # the handler runs at once; nothing is raised
                assert sigterm_requested()
                assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
                raise Terminated("SIGTERM")  # what the training loop does once every rank agreed to stop
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and not sigterm_requested()
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_request_not_acted_on_raises_when_the_block_ends_and_none_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(Terminated):
            with sigterm_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)
        with sigterm_raises():
            raising = signal.getsignal(signal.SIGTERM)
            with sigterm_deferred():
                pass
            assert signal.getsignal(signal.SIGTERM) is raising
    finally:
        signal.signal(signal.SIGTERM, before)
