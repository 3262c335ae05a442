"""A scoring process beside the node (issue 29): the DICOM node survives its own scoring.

A decoder or a model can end the process it runs in (a segmentation fault in a native codec, the kernel's
out-of-memory killer). The node therefore scores in one long-lived child process (``spawn``: no threads of the
node inherited half-way), started on the first study and started again after it dies; the node itself only
receives, files, sends and retries. :meth:`ScoringWorker.run` raises :class:`WorkerCrashed` with the signal or
exit code when the child dies (or runs past ``timeout``) and :class:`ScoringError` with the error when the job
raised; the caller decides (the node retries a study once, then sets it aside with the reason).
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import time

__all__ = ["ScoringWorker", "WorkerCrashed", "ScoringError"]

logger = logging.getLogger(__name__)


class WorkerCrashed(RuntimeError):
    """The scoring process died (a signal, an exit) or ran past its time; it is started again for the next job."""


class ScoringError(RuntimeError):
    """The job raised in the scoring process (which keeps running): the message is the exception's type only (its
    text can quote a DICOM element's value, a patient's name, and goes to logs and reports)."""


def serve(conn) -> None:
    """The child's loop: ``(fn, args, kwargs)`` in, ``("ok", result)`` or ``("error", type name)`` out; ``None``
    ends."""
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        fn, args, kwargs = job
        try:
            conn.send(("ok", fn(*args, **kwargs)))
        except BaseException as e:  # everything the job raises goes back to the node, the loop goes on
            conn.send(("error", type(e).__name__))  # never str(e): pydicom quotes element values


def _death(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class ScoringWorker:
    """One child process that runs picklable top-level functions; ``timeout`` seconds per job (None: no limit)."""

    def __init__(self, timeout: float | None = None):
        self.timeout = timeout
        self._ctx = multiprocessing.get_context("spawn")
        self._proc = None
        self._conn = None
        self.started = 0  # processes started so far (the first, and one after each crash)

    def _reap(self) -> None:
        """Let go of the process and its pipe (a child that died while idle is joined: no zombie, no open fd)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
            if proc.exitcode is not None:
                proc.close()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _ensure(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            return
        self._reap()
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=serve, args=(child,), name="cutremain-scoring", daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent
        self.started += 1

    def _crashed(self, why: str) -> WorkerCrashed:
        proc = self._proc
        if proc is not None:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
            why = why or _death(proc.exitcode)
        self._reap()
        return WorkerCrashed(f"scoring process {why}")

    def run(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` in the child; its result, or :class:`WorkerCrashed` / :class:`ScoringError`."""
        self._ensure()
        try:
            self._conn.send((fn, args, kwargs))
        except (OSError, EOFError):
            raise self._crashed("") from None
        t0 = time.monotonic()
        while True:
            if self._conn.poll(0.2):
                try:
                    status, value = self._conn.recv()
                except (EOFError, OSError):
                    raise self._crashed("") from None
                if status == "error":
                    raise ScoringError(value)
                return value
            if not self._proc.is_alive():
                if self._conn.poll(0):  # (its answer may have arrived as it ended)
                    continue
                raise self._crashed("")
            if self.timeout is not None and time.monotonic() - t0 > self.timeout:
                raise self._crashed(f"ran past {self.timeout:.0f} s and was stopped")

    def close(self) -> None:
        """End the child (asked first, killed after 10 s) and close the pipe."""
        if self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(None)
            except (OSError, ValueError):
                pass
            self._proc.join(10)
        self._reap()
