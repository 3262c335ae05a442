"""Per-file functions for the ingest's worker processes in tests (importable by forkserver / spawn workers)."""

import os

from cutremain_monai.io.ingest import _examine


def crash_on_notes(task):
    """Kill the worker process on the first text note, as a segfaulting decoder would."""
    if task[0].endswith("_notes0.txt"):
        os._exit(3)
    return _examine(task)
