"""What decoding a media item raises: shared by the image and the video decoders and their dispatcher."""

from __future__ import annotations


class MediaError(Exception):
    """A media item could not be decoded; ``str(e)`` names the cause."""


class NotThisKind(Exception):
    """This decoder does not recognise the content; try the other one."""
