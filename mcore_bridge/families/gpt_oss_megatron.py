"""The megatron-core side of gpt-oss that megatron-core leaves to its caller (imports megatron).

``GPTModel(position_embedding_type="yarn")`` and the attention read ``yarn_*`` fields from the
config with ``getattr`` (Megatron-LM sets them from its arguments), but ``TransformerConfig``
declares none of them in 0.16.1 or 0.19.2. ``YarnTransformerConfig`` is ``TransformerConfig`` with
those fields declared, nothing else.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron.core.transformer import TransformerConfig


@dataclasses.dataclass
class YarnTransformerConfig(TransformerConfig):
    yarn_rotary_scaling_factor: float = 1.0
    yarn_original_max_position_embeddings: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: Optional[float] = None  # None (with mscale_all_dim None): 0.1 ln(factor) + 1
    yarn_mscale_all_dim: Optional[float] = None
    yarn_correction_range_round_to_int: bool = True  # HF rope_parameters["truncate"]
