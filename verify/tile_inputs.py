"""Verification inputs for vision-language models that cut images into fixed-size tiles (InternVL):
synthetic images through the model's real image processor (tiles + a thumbnail), each image's
tokens the image token repeated ``tiles x tokens_per_tile`` times; text-only samples beside them.
Positions are the plain 1-D ones (``position_ids`` None). Loss only on the text after the last image."""

from __future__ import annotations

from pathlib import Path

import torch

from .inputs import ALIGN, LENGTHS, Sample, random_sample

# Images as (height, width) in tiles: one wide image, then a square one and a tall one
TILE_SAMPLES = {"image": [(1, 2)], "images-2": [(1, 1), (2, 1)]}


def tile_samples(family, model_dir: Path | None, lengths=LENGTHS, seed: int = 7) -> list[Sample]:
    vision = family.vision_settings()
    processor = tile_processor(family, model_dir)
    text_vocab = min(int(family.cfg.require("vocab_size")), vision.image_token_id)
    g = torch.Generator().manual_seed(seed)
    samples = []
    for name, images in TILE_SAMPLES.items():
        pixels, ids, answer_from = [], [], 0
        for i, (rows, cols) in enumerate(images):
            tiles = _image(processor, vision.image_size * rows, vision.image_size * cols, seed + i)
            pixels.append(tiles)
            ids += torch.randint(5, text_vocab, (5,), generator=g).tolist()
            ids += [vision.image_token_id] * (tiles.shape[0] * vision.tokens_per_tile)
            answer_from = len(ids)
        ids += torch.randint(5, text_vocab, (24 + (-len(ids) - 24) % ALIGN,), generator=g).tolist()
        input_ids = torch.tensor(ids)
        labels = input_ids.clone()
        labels[:answer_from + 4] = -100  # image and prompt tokens carry no loss
        samples.append(Sample(name, input_ids, labels, None, {"pixel_values": torch.cat(pixels)}))
    return samples + [random_sample(text_vocab, n, seed=1000 + n) for n in lengths]


def tile_processor(family, model_dir: Path | None):
    """The checkpoint's image processor (``preprocessor_config.json``, PIL backend), else the zoo's."""
    from transformers import GotOcr2ImageProcessorPil

    if model_dir is not None and (Path(model_dir) / "preprocessor_config.json").exists():
        return GotOcr2ImageProcessorPil.from_pretrained(model_dir)
    from mcore_bridge.families.qwen_vl import hf_config
    from mcore_bridge.zoo import image_processor

    return image_processor(hf_config(family.full_config))


def _image(processor, height: int, width: int, seed: int) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return processor(images=[Image.fromarray(pixels)], return_tensors="pt")["pixel_values"]
