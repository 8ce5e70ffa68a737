"""Caption quality flags on hand-made captions, and the token loop rule both engines stop at."""

from __future__ import annotations

import pytest

from pipeline.data.quality import caption_flags, ends_in_repeat, repetition_stop


@pytest.mark.parametrize("caption,finish,flags", [
    ("a dog runs on the beach", "stop", []),
    ("a dog on a mat on a mat on a mat on a mat", "stop", ["repetition"]),  # "on a mat" 4 times
    ("a dog on a mat on a mat on a mat", "stop", ["repetition"]),  # ends in a repeated span
    ("a red red red", "stop", ["repetition"]),  # one word three times at the end
    ("a very very tall tree", "stop", []),  # a word twice is English
    ("a cat sat on the", "length", ["truncated"]),
    ("the the the the the the", "length", ["repetition", "truncated"]),
    ("", "stop", ["empty"]),
    ("anything", "repetition", ["repetition"]),
])
def test_flags(caption, finish, flags):
    assert caption_flags(caption, finish, ok=True) == flags


def test_error_rows_have_no_flags():
    assert caption_flags(None, None, ok=False) == []


def test_the_token_loop_rule():
    assert repetition_stop([1, 2, 3, 4, 5, 6]) is None
    loop = [7, 1, 2, 3] * 4
    # the 3-gram (1, 2, 3) completes its 4th occurrence at the 15th token
    assert repetition_stop(loop) == 15
    assert repetition_stop([5] * 10) == 6  # (5, 5, 5) at 3, 4, 5, 6
    assert ends_in_repeat("x y z y z".split()) and not ends_in_repeat("x y z".split())
