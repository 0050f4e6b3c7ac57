"""The trainable linears of recovery training, each with a V:N:M mask on the weight it computes with:
PEFT's LoRA linear (the mask on its merged weight) and a plain linear that trains its own weight.

While a mask is set, the LoRA layer computes y = x @ ((W + s B A) * mask).T + b: the mask applies to
the weight the adapter will be merged into, so merging, then compressing under the same mask, gives
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

    def merged_weight(self) -> torch.Tensor:
        """W + the active adapters' s B A: the weight the adapters will be merged into."""
        weight = self.get_base_layer().weight
        for adapter in self.active_adapters:
            if adapter in self.lora_A:
                weight = weight + self.get_delta_weight(adapter)
        return weight

    def masked_weight(self) -> torch.Tensor:
        """(W + the active adapters' s B A) * mask: the weight this layer computes with."""
        return self.merged_weight() * self.vnm_mask


class MaskedLinear(nn.Linear):
    """A linear that trains its own weight (no adapter), multiplied by `vnm_mask` when it is set: the
    kept weights learn, the pruned ones take no part (their gradient is zero)."""

    vnm_mask: torch.Tensor | None = None

    @classmethod
    def sharing(cls, linear: nn.Linear) -> MaskedLinear:
        """A MaskedLinear holding `linear`'s own weight and bias parameters."""
        masked = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        masked.weight, masked.bias = linear.weight, linear.bias
        return masked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.vnm_mask is None else self.masked_weight()
        return F.linear(x, weight, self.bias)

    def merged_weight(self) -> torch.Tensor:
        return self.weight

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.vnm_mask


def masked_lora_config(**lora_config: Any) -> LoraConfig:
    """A LoraConfig (keyword arguments as PEFT's) whose nn.Linear targets become MaskedLoraLinear."""
    config = LoraConfig(**lora_config)
    config._register_custom_module({nn.Linear: MaskedLoraLinear})
    return config
