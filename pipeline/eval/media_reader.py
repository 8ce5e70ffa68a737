"""Each row's media, opened exactly as the job did: pipeline.data.sources + pipeline.data.media.

Images are found the way OUT_A's job found them: its path column + media_root, or its bytes column
re-read from the manifest by row_index.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np

from pipeline.errors import ConfigError
from pipeline.eval import ScoreError
from pipeline.eval.run_output import Row, RunOutput


def _decode(fileobj, *, video_frames: int, max_image_pixels: int, kind_hint: str | None):
    # Imported late so that only the judge's media path needs PyAV and friends.
    from pipeline.data.media import decode_media

    return decode_media(fileobj, video_frames=video_frames, max_image_pixels=max_image_pixels,
                        kind_hint=kind_hint)


class MediaReader:
    def __init__(self, run: RunOutput):
        from pipeline.data.sources import MediaSource

        self.input = run.input
        self.source = MediaSource(run.input)
        self.video_frames = int(run.job["config"].get("generation", {}).get("video_frames", 8))
        self.manifest = _bytes_manifest(run) if run.input.bytes_column else None

    def load(self, rows: list[Row]) -> list:
        """Per row: a list of PIL RGB images (1 for an image, T sampled frames for a video), or an
        error string."""
        from PIL import Image

        out = []
        for row, record in zip(rows, self._records(rows), strict=True):
            try:
                with contextlib.closing(self.source.open(record)) as f:
                    media = _decode(f, video_frames=self.video_frames,
                                    max_image_pixels=self.input.max_image_pixels, kind_hint=row.kind)
            except Exception as e:  # noqa: BLE001 - one unreadable row must not stop the judge
                out.append(f"row {row.row_index}: {e}")
                continue
            if media.kind == "video":
                out.append([Image.fromarray(np.asarray(fr)) for fr in media.frames])
            else:
                out.append([media.image])
        return out

    def _records(self, rows: list[Row]) -> list[dict]:
        if self.manifest is None:
            return [{self.input.path_column: r.path} for r in rows]
        wanted = {r.row_index for r in rows}
        found: dict[int, dict] = {}
        # One ranged read per batch of rows instead of one row-group read per row.
        for start, batch in self.manifest.iter_rows(min(wanted), max(wanted) + 1):
            for g in wanted.intersection(range(start, start + batch.num_rows)):
                found[g] = batch.slice(g - start, 1).to_pylist()[0]
        return [found.get(r.row_index, {}) for r in rows]


def _bytes_manifest(run: RunOutput):
    """The job's manifest: bytes are not passed through to the captions, so they are re-read by row index."""
    from pipeline.data.manifest import open_manifest

    try:
        manifest = open_manifest(dataclasses.replace(run.input))
    except ConfigError as e:
        raise ScoreError(f"{run.dir}: cannot re-read the job's manifest for its bytes column: {e}") from None
    expected = run.job.get("manifest", {}).get("num_rows")
    if expected is not None and expected != manifest.num_rows:
        raise ScoreError(f"{run.dir}: the manifest now has {manifest.num_rows} rows, "
                         f"the job had {expected}; row indices no longer match")
    return manifest
