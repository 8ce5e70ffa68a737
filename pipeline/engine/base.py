"""The contract every engine keeps: one `Request` per row in, one `Result` per row out.

Also what both engines must agree on to give the same rows the same results: which tokens end a
caption, how a Result is built from generated tokens, and the texts of a row's errors.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pipeline import devices
from pipeline.data.quality import repetition_stop


@dataclass(frozen=True)
class Shared:
    """Requests that share one media (the prompts of one manifest row): they come one after another
    in the stream with the same `key`, `count` of them at most. An engine may then run the vision
    tower once for them and prefill their common first tokens once."""

    key: object
    count: int


@dataclass
class Request:
    row_index: int
    prompt: str
    kind: str  # "image" | "video"
    image: Any = None  # PIL RGB image
    frames: np.ndarray | None = None  # uint8 [T, H, W, 3]
    # Rows of different groups never share a batch (the runner passes the chunk, so a chunk's captions
    # depend on its own rows only); an engine that decodes row by row may ignore it.
    group: object = None
    shared: Shared | None = None


@dataclass
class Result:
    caption: str | None = None
    n_prompt_tokens: int | None = None
    n_output_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    dedup_of: int | None = None  # the row whose result this is (generation.dedup)


class Engine(Protocol):
    # Counters for the shard stats (pipeline/shard/process.py); empty for an engine that keeps none.
    stats: dict[str, float]

    def generate(self, requests: list[Request]) -> list[Result]:
        """One Result per request, in request order."""

    def generate_stream(self, requests: Iterable[Request]) -> Iterator[tuple[Request, Result]]:
        """Every request with its Result, in the order they finish."""


def eos_ids(generation_config, tokenizer) -> set[int]:
    """The tokens that end a caption: the model's generation_config's, else the tokenizer's."""
    eos = generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def caption_result(tokens: list[int], n_prompt: int, eos: set[int], tokenizer,
                   stop_on_repetition: bool = False) -> Result:
    """The Result of a row that generated `tokens`: cut at the first EOS, as `generate` stops there,
    or (stop_on_repetition) where a token loop is first seen (data/quality.py), whichever comes first."""
    stop = next((i for i, t in enumerate(tokens) if t in eos), None)
    loop = repetition_stop(tokens) if stop_on_repetition else None
    if loop is not None and (stop is None or loop <= stop):
        caption = tokenizer.decode(tokens[:loop], skip_special_tokens=True).strip()
        return Result(caption=caption, n_prompt_tokens=int(n_prompt), n_output_tokens=loop,
                      finish_reason="repetition")
    kept = tokens if stop is None else tokens[:stop]
    caption = tokenizer.decode(kept, skip_special_tokens=True).strip()
    return Result(caption=caption, n_prompt_tokens=int(n_prompt),
                  n_output_tokens=len(tokens) if stop is None else stop + 1,
                  finish_reason="length" if stop is None else "stop")


def prompt_too_long(n_prompt: int, limit: int, planned: bool = False) -> Result:
    """`planned`: the limit is the cache plan's longest prompt, below max_input_length."""
    what = "the longest prompt the job's cache plan holds" if planned else "max_input_length"
    return Result(n_prompt_tokens=n_prompt, error=f"prompt too long: {n_prompt} tokens (prompt + media) > {what} {limit}")


def generation_failed(e: BaseException) -> str:
    """A row's error text for an exception its batch raised again when run on the row alone."""
    return f"generation failed: {type(e).__name__}: {e}"


def stage_error(stage: str, e: BaseException) -> str:
    """A row's error text for an exception raised while `stage` ran on it."""
    if devices.is_oom(e):
        return f"device out of memory: {str(e).splitlines()[0][:200]}"
    return f"{stage} failed: {type(e).__name__}: {str(e)[:200]}"
