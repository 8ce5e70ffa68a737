"""Drive msModelSlim's data-free W8A16 (the optional `quant` extra) with the LLaVA recipe.

Recipe: only language-model linears are quantized; the vision tower and the projector are listed
in disable_names (lm_head msModelSlim rolls back to FLOAT by itself, we list it too). Per-channel
needs mm_tensor=False (QuantConfig defaults to per-tensor). msModelSlim loads the whole model in
memory, unlike the streaming builtin converter. It walks named_modules(), so its tensor names are
the transformers-5 module names ("hf"); for --names legacy the files are rewritten afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

import torch

from quant import families, layout, names, st_io
from quant.errors import QuantError


def available() -> bool:
    return importlib.util.find_spec("msmodelslim") is not None


def convert(src_dir: Path, dst_dir: Path, *, names_scheme: str = "hf") -> None:
    if not available():
        raise QuantError("--backend msmodelslim needs msModelSlim: pip install 'llava-batch[quant]'")
    import transformers
    from msmodelslim.pytorch.llm_ptq.llm_ptq_tools import Calibrator, QuantConfig

    cls = getattr(transformers, families.model_class_name(families.read_config(src_dir), src_dir))
    model = cls.from_pretrained(src_dir, dtype="auto", device_map="cpu").eval()
    keep = set(families.quantizable_linears(model))
    disable = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in keep]
    cfg = QuantConfig(w_bit=8, a_bit=16, disable_names=disable, dev_type="cpu",
                      w_method="MinMax", mm_tensor=False, w_sym=True)
    calibrator = Calibrator(model, cfg, calib_data=None, disable_level="L0")  # no data: data-free
    calibrator.run()
    if names_scheme == "hf":
        calibrator.save(str(dst_dir), save_type=["ascendV1"])
        return
    with tempfile.TemporaryDirectory(dir=dst_dir) as tmp:
        calibrator.save(tmp, save_type=["ascendV1"])
        _rename(Path(tmp), dst_dir, names_scheme)


def _rename(src: Path, dst: Path, scheme: str) -> None:
    """Copy msModelSlim's output with tensor names (and description keys) in another scheme."""
    desc = layout.read_description(src)
    types = {names.to_scheme(names.to_hf(k), scheme): v for k, v in desc.items()
             if k not in ("model_quant_type", "version")}
    for path in layout.weight_files(src):
        infos = st_io.read_header(path)
        renamed = {k: names.to_scheme(names.to_hf(k), scheme) for k in infos}
        writer = st_io.StreamWriter(dst / path.name, [(renamed[k], i.dtype, i.shape) for k, i in infos.items()])
        try:
            for k, info in infos.items():
                writer.write(renamed[k], st_io.read_rows(info))
        finally:
            writer.close()
    for index in src.glob("*.index.json"):
        data = json.loads(index.read_text())
        data["weight_map"] = {names.to_scheme(names.to_hf(k), scheme): v for k, v in data["weight_map"].items()}
        (dst / index.name).write_text(json.dumps(data, indent=2) + "\n")
    layout.write_description(dst, types)
    shutil.rmtree(src, ignore_errors=True)
