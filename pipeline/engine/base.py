"""What every engine takes and gives: one `Request` per row in, one `Result` per row out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import devices


@dataclass
class Request:
    row_index: int
    prompt: str
    kind: str  # "image" | "video"
    image: Any = None  # PIL RGB image
    frames: np.ndarray | None = None  # uint8 [T, H, W, 3]


@dataclass
class Result:
    caption: str | None = None
    n_prompt_tokens: int | None = None
    n_output_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None


def stage_error(stage: str, e: BaseException) -> str:
    """A row's error text for an exception raised while `stage` ran on it."""
    if devices.is_oom(e):
        return f"device out of memory: {str(e).splitlines()[0][:200]}"
    return f"{stage} failed: {type(e).__name__}: {str(e)[:200]}"
