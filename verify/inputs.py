"""Deterministic verification inputs: random token runs of several lengths (one a few hundred
tokens long, so long-range RoPE behaviour shows) and, when the model has a tokenizer, a
chat-formatted conversation. Prompt tokens carry label -100."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

LENGTHS = (32, 128, 384)
ALIGN = 8  # sequence lengths are multiples of this, so sequence parallel splits them (tp <= 8)

CHAT = [
    {"role": "system", "content": "you are a model that can convert weight and check the tensor ."},
    {"role": "user", "content": "what is the first layer of the model ? convert it to parallel pipeline ."},
    {"role": "assistant", "content": "the first layer is the one that people see first . it can be in "
                                     "any pipeline and the expert will check each tensor ."},
]


@dataclasses.dataclass
class Sample:
    name: str
    input_ids: torch.Tensor  # [S] int64
    labels: torch.Tensor  # [S], -100 where no loss
    position_ids: torch.Tensor | None = None  # [3, S] multimodal RoPE ids (vision-language models)
    vision: dict = dataclasses.field(default_factory=dict)  # pixel_values, image_grid_thw

    @property
    def loss_tokens(self) -> int:
        return int((self.labels[1:] != -100).sum())

    def describe(self) -> dict:
        out = {"name": self.name, "tokens": int(self.input_ids.numel()), "loss_tokens": self.loss_tokens}
        if "image_grid_thw" in self.vision:
            out["images"] = self.vision["image_grid_thw"].tolist()
        elif "token_type_ids" in self.vision:  # square images of one size (Gemma 3): [images, 3, H, W]
            out["images"] = [list(p.shape[-2:]) for p in self.vision["pixel_values"]]
        elif "pixel_values" in self.vision:  # image tiles (InternVL)
            out["tiles"] = int(self.vision["pixel_values"].shape[0])
        return out


def random_sample(vocab: int, length: int, seed: int, prompt_fraction: float = 0.375) -> Sample:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (length,), generator=g)
    labels = ids.clone()
    labels[: int(length * prompt_fraction)] = -100
    return Sample(f"random-{length}", ids, labels)


def chat_sample(model_dir: Path, vocab: int) -> Sample | None:
    """The conversation through the model's own tokenizer and chat template; loss on the reply."""
    model_dir = Path(model_dir)
    if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if not getattr(tok, "chat_template", None):
        return None
    prompt = tok.apply_chat_template(CHAT[:-1], tokenize=True, add_generation_prompt=True)
    full = tok.apply_chat_template(CHAT, tokenize=True)
    prompt, full = _ids(prompt), _ids(full)
    pad = tok.eos_token_id if tok.eos_token_id is not None else 0
    while len(full) % ALIGN:
        full.append(pad)
    ids = torch.tensor(full, dtype=torch.long)
    if int(ids.max()) >= vocab:
        return None
    labels = ids.clone()
    labels[: len(prompt)] = -100
    return Sample("chat", ids, labels)


def _ids(out) -> list[int]:
    if hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)


def default_samples(vocab: int, model_dir: Path | None = None, lengths=LENGTHS) -> list[Sample]:
    samples = [random_sample(vocab, n, seed=1000 + n) for n in lengths]
    chat = chat_sample(model_dir, vocab) if model_dir is not None else None
    return samples + ([chat] if chat is not None else [])


# ---- vision-language models ----------------------------------------------------------------------
# Images as (rows, cols) of patch x merge tiles: one image, then two of different shapes.
IMAGE_SAMPLES = {"image": [(3, 4)], "images-2": [(2, 5), (4, 2)]}


