"""The stop request itself: which signals, which exit status, a second signal."""

import os
import signal

import pytest

from eb_jax import preemption


def test_a_signal_asks_the_run_to_stop_and_names_its_exit_status():
    with preemption.handling():
        assert not preemption.stop_at(1) and not preemption.stop_now()
        os.kill(os.getpid(), signal.SIGINT)  # handled: no KeyboardInterrupt
        assert preemption.stop_at(2) and preemption.stop_now()
        assert preemption.signal_number() == signal.SIGINT
    assert not preemption.stop_now()  # outside, nothing asked; the handlers are back
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    stopped = preemption.Preempted(7, signal.SIGTERM)
    assert str(stopped) == "SIGTERM after step 7, checkpointed; the same command resumes"
    assert preemption.exit_code(signal.SIGTERM) == 143
    assert preemption.exit_code(signal.SIGINT) == 130


def test_a_second_signal_ends_the_process_as_the_default_action_would(monkeypatch):
    sent = []
    monkeypatch.setattr(os, "kill", lambda pid, signum: sent.append(signum))
    with preemption.handling():
        preemption.request(signal.SIGTERM)
        assert sent == [] and preemption.stop_now()
        preemption.request(signal.SIGTERM)
        assert sent == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # as before the test


@pytest.fixture(autouse=True)
def _default_sigterm():
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, before)
