"""Random-weight LLaVA-family models in llava-hf layout, built offline for tests, demos and benchmarks.

`build_tiny_model(out_dir, family)` writes a directory that stock transformers classes load with
`from_pretrained` (config.json, model.safetensors, generation_config.json, tokenizer and processor
files). Nothing is downloaded: the tokenizer is a word-level vocabulary embedded below.

The weights are random but *not* default-initialised: a default tiny model repeats one token forever,
which makes every "same output as HF generate" test pass vacuously. `_init_weights` scales the layers so
greedy captions depend on the image and stop at EOS after a varied number of tokens.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoProcessor,
    LlavaNextVideoVideoProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

FAMILIES = ("llava", "llava_next", "llava_next_video")
PRESETS = ("test", "bench")

# Special tokens first, at fixed ids, like the Llama vocabulary (<unk>=0, <s>=1, </s>=2).
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>")
UNK_ID, BOS_ID, EOS_ID, PAD_ID, IMAGE_ID, VIDEO_ID = range(len(SPECIAL_TOKENS))

# Prompt words (chat templates, default prompts) and punctuation, so prompts encode without <unk>.
_PROMPT_WORDS = """user assistant system inst describe describing description caption image video picture
photo frame frames briefly short detailed detail one sentence what is shown in this the a an of and
please write give me it its . , : ; ! ? ' " ( ) [ ] / - < >"""

# A few hundred common English words: the "language" the random model speaks.
_WORDS = """time year people way day man thing woman life child world school state family student group
country problem hand part place case week company system program question work government number night
point home water room mother area money story fact month lot right study book eye job word business
issue side kind head house service friend father power hour game line end member law car city
community name president team minute idea kid body information back parent face others level office
door health person art war history party result change morning reason research girl guy moment air
teacher force education foot boy age policy music market sense nation plan college interest death
experience effect use class control care field development role effort rate heart drug show leader
light voice wife police mind price report decision son view relationship town road arm difference
value building action model season society tax director position player record paper space ground form
event official matter center couple site project activity star table need court oil situation cost
industry figure street tree dog cat bird horse fish flower grass sky cloud sun moon river lake sea beach
mountain hill forest field garden park bridge train bus boat plane bike window wall floor chair bed
desk lamp cup plate bowl bottle glass box bag hat shirt dress shoe coat red blue green yellow black
white brown gray orange pink purple bright dark small large big tall short long wide old new young
happy sad quiet loud warm cold wet dry soft hard clean dirty empty full open closed round square flat
sitting standing walking running jumping eating drinking playing reading holding looking smiling
wearing carrying riding flying swimming sleeping talking cooking painting near next behind under above
over inside outside between around front top bottom left right middle corner edge background foreground
two three four five several many few some all each other another same different first last only
very quite really also just still even there here then now today outside together across along
with without from into onto by at on for to up down off out about against during before after while
has have had was were be been being are am do does did can could will would should may might must
shows appears seems looks contains features includes depicts captures displays scene view close shot
person people crowd woman man girl boy baby player worker artist chef doctor soldier farmer driver
animal dog puppy kitten cow sheep goat bear lion tiger elephant zebra giraffe monkey duck chicken
food pizza cake bread fruit apple banana orange sandwich salad soup coffee tea milk juice water wine
kitchen bathroom bedroom office street road sidewalk building tower church house shop store market
snow rain fog sunset sunrise shadow reflection light color pattern texture shape line circle surface
city town village countryside desert island ocean wave rock stone sand ice fire smoke sign clock
computer phone screen keyboard camera television picture painting poster map letter card ball toy kite
umbrella bench fence gate stairs roof tile brick wood metal plastic paper cloth leather glass"""


