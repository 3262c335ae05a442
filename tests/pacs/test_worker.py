"""The scoring process beside the node: an error's text never leaves it, and a child that died while idle is
joined and its pipe closed (no zombie, no open descriptor)."""

import os
import signal
import time

import pytest

from cutremain_monai.pacs.worker import ScoringError, ScoringWorker


def _raise_with_a_name():
    raise ValueError("cannot decode element (0010,0010) PatientName 'DOE^JANE'")


def test_an_error_is_named_by_its_type_only():
    worker = ScoringWorker(timeout=60)
    try:
        with pytest.raises(ScoringError) as err:
            worker.run(_raise_with_a_name)
        assert str(err.value) == "ValueError"
        assert worker.run(os.getpid) != os.getpid()  # the same child goes on
        assert worker.started == 1
    finally:
        worker.close()
    assert worker._conn is None and worker._proc is None


def test_a_child_that_died_idle_is_reaped_and_replaced():
    worker = ScoringWorker(timeout=60)
    try:
        pid = worker.run(os.getpid)
        proc, conn = worker._proc, worker._conn
        os.kill(pid, signal.SIGKILL)  # the out-of-memory killer, between two jobs
        t = time.time()
        while proc.is_alive() and time.time() - t < 30:
            time.sleep(0.05)
        assert worker.run(os.getpid) not in (pid, os.getpid())
        assert worker.started == 2
        assert conn.closed  # the dead child's pipe closed
        with pytest.raises(ValueError):  # and the process object released (joined first: no zombie)
            proc.is_alive()
    finally:
        worker.close()
    assert worker._conn is None
