"""Caption quality flags: what a data team filters on before using a caption.

- `repetition`: an n-gram loop, the same 3 words at least 4 times, or the caption ends in a repeated
  span (one word three times running, or a span of two or more words twice running);
- `truncated`: the caption hit max_output_length (finish_reason "length");
- `empty`: an ok row whose caption is empty.

`repetition_stop` is the same loop rule on token ids, the point where generation.stop_on_repetition
stops a row: both engines cut there, so they agree.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

NGRAM, TIMES = 3, 4
FLAGS = ("repetition", "truncated", "empty")


def repetition_stop(tokens: Sequence[int]) -> int | None:
    """The length at which `tokens` first holds one 3-gram 4 times (None: never)."""
    seen: Counter = Counter()
    for end in range(NGRAM, len(tokens) + 1):
        gram = tuple(tokens[end - NGRAM:end])
        seen[gram] += 1
        if seen[gram] >= TIMES:
            return end
    return None


def ends_in_repeat(words: Sequence[str]) -> bool:
    """One word three times running at the end, or a span of two or more words twice running."""
    n = len(words)
    if n >= 3 and words[-1] == words[-2] == words[-3]:
        return True
    return any(words[n - 2 * k:n - k] == words[n - k:] for k in range(2, n // 2 + 1))


def caption_flags(caption: str | None, finish_reason: str | None, ok: bool) -> list[str]:
    if not ok:
        return []
    words = (caption or "").lower().split()
    flags = []
    if finish_reason == "repetition" or repetition_stop(words) is not None or ends_in_repeat(words):
        flags.append("repetition")
    if finish_reason == "length":
        flags.append("truncated")
    if not words:
        flags.append("empty")
    return flags
