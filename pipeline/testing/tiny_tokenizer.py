"""The tiny models' tokenizer: a word-level vocabulary embedded below (nothing is downloaded), Llama's
special-token ids, and the llava-hf checkpoints' chat templates."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

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


def vocabulary() -> list[str]:
    words = dict.fromkeys(SPECIAL_TOKENS)  # dict keeps first occurrence and order
    words.update(dict.fromkeys(_PROMPT_WORDS.split()))
    words.update(dict.fromkeys(_WORDS.split()))
    return list(words)


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {word: i for i, word in enumerate(vocabulary())}
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
CHAT_TEMPLATES = {
    "llava": _VICUNA_TEMPLATE.replace("VIDEO_BLOCK", ""),
    "llava_next": _MISTRAL_TEMPLATE,
    "llava_next_video": _VICUNA_TEMPLATE.replace("VIDEO_BLOCK", _VIDEO_BLOCK),
}