def build_tiny_model(
    out_dir,
    family: str,
    preset: str = "test",
    seed: int = 0,
    image_size: int | None = None,
    chat_template: bool = True,
    caption_median: int | None = None,
) -> Path:
    """Write a random-weight `family` model in llava-hf layout to `out_dir` and return its path."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    size = image_size or (28 if preset == "test" else 336)
    # 14 px patches, and an even patch grid so the video 2x2 average pooling divides it exactly.
    if size % 28:
        raise ValueError(f"image_size must be a multiple of 28 (14 px patches, even grid), got {size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    tokenizer.chat_template = _CHAT_TEMPLATES[family]  # calibration renders prompts with it
    config = _build_config(family, preset, size, len(tokenizer))
    processor = _build_processor(family, config, tokenizer, size)
    with torch.random.fork_rng(devices=[]):  # the default init draws from (and would move) the global RNG
        model = _MODEL_CLASSES[family](config).eval()
    _init_weights(model, seed)  # every parameter, from its own generator: same seed, same bytes
    # Benchmarks ask for longer captions (decode-bound workloads); None keeps the test calibration.
    median = caption_median or _TARGET_MEDIAN
    _calibrate_eos(model, processor, seed, median, max(_CALIB_TOKENS, 3 * median))
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False
    )
    model.save_pretrained(out)
    if not chat_template:
        processor.chat_template = tokenizer.chat_template = None
    processor.save_pretrained(out)
    return out


def _vocabulary() -> list[str]:
    words = dict.fromkeys(SPECIAL_TOKENS)  # dict keeps first occurrence and order
    words.update(dict.fromkeys(_PROMPT_WORDS.split()))
    words.update(dict.fromkeys(_WORDS.split()))
    return list(words)


def _build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {word: i for i, word in enumerate(_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    # Splits words from punctuation ("USER:" -> "user", ":") so chat prompts stay in-vocabulary.
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # Llama tokenizers prepend <s>; the processors rely on add_special_tokens doing the same here.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    # WordPiece decoder with an unused prefix = join tokens with spaces and tidy punctuation.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=["<image>", "<video>"],
        padding_side="left",  # decoder-only batched generation pads on the left
        model_max_length=4096,
    )
    return fast


def _build_config(family: str, preset: str, image_size: int, vocab_size: int):
    if preset == "test":
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    else:
        text = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8)
        vision = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4)
    text_config = LlamaConfig(
        vocab_size=vocab_size,
        num_key_value_heads=text["num_attention_heads"],
        max_position_embeddings=4096,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
        **text,
    )
    vision_config = CLIPVisionConfig(image_size=image_size, patch_size=14, projection_dim=32, **vision)
    common = dict(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=IMAGE_ID,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(image_size // 14) ** 2,
        tie_word_embeddings=False,
    )
    if family == "llava":
        return LlavaConfig(**common)
    pinpoints = _grid_pinpoints(image_size)
    if family == "llava_next":
        return LlavaNextConfig(image_grid_pinpoints=pinpoints, **common)
    return LlavaNextVideoConfig(
        image_grid_pinpoints=pinpoints,
        video_token_index=VIDEO_ID,
        video_seq_length=(image_size // 28) ** 2,
        **common,
    )


def _grid_pinpoints(size: int) -> list[list[int]]:
    # The real checkpoints use 336 * {1x2, 2x1, 2x2, 3x1, 1x3}; the same shapes in tile units keep
    # any-resolution tiling exercised at a tiny token count.
    return [[size, 2 * size], [2 * size, size], [2 * size, 2 * size], [3 * size, size], [size, 3 * size]]


def _build_processor(family, config, tokenizer, size: int):
    image_kwargs = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    # num_additional_image_tokens=1: CLIP's CLS token, which "default" feature selection drops again;
    # without it the processor inserts one <image> too few and the model raises a feature mismatch.
    common = dict(
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )
    if family == "llava":
        return LlavaProcessor(image_processor=CLIPImageProcessor(**image_kwargs), **common)
    image_processor = LlavaNextImageProcessor(
        image_grid_pinpoints=config.image_grid_pinpoints, **image_kwargs
    )
    if family == "llava_next":
        return LlavaNextProcessor(image_processor=image_processor, **common)
    video_processor = LlavaNextVideoVideoProcessor(**image_kwargs)
    return LlavaNextVideoProcessor(video_processor=video_processor, image_processor=image_processor, **common)


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
def _init_weights(model, seed: int) -> None:
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
    # <image>/<pad>/punctuation. The EOS row (zero too, for now) is set by _calibrate_eos.
    silent = [i for i, tok in enumerate(_vocabulary()) if not tok.isalpha()]
    model.lm_head.weight[silent] = 0.0


@torch.no_grad()
def _calibrate_eos(model, processor, seed: int, median: int = _TARGET_MEDIAN, window: int = _CALIB_TOKENS) -> None:
    """Set the EOS row of lm_head so greedy captions end at EOS after a varied number of tokens.

    A fixed EOS scale does not carry across sizes: whether EOS ever wins the argmax depends on how the
    final hidden states are spread. But greedy decoding never looks at the EOS row until EOS wins, so
    one generation with EOS suppressed yields, for every candidate row `scale * u`, the exact length at
    which each caption would stop: the first step where scale * (u . h_t) beats the chosen token's logit.
    """
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


_MODEL_CLASSES = {
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
    "llava_next_video": LlavaNextVideoForConditionalGeneration,
}

# The llava-hf checkpoints' own templates (llava-1.5-7b-hf, llava-v1.6-mistral-7b-hf,
# LLaVA-NeXT-Video-7B-hf), so apply_chat_template renders the prompt exactly as the real models do.
_VICUNA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "VIDEO_BLOCK"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
_VIDEO_BLOCK = (
    "{# Render all video then #}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
)
_MISTRAL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
    "{% endfor %}{# Render all text next #}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{{' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
_CHAT_TEMPLATES = {
    "llava": _VICUNA_TEMPLATE.replace("VIDEO_BLOCK", ""),
    "llava_next": _MISTRAL_TEMPLATE,
    "llava_next_video": _VICUNA_TEMPLATE.replace("VIDEO_BLOCK", _VIDEO_BLOCK),
}
