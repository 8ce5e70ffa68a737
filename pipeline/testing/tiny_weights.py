"""The tiny models' weights: random, scaled so greedy captions depend on the image, and an EOS row
calibrated so they stop after a varied number of tokens (a default-initialised tiny model repeats one
token forever, which makes every "same output as HF generate" test pass vacuously)."""

from __future__ import annotations

import math

import torch
from PIL import Image

from pipeline.testing.tiny_tokenizer import EOS_ID, PAD_ID, vocabulary

# Init scales, found by measuring greedy captions: large enough that the image changes the greedy path
# (default 0.02-std init repeats one token), small enough that bf16 stays finite.
_LM_GAIN = 1.0  # linear layers: std = gain / sqrt(fan_in), i.e. roughly norm-preserving
_QK_GAIN = 2.0  # sharper attention, so the last position does not just average the image away
_PROJ_GAIN = 3.0  # image features as loud as the prompt's word embeddings
_VISION_POS_STD = 0.3  # CLIP position embeddings quieter than the pixels
_LOGIT_STD = 4.0  # lm_head rows on the unit-RMS final hidden state -> logits std ~ this
# EOS calibration: captions of about this median length, none longer than the window.
_TARGET_MEDIAN = 12
_CALIB_TOKENS = 40


def _gain(name: str) -> float:
    if "multi_modal_projector.linear_2" in name:
        return _PROJ_GAIN
    if "language_model" in name and name.endswith(("q_proj.weight", "k_proj.weight")):
        return _QK_GAIN
    return _LM_GAIN


@torch.no_grad()
def init_weights(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)

    def normal_(t: torch.Tensor, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=gen) * std)

    for name, param in sorted(model.named_parameters()):
        if name.endswith(("class_embedding", "image_newline")):
            normal_(param, 1.0)
        elif param.ndim == 1:  # norm weights 1, biases 0
            param.fill_(1.0) if "norm" in name and name.endswith("weight") else param.zero_()
        elif name.endswith("embed_tokens.weight"):
            normal_(param, 1.0)
        elif name.endswith("position_embedding.weight"):
            normal_(param, _VISION_POS_STD)
        elif "lm_head" in name:
            normal_(param, _LOGIT_STD / math.sqrt(param.shape[1]))
        else:  # Linear / Conv weights: fan_in is everything but the output dim
            normal_(param, _gain(name) / math.sqrt(param[0].numel()))
    # Zero rows never win the argmax (logit 0 vs a max of ~3 std), so captions are plain words, never
    # <image>/<pad>/punctuation. The EOS row (zero too, for now) is set by calibrate_eos.
    silent = [i for i, tok in enumerate(vocabulary()) if not tok.isalpha()]
    model.lm_head.weight[silent] = 0.0


@torch.no_grad()
def calibrate_eos(model, processor, seed: int, median: int | None = None) -> None:
    """Set the EOS row of lm_head so greedy captions end at EOS after a varied number of tokens
    (about `median` of them; None: the test calibration's length).

    A fixed EOS scale does not carry across sizes: whether EOS ever wins the argmax depends on how the
    final hidden states are spread. But greedy decoding never looks at the EOS row until EOS wins, so
    one generation with EOS suppressed yields, for every candidate row `scale * u`, the exact length at
    which each caption would stop: the first step where scale * (u . h_t) beats the chosen token's logit.
    """
    median = median or _TARGET_MEDIAN
    window = max(_CALIB_TOKENS, 3 * median)
    states: list[torch.Tensor] = []
    norm = model.model.language_model.norm  # output = the unit-RMS states lm_head reads
    hook = norm.register_forward_hook(lambda _m, _i, out: states.append(out[:, -1].float()))
    try:
        model.generate(
            **_calibration_inputs(processor, seed),
            max_new_tokens=window,
            do_sample=False,
            suppress_tokens=[EOS_ID],
            pad_token_id=PAD_ID,
        )
    finally:
        hook.remove()
    h = torch.stack(states[:window], dim=1)  # [batch, step, hidden]
    best = h @ model.lm_head.weight.float().T  # EOS row is 0 here, below any chosen logit
    chosen = best.max(dim=-1).values
    # A random direction with the states' common component removed, so u . h_t swings from step to
    # step instead of being ~constant per caption (which gives either instant EOS or none).
    u = torch.randn(h.shape[-1], generator=torch.Generator().manual_seed(seed + 1))
    # The first step's state follows the fixed "ASSISTANT:" prompt and barely moves between inputs:
    # keep u off its mean too, or EOS at step 0 becomes all-or-nothing (empty captions).
    common = torch.stack([h.reshape(-1, h.shape[-1]).mean(0), h[:, 0].mean(0)], dim=1)
    basis, _ = torch.linalg.qr(common)
    u -= basis @ (basis.T @ u)
    proj = h @ u
    scale = min(_SCALES, key=lambda s: _length_score(_stop_lengths(s * proj, chosen), median, window))
    model.lm_head.weight[EOS_ID] = (scale * u).to(model.lm_head.weight.dtype)


_SCALES = [0.25 * 1.1**k for k in range(60)]


def _stop_lengths(eos_logit: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    wins = torch.cat([eos_logit > chosen, torch.ones_like(chosen[:, :1], dtype=torch.bool)], dim=1)
    return wins.int().argmax(dim=1)  # first step where EOS wins; the window length = never


def _length_score(lengths: torch.Tensor, median: int, window: int) -> float:
    lengths = lengths.float()
    too_short, too_long = (lengths < 2).float().mean(), (lengths >= window).float().mean()
    return abs(lengths.median().item() - median) + 20 * (too_short + too_long).item()


def _calibration_inputs(processor, seed: int):
    prompts = ["Describe this image briefly.", "What is shown in the picture?"]
    conversations = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}] for p in prompts
    ]
    texts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    images = _calibration_images(seed)
    return processor(
        images=images, text=[texts[i % 2] for i in range(len(images))], padding=True, return_tensors="pt"
    )


def _calibration_images(seed: int, n: int = 12) -> list[Image.Image]:
    # Noise, flat colours and gradients at assorted sizes: the kinds of inputs the tests feed.
    gen = torch.Generator().manual_seed(seed + 2)
    images = []
    for i in range(n):
        h, w = (int(x) for x in torch.randint(20, 120, (2,), generator=gen))
        if i % 3 == 0:
            pixels = torch.randint(0, 256, (h, w, 3), generator=gen)
        elif i % 3 == 1:
            pixels = torch.randint(0, 256, (1, 1, 3), generator=gen).expand(h, w, 3)
        else:
            ramp = torch.linspace(0, 1, h)[:, None, None] * torch.rand(3, generator=gen) * 255
            pixels = ramp + torch.linspace(0, 1, w)[None, :, None] * torch.rand(3, generator=gen) * 255
        images.append(Image.fromarray(pixels.clamp(0, 255).to(torch.uint8).numpy()))
    return images
