"""Edits of a saved HF checkpoint directory, used by the zoo's tiny models and by the GPU bench's
reduced copies of published checkpoints (``bench/reduce_published.py``): blockwise FP8
quantisation, and MTP layers stored as the published checkpoints store them (transformers builds
no MTP: the MTP layer's decoder layer is built as one more layer, then renamed and given its
MTP-only weights)."""

from __future__ import annotations

from pathlib import Path


def quantize_fp8_dir(out: Path, block: list[int] | None = None, scale_fmt: str | None = None, *,
                     qconfig: dict | None = None, device: str = "cpu"):
    """Rewrite the safetensors in ``out`` (one file or sharded, with its index) as a blockwise-FP8
    checkpoint (``quant.quantize_fp8``) of the tensors an FP8 export would quantise; ``scale_fmt=
    "ue8m0"``: power-of-two scales, as DeepSeek-V3.1 declares. ``qconfig``: a published
    ``quantization_config``, written verbatim, whose ``weight_block_size`` and ``scale_fmt`` are used
    (``block`` / ``scale_fmt`` must then be left out). ``device``: where the blocks are quantised."""
    import json

    from safetensors.torch import load_file, save_file

    from . import quant
    from .families import family_for

    if qconfig is not None and (block is not None or scale_fmt is not None):
        raise ValueError("quantize_fp8_dir: give qconfig, or block and scale_fmt, not both")
    if qconfig is None:
        if block is None:
            raise ValueError("quantize_fp8_dir: a block size (or a published qconfig) is needed")
        qconfig = dict(quant.DEFAULT_FP8_CONFIG, weight_block_size=list(block))
        if scale_fmt:
            qconfig["scale_fmt"] = scale_fmt
    block = quant.fp8_block(qconfig)  # refuses what the loader would refuse, before any file is touched
    pow2 = qconfig.get("scale_fmt") == "ue8m0"
    config = json.loads((out / "config.json").read_text())
    keep = family_for(config).fp8_unquantized()  # as an FP8 export
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    total = 0
    for f in sorted(out.glob("*.safetensors")):
        tensors = load_file(str(f), device=device)
        names = quant.default_fp8_names({n: (t.shape, t.dtype) for n, t in tensors.items()}, keep)
        for n in sorted(names):
            tensors[n], tensors[n + quant.SCALE_SUFFIX] = quant.quantize_fp8(tensors[n], block, pow2)
            if index is not None:
                index["weight_map"][n + quant.SCALE_SUFFIX] = f.name
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file({n: t.cpu() for n, t in tensors.items()}, str(f), metadata={"format": "pt"})
    if index is not None:
        index_path.write_text(json.dumps({"metadata": dict(index.get("metadata", {}), total_size=total),
                                          "weight_map": dict(sorted(index["weight_map"].items()))}, indent=2))
    config["quantization_config"] = dict(qconfig)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def edit_shards(out: Path, edit) -> None:
    """Apply ``edit(tensors)`` (a dict of every tensor of the checkpoint in ``out``, changed in
    place) and write the result back: a single-file checkpoint stays one file; in a sharded one the
    tensors that stay keep their files, new or renamed ones go to ``model-extra.safetensors``, and
    ``model.safetensors.index.json`` is rewritten."""
    import json

    from safetensors.torch import load_file, save_file

    files = sorted(out.glob("*.safetensors"))
    home, tensors = {}, {}
    for f in files:
        for n, t in load_file(f).items():
            home[n], tensors[n] = f.name, t
    edit(tensors)
    if len(files) == 1:
        save_file(tensors, files[0], metadata={"format": "pt"})
        return
    by_file = {}
    for n, t in tensors.items():
        by_file.setdefault(home.get(n, "model-extra.safetensors"), {})[n] = t
    for f in files:
        if f.name not in by_file:
            f.unlink()
    for name, part in by_file.items():
        save_file(part, out / name, metadata={"format": "pt"})
    index = out / "model.safetensors.index.json"
    meta = json.loads(index.read_text()).get("metadata", {}) if index.exists() else {}
    meta["total_size"] = sum(t.numel() * t.element_size() for t in tensors.values())
    weight_map = {n: f for f, part in by_file.items() for n in part}
    index.write_text(json.dumps({"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}, indent=2))


def _set_main_layers(out: Path, main_layers: int, text: str | None = None) -> None:
    """config.json (its ``text`` section, where given): ``num_hidden_layers`` (and ``layer_types``)
    back to the main model's."""
    import json

    full = json.loads((out / "config.json").read_text())
    config = full[text] if text else full
    config["num_hidden_layers"] = main_layers
    if "layer_types" in config:
        config["layer_types"] = config["layer_types"][:main_layers]
    (out / "config.json").write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")


def add_mtp(out: Path, main_layers: int, mtp: int, seed: int):
    """Turn the saved model's layers ``main_layers ..`` into MTP layers as DeepSeek-V3 stores them:
    add ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm`` (seeded) and the copies of the main
    embedding and head (``embed_tokens``, ``shared_head.head``); config.json: ``num_hidden_layers``
    back to the main model's."""
    import torch

    def edit(tensors):
        g = torch.Generator().manual_seed(seed + 1)
        embed = tensors["model.embed_tokens.weight"]
        hidden = embed.shape[1]
        for k in range(mtp):
            p = f"model.layers.{main_layers + k}."
            for norm in ("enorm", "hnorm", "shared_head.norm"):
                tensors[p + norm + ".weight"] = (1.0 + 0.1 * torch.randn(hidden, generator=g)).to(embed.dtype)
            tensors[p + "eh_proj.weight"] = (torch.randn(hidden, 2 * hidden, generator=g)
                                             / (2 * hidden) ** 0.5).to(embed.dtype)
            tensors[p + "embed_tokens.weight"] = embed.clone()
            tensors[p + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()

    edit_shards(out, edit)
    _set_main_layers(out, main_layers)


def add_qwen_next_mtp(out: Path, main_layers: int, mtp: int, seed: int, prefix: str = "model.",
                        text: str | None = None):
    """Turn the saved model's layers ``main_layers ..`` (under ``prefix``) into Qwen3-Next's (and
    Qwen3.5's) MTP layer as published: ``mtp.layers.{k}.*`` plus ``mtp.fc``,
    ``mtp.pre_fc_norm_embedding`` / ``_hidden`` and ``mtp.norm`` ((1 + w) norms: seeded offsets);
    config.json (its ``text`` section, where given) back to the main model's layers."""
    import torch

    def edit(tensors):
        g = torch.Generator().manual_seed(seed + 1)
        embed = tensors[prefix + "embed_tokens.weight"]
        hidden = embed.shape[1]
        for k in range(mtp):
            old, new = f"{prefix}layers.{main_layers + k}.", f"mtp.layers.{k}."
            for n in [n for n in tensors if n.startswith(old)]:
                tensors[new + n[len(old):]] = tensors.pop(n)
        for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
            tensors[f"mtp.{norm}.weight"] = (0.1 * torch.randn(hidden, generator=g)).to(embed.dtype)
        tensors["mtp.fc.weight"] = (torch.randn(hidden, 2 * hidden, generator=g) / (2 * hidden) ** 0.5).to(embed.dtype)

    edit_shards(out, edit)
    _set_main_layers(out, main_layers, text)
