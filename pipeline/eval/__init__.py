"""The CLIP-score judge (`llava-batch score`): run outputs in, a report out.

run_output reads and matches the rows, media_reader opens their media the way the job did,
clip_model embeds, clip_score scores (and is the command), report summarises.
"""

from __future__ import annotations

from pipeline.errors import ConfigError


class ScoreError(ConfigError):
    """A bad argument, a missing file or a directory that is not a run output: one line, exit 2."""
