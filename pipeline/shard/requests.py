"""What a row asks of the engine: its prompts (generation.prompts, a prompt column's text or list,
else generation.prompt) and a request for each, or why it gets none."""

from __future__ import annotations

from dataclasses import replace

from pipeline.engine.base import Request, Shared
from pipeline.shard.context import JobContext
from pipeline.shard.rows import Item

# A prompt a row asks for: (its name in generation.prompts or its index in a list-valued prompt
# column, None for the one prompt of a job; the prompt text).
Prompt = tuple[str | None, str]


def row_prompts(gen, value) -> list[Prompt]:
    """The prompts of a row whose prompt column holds `value` (None without a column): the column's
    text, or each text of its list; generation.prompts; else generation.prompt. A missing or empty
    text is generation.prompt."""
    if isinstance(value, list | tuple):
        return [(str(i), text or gen.prompt) for i, text in enumerate(value)] or [(None, gen.prompt)]
    if value:
        return [(None, value)]
    if gen.prompts:
        return list(gen.prompts.items())
    return [(None, gen.prompt)]


def row_error(ctx: JobContext, item: Item, text: str) -> str | None:
    """Why a row gets no caption before it reaches the engine (None: it goes on)."""
    if item.error:
        return item.error
    if item.media.kind == "video" and not ctx.info.supports_video:
        return f"unsupported media: video rows need a llava_next_video model, not {ctx.info.family}"
    if (token := ctx.special_token_in(text)) is not None:
        return f"prompt contains the special token {token!r}: control tokens are not accepted in prompt text"
    return None


def make_request(ctx: JobContext, item: Item, text: str) -> Request:
    media = item.media
    prompt = ctx.prompt_for(text, media.kind)
    return Request(item.chunk.start + item.pos, prompt, media.kind, image=media.image, frames=media.frames,
                   group=item.chunk.index)


def checked_request(ctx: JobContext, item: Item, text: str, shared: Shared | None
                     ) -> tuple[Request | None, str | None]:
    """(the row's request for `text`, None), or (None, why it gets no caption)."""
    try:
        error = row_error(ctx, item, text)
        return (replace(make_request(ctx, item, text), shared=shared), None) if error is None else (None, error)
    except Exception as e:  # noqa: BLE001 - e.g. a chat template that refuses this text
        return None, f"prompt error: {type(e).__name__}: {e}"