def multimodal_samples(family, model_dir: Path | None, lengths=LENGTHS, seed: int = 7) -> list[Sample]:
    """Image samples (synthetic pixels through the model's real image processor; loss only on the
    text after the last image) and text-only samples, all with transformers' 3-D position ids.
    Models whose images are fixed-size tiles (``family.vision_input == "tiles"``): ``tile_inputs``;
    models with a fixed number of tokens per image (Gemma 3): ``fixed_token_samples``."""
    if getattr(family, "vision_input", None) == "tiles":
        from .tile_inputs import tile_samples

        return tile_samples(family, model_dir, lengths, seed)
    if getattr(family, "tokens_per_image", None):
        return fixed_token_samples(family, model_dir, lengths, seed)
    from mcore_bridge.families.qwen_vl import hf_config
    from mcore_bridge.families.vl_model import mrope_position_ids

    cfg = hf_config(family.full_config)
    vision = family.vision_settings()
    processor = image_processor(cfg, model_dir)
    text_vocab = min(int(family.cfg.require("vocab_size")), vision.image_token_id, vision.video_token_id,
                     int(cfg.vision_start_token_id), int(cfg.vision_end_token_id))
    g = torch.Generator().manual_seed(seed)
    samples = []
    for name, images in IMAGE_SAMPLES.items():
        pixels = [_image(processor, cfg, rows, cols, seed + i) for i, (rows, cols) in enumerate(images)]
        ids, answer_from = [], 0
        for out in pixels:
            n_tokens = int(out["image_grid_thw"].prod()) // processor.merge_size ** 2
            ids += torch.randint(5, text_vocab, (5,), generator=g).tolist()
            ids += [cfg.vision_start_token_id] + [vision.image_token_id] * n_tokens + [cfg.vision_end_token_id]
            answer_from = len(ids)
        ids += torch.randint(5, text_vocab, (24 + (-len(ids) - 24) % ALIGN,), generator=g).tolist()
        input_ids = torch.tensor(ids)
        labels = input_ids.clone()
        labels[:answer_from + 4] = -100  # image and prompt tokens carry no loss
        grid = torch.cat([p["image_grid_thw"] for p in pixels])
        vis = {"pixel_values": torch.cat([p["pixel_values"] for p in pixels]), "image_grid_thw": grid}
        samples.append(Sample(name, input_ids, labels, None, vis))
    samples += [random_sample(text_vocab, n, seed=1000 + n) for n in lengths]
    for s in samples:
        s.position_ids = mrope_position_ids(family, s.input_ids[None], s.vision.get("image_grid_thw"))[:, 0]
    return samples


def image_processor(cfg, model_dir: Path | None):
    """The model's image processor from its ``preprocessor_config.json`` (the PIL class: no
    torchvision needed), else one built from the vision config (``zoo.image_processor``)."""
    from transformers import Qwen2VLImageProcessorPil

    if model_dir is not None and (Path(model_dir) / "preprocessor_config.json").exists():
        return Qwen2VLImageProcessorPil.from_pretrained(model_dir)
    from mcore_bridge.zoo import image_processor as built

    return built(cfg)


def _image(processor, cfg, rows: int, cols: int, seed: int) -> dict:
    import numpy as np
    from PIL import Image

    tile = cfg.vision_config.patch_size * cfg.vision_config.spatial_merge_size
    pixels = np.random.default_rng(seed).integers(0, 256, size=(rows * tile, cols * tile, 3), dtype=np.uint8)
    return processor(images=[Image.fromarray(pixels)], return_tensors="pt")


def fixed_token_samples(family, model_dir: Path | None, lengths=LENGTHS, seed: int = 7) -> list[Sample]:
    """Gemma 3: each image is ``<boi>``, ``tokens_per_image`` image tokens, ``<eoi>`` (as its processor
    writes it) and ``token_type_ids`` mark the image tokens (transformers then lets each image attend
    to itself bidirectionally); pixels are square images through the model's image processor. One
    image, then two; text-only samples; 1-D positions."""
    from mcore_bridge.families.qwen_vl import hf_config

    cfg = hf_config(family.full_config)
    if model_dir is not None and (Path(model_dir) / "preprocessor_config.json").exists():
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        processor = Gemma3ImageProcessorPil.from_pretrained(model_dir)
    else:
        from mcore_bridge.zoo import image_processor as built

        processor = built(cfg)
    special = (family.image_token_id, int(cfg.boi_token_index), int(cfg.eoi_token_index))
    text_vocab = min(int(family.cfg.require("vocab_size")), *special)
    g = torch.Generator().manual_seed(seed)
    samples = []
    for name, count in (("image", 1), ("images-2", 2)):
        ids, answer_from, pixels = [], 0, []
        for i in range(count):
            pixels.append(_square_image(processor, cfg.vision_config.image_size, seed + i))
            ids += torch.randint(5, text_vocab, (5,), generator=g).tolist()
            ids += [special[1]] + [special[0]] * family.tokens_per_image + [special[2]]
            answer_from = len(ids)
        ids += torch.randint(5, text_vocab, (24 + (-len(ids) - 24) % ALIGN,), generator=g).tolist()
        input_ids = torch.tensor(ids)
        labels = input_ids.clone()
        labels[:answer_from + 4] = -100  # image and prompt tokens carry no loss
        vis = {"pixel_values": torch.cat(pixels), "token_type_ids": (input_ids == special[0]).long()[None]}
        samples.append(Sample(name, input_ids, labels, None, vis))
    return samples + [random_sample(text_vocab, n, seed=1000 + n) for n in lengths]


def _square_image(processor, side: int, seed: int) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(side + 3, side + 5, 3), dtype=np.uint8)
    return processor(images=[Image.fromarray(pixels)], return_tensors="pt")["pixel_values"]
