"""Build the embedded demo: a tiny random model, a few images and a short video, a manifest.

`python -m pipeline.testing.demo DIR` is what `make run` calls; everything is generated locally.
Media are written by `write_image` / `write_video`, which the tests use too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from pipeline.testing.tiny_model import build_tiny_model


def synthetic_image(seed: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A gradient with a few shapes: distinct per seed so captions differ per image."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.linspace(rng.integers(0, 255, 3), rng.integers(0, 255, 3), w, dtype=np.float32)
    img = Image.fromarray(np.broadcast_to(base, (h, w, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        box = (x0, y0, x0 + int(rng.integers(8, w // 2)), y0 + int(rng.integers(8, h // 2)))
        draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return img


def write_image(path: Path, seed: int, size: tuple[int, int] = (96, 72)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    synthetic_image(seed, size).save(path)
    return path


def write_video(path: Path, n_frames: int = 12, size: tuple[int, int] = (64, 48), fps: int = 6, seed: int = 0) -> Path:
    """An mp4 whose frames move and change colour, so sampled frames differ."""
    path.parent.mkdir(parents=True, exist_ok=True)
    import av  # only here: hosts without PyAV still build images and models

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(n_frames):
            frame = np.asarray(synthetic_image(seed * 1000 + i, size))
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def build_demo(root: str | Path) -> Path:
    root = Path(root)
    model = root / "model"
    if not (model / "config.json").is_file():
        build_tiny_model(model, "llava_next_video", preset="test", seed=0)
    media = root / "media"
    names = []
    for i, size in enumerate([(96, 72), (72, 96), (128, 64), (80, 80), (64, 112)]):
        names.append(write_image(media / f"image_{i}.png", seed=i, size=size).name)
    names.append(write_video(media / "clip.mp4").name)
    table = pa.table({"id": [f"demo-{i:03d}" for i in range(len(names))], "path": names})
    pq.write_table(table, root / "manifest.parquet")
    return root


if __name__ == "__main__":
    out = build_demo(sys.argv[1] if len(sys.argv) > 1 else "demo")
    print(f"demo built in {out}", file=sys.stderr)
