"""The CLIP judge's model: open_clip built from a name or a local config JSON, weights from a local file.

Nothing is downloaded: the model is built with pretrained=None (and no pretrained towers), configs
that would fetch a Hugging Face text tower are refused, and the weights are loaded with
weights_only=True. Images and captions are embedded L2-normalised in fp32.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import tempfile
from pathlib import Path

from pipeline.eval import ScoreError

WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")


@contextlib.contextmanager
def _quiet_random_init_warning():
    # create_model(pretrained=None) warns "initialized randomly"; the weights are loaded right after.
    class _Drop(logging.Filter):
        def filter(self, record):
            return "initialized randomly" not in record.getMessage()

    root, drop = logging.getLogger(), _Drop()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _read_config(spec: str) -> tuple[dict, dict] | None:
    """(model_cfg, preprocess_cfg) when spec names a local config, else None (a built-in name)."""
    p = Path(spec)
    if p.is_dir():
        p = p / "open_clip_config.json"
    elif not p.is_file():
        # "ViT-B/32" is an old-style built-in name, so a slash alone does not make a path.
        if spec.endswith(".json") or spec.startswith((".", "/", "~")):
            raise ScoreError(f"--clip-model: no such open_clip config file: {spec}")
        return None
    try:
        raw = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ScoreError(f"--clip-model: {p} is not a readable JSON file: {e}") from None
    # Either a bare model config (open_clip/model_configs/*.json) or an open_clip_config.json.
    cfg, pre = (raw.get("model_cfg"), raw.get("preprocess_cfg", {})) if "model_cfg" in raw else (raw, {})
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ScoreError(f"--clip-model: {p} is not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
    return cfg, pre


def _refuse_downloads(cfg: dict, spec: str) -> None:
    # These config keys make open_clip fetch a Hugging Face model or tokenizer unless they name a local dir.
    text = cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if text.get(key) and not Path(text[key]).is_dir():
            raise ScoreError(f"--clip-model {spec}: text_cfg.{key} = {text[key]!r} would be downloaded; "
                             "point it at a local directory")


class Clip:
    """An open_clip model in fp32 plus its eval preprocessing and tokenizer."""

    def __init__(self, clip_model: str, clip_weights: str | Path, device):
        try:
            import open_clip
        except ImportError:
            raise ScoreError("open_clip is not installed: pip install 'llava-batch[eval]'") from None
        weights = Path(clip_weights)
        if not weights.is_file():
            raise ScoreError(f"--clip-weights: no such file: {weights}")
        if weights.suffix not in WEIGHT_SUFFIXES:
            raise ScoreError(f"--clip-weights: {weights.name} must be a {'/'.join(WEIGHT_SUFFIXES)} file")
        if clip_model.startswith(("hf-hub:", "local-dir:")):
            raise ScoreError("--clip-model: give a built-in open_clip model name or a local config JSON, "
                             f"not {clip_model!r}")

        local = _read_config(clip_model)
        overrides = {}
        if local is None:
            name = clip_model.replace("/", "-")
            if name not in open_clip.list_models():
                near = difflib.get_close_matches(name, open_clip.list_models(), n=3)
                hint = f"; did you mean {', '.join(near)}?" if near else ""
                raise ScoreError(f"--clip-model: unknown open_clip model {clip_model!r}{hint}")
            cfg = open_clip.get_model_config(name)
        else:
            cfg, pre = local
            name = self._register(open_clip, cfg)
            overrides = {f"image_{k}": pre[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pre}
        _refuse_downloads(cfg, clip_model)

        with _quiet_random_init_warning():
            # pretrained_* False: with no checkpoint, open_clip would otherwise fetch tower weights.
            model, _, self.preprocess = open_clip.create_model_and_transforms(
                name, pretrained=None, pretrained_image=False, pretrained_text=False,
                precision="fp32", device="cpu", **overrides)
        try:
            open_clip.load_checkpoint(model, str(weights), strict=True, weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickle, safetensors and key-mismatch errors all mean "wrong file"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ScoreError(f"--clip-weights: cannot load {weights} into open_clip {clip_model}: {first}") from None
        self.tokenizer = open_clip.get_tokenizer(name)
        self.model = model.to(device).eval()
        self.device = device

    @staticmethod
    def _register(open_clip, cfg: dict) -> str:
        # open_clip only builds registered configs; a content-hashed name keeps two configs apart.
        name = "llava-batch-clip-" + hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
        if name not in open_clip.list_models():
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"{name}.json"
                path.write_text(json.dumps(cfg))
                open_clip.add_model_config(path)
        return name

    def encode_images(self, images: list, batch_size: int):
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(images), batch_size):
                x = torch.stack([self.preprocess(im) for im in images[i:i + batch_size]]).to(self.device)
                out.append(torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1))
        return torch.cat(out).cpu()

    def encode_texts(self, texts: list[str], batch_size: int):
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                x = self.tokenizer(texts[i:i + batch_size]).to(self.device)
                out.append(torch.nn.functional.normalize(self.model.encode_text(x).float(), dim=-1))
        return torch.cat(out).cpu()
