"""The one logger every module says things through: `from pipeline.logs import log`.

Messages go to stderr as "llava-batch: <message>", whichever process says them (the CLI, a worker
process, a Ray actor): `setup()` is called once by each entry point. A message logged with
`extra=PLAIN` goes out as it is: lines users have always seen without that prefix keep their text.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("llava_batch")
PLAIN = {"plain": True}


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (pytest's capture swaps it between tests)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


class _Prefixed(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if getattr(record, "plain", False) else f"llava-batch: {text}"


def setup(level: int = logging.INFO) -> None:
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(_Prefixed("%(message)s"))
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
