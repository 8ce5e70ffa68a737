"""The errors llava-batch reports to users, and the exit code the CLI gives each.

pipeline.cli catches LlavaBatchError alone and exits with its exit_code, so a subclass defined beside
what raises it (quant.QuantError, pipeline.eval.ScoreError) needs no entry there. Anything else that
escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class LlavaBatchError(Exception):
    """A problem the user can fix; the message is one line for stderr."""

    exit_code = 1


class ConfigError(LlavaBatchError, ValueError):
    """Bad arguments, configuration, model dir or input, found before any work: exit code 2."""

    exit_code = 2
