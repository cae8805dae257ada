"""Run in a subprocess by test_published.py: for each published config given on the command line,
the layout plan (mcore_bridge.sizing) and transformers' own parameter count of the same config
(its model built on the meta device), printed as one JSON object."""

from __future__ import annotations

import json
import sys
import warnings

warnings.filterwarnings("ignore")


def hf_count(raw: dict) -> int | None:
    """Weights of transformers' model for this config (tied weights once), or None where
    transformers has no model class for it."""
    import torch
    import transformers

    try:
        cfg = transformers.AutoConfig.for_model(**raw)
    except (ValueError, KeyError):
        return None
    autos = (transformers.AutoModelForCausalLM, transformers.AutoModelForImageTextToText)
    if "vision_config" in raw:  # the whole vision-language model (AutoModelForCausalLM may build the text part only)
        autos = autos[::-1]
    for auto in autos:
        try:
            with torch.device("meta"):
                model = auto.from_config(cfg)
        except ValueError:
            continue
        keys = set(model.state_dict())  # persistent buffers too (e.g. DeepSeek's routing bias)
        buffers = sum(b.numel() for n, b in model.named_buffers() if n in keys)
        return sum(p.numel() for p in model.parameters()) + buffers  # a tied tensor counted once
    return None


def main(argv: list[str]) -> None:
    from mcore_bridge.layout import ParallelLayout
    from mcore_bridge.sizing import plan_config

    out = {}
    for arg in argv:
        path, layout = arg.split("=", 1)
        raw = json.load(open(path))
        p = plan_config(raw, ParallelLayout(**json.loads(layout)))
        out[path] = dict(plan=p.to_dict(), hf_params=hf_count(raw))
    print("PLANS " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
