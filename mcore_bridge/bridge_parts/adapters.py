"""The LoRA lifecycle of a bridge: which adapter the model carries and its tables."""

from __future__ import annotations

from dataclasses import replace

import torch

from .. import lora as lora_
from ..errors import UsageError
from ..plan import inventory


class AdapterState:
    """The model's LoRA adapter, or none. Set once (``apply``/``load``); afterwards ``spec``,
    ``family`` (the adapter's ``lora.AdapterFamily``), ``units`` (its inventory), ``hf_tensors``
    (factor name -> (shape, dtype)) and ``dtype`` (the model's dtype when it was applied)."""

    def __init__(self, family, layout, hf_tensors: dict | None):
        self.base, self.layout, self.base_hf_tensors = family, layout, hf_tensors
        self.spec: lora_.LoraSpec | None = None
        self.family = self.units = self.hf_tensors = self.dtype = None

    def check_support(self):
        """The family's refusal of LoRA, if it has one (``Family.check_lora``)."""
        self.base.check_lora()

    def require(self):
        if self.spec is None:
            raise lora_.AdapterError("the model has no LoRA adapter to export (apply_lora / load_adapter)")

    def set(self, spec: "lora_.LoraSpec"):
        self.spec = spec
        self.family = lora_.AdapterFamily(self.base, spec)
        self.units = inventory(self.family, self.layout)
        self.hf_tensors = {}
        for u in self.units:
            for n in u.hf_names:
                shape, dtype = self.base_hf_tensors[lora_.base_hf_name(n)]
                self.hf_tensors[n] = (lora_.factor_hf_shapes(n, spec.r, shape), dtype)

    def apply(self, local, models, spec: "lora_.LoraSpec", random_b: bool = False, freeze_base: bool = True):
        """Wrap the targeted linears of ``models`` (this rank's chunks; ``local``: its ``LocalPlan``)."""
        self.check_support()
        if self.spec is not None:
            raise lora_.AdapterError("this model already has a LoRA adapter")
        if self.base_hf_tensors is None:
            raise UsageError("apply_lora needs the HF tensor shapes: build the Bridge from an HF source")
        self.set(spec)
        self.dtype = next(models[0].parameters()).dtype
        items = local.items(models, local.state(models))
        lora_.apply_lora(models, self.base, items, local.groups(), self.base_hf_tensors, spec, random_b,
                         freeze_base)
        local.items(models, local.state(models, lora=True), lora=True)  # every factor has its parameter
        return models

    def open(self, path):
        """(spec, checkpoint) of a PEFT adapter directory, the spec keeping distinct A matrices."""
        from ..lora import peft_io

        self.check_support()
        spec, ckpt = peft_io.open_adapter(path, self.base)
        return replace(spec, per_projection=self.distinct_a(ckpt, spec)), ckpt

    def distinct_a(self, ckpt, spec) -> bool:
        """Whether any fused module's projections carry different A matrices in ``ckpt``."""
        names = set(ckpt.names())
        for u in inventory(lora_.AdapterFamily(self.base, spec), self.layout):
            if u.rule.transform.identical_sources and all(n in names for n in u.hf_names):
                first = ckpt.read(u.hf_names[0])
                if any(ckpt.info(n).shape != ckpt.info(u.hf_names[0]).shape or not torch.equal(ckpt.read(n), first)
                       for n in u.hf_names[1:]):
                    return True
        return False
