"""PEFT's LoRA linear with a V:N:M mask on its merged weight, for training sparse models.

While a mask is set, the layer computes y = x @ ((W + s B A) * mask).T + b: the mask applies to the
weight the adapter will be merged into, so merging, then compressing under the same mask, gives
exactly the model that was trained. Without a mask it is PEFT's own LoRA linear (y = x W.T + s B A x
+ b). It is plugged into PEFT through `LoraConfig._register_custom_module` (PEFT's extension point
for custom LoRA layers), so `get_peft_model`, saving adapters and `merge_and_unload` work unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear
from torch import nn


class MaskedLoraLinear(LoraLinear):
    """A LoRA linear whose merged weight is multiplied by `vnm_mask` (bool, out x in) when it is set."""

    vnm_mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.vnm_mask is None or self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        return F.linear(x, self.masked_weight(), self.get_base_layer().bias)

    def masked_weight(self) -> torch.Tensor:
        """(W + the active adapters' s B A) * mask: the weight this layer computes with."""
        weight = self.get_base_layer().weight
        for adapter in self.active_adapters:
            if adapter in self.lora_A:
                weight = weight + self.get_delta_weight(adapter)
        return weight * self.vnm_mask


def masked_lora_config(**lora_config: Any) -> LoraConfig:
    """A LoraConfig (keyword arguments as PEFT's) whose nn.Linear targets become MaskedLoraLinear."""
    config = LoraConfig(**lora_config)
    config._register_custom_module({nn.Linear: MaskedLoraLinear})
    return config
