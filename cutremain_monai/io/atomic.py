"""Files written so that a crash never leaves a torn one: the study results a resumed study trusts, the PACS
node's state and its notes on the files it set aside."""

from __future__ import annotations

import json
import os


def write_json_atomic(path: str, value, **dump_kwargs) -> None:
    """``value`` as JSON at ``path`` (``dump_kwargs`` go to :func:`json.dump`): a temporary file, flushed to disk,
    then renamed over it (a crash or a power cut leaves the old file or the new one, never a torn one)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, **dump_kwargs)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
