"""How far transformers' default (torchvision) image processors are from their PIL backend, which
vitscope reproduces exactly (``worker.hf_models``): mean and largest difference of the model's input
crop, in grey levels, over a few photo-like images, for three common recipes.

    python bench/bench_hf_preprocessing.py
"""

from __future__ import annotations

import tempfile

import numpy as np
import transformers
from PIL import Image

SIZES = [(640, 480), (500, 375), (1024, 768), (301, 203)]
RECIPES = [
    ("ViT: 224×224 squash, bilinear", transformers.ViTImageProcessor, {}),
    (
        "DINOv2: shortest edge 256, crop 224, bicubic",
        transformers.BitImageProcessor,
        {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}, "do_center_crop": True},
    ),
    ("CLIP: shortest edge 224, crop 224, bicubic", transformers.CLIPImageProcessor, {}),
]


def photo(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx / width, yy / height, (xx * yy) / (width * height)], axis=-1) * 220
    return Image.fromarray(np.clip(base + rng.normal(0, 30, (height, width, 3)), 0, 255).astype(np.uint8))


def crop(processor: transformers.BaseImageProcessor, image: Image.Image) -> np.ndarray:
    pixels = processor(image, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"][0]
    return pixels.astype(np.float64)


def main() -> None:
    for label, processor_class, options in RECIPES:
        with tempfile.TemporaryDirectory() as folder:
            processor_class(**options).save_pretrained(folder)
            pil = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")
            default = transformers.AutoImageProcessor.from_pretrained(folder)
        differences = [
            np.abs(crop(pil, image) - crop(default, image))
            for image in (photo(w, h, seed) for seed, (w, h) in enumerate(SIZES))
        ]
        mean = float(np.mean([d.mean() for d in differences]))
        largest = float(max(d.max() for d in differences))
        print(f"{label} ({type(default).__name__}): mean {mean:.3f}, max {largest:.0f} grey levels")


if __name__ == "__main__":
    main()
