"""V:N:M checkpoints through transformers' `save_pretrained` / `from_pretrained`.

The hook is transformers' registry of quantization methods (`register_quantization_config` and
`register_quantizer` in `transformers.quantizers.auto`, the documented way to add a custom method;
compressed-tensors, torchao and bitsandbytes load through the same `HfQuantizer` interface). The
method is "vnm": a checkpoint's config.json carries `quantization_config` = the header of
`vnm_compile.checkpoint.describe` plus `"quant_method": "vnm"`, and its safetensors hold each sparse
layer's `values`, `columns`, `metadata` (and `bias`) under the layer's name, like any state_dict.

Loading: before the weights load, the quantizer puts a VNMLinear skeleton (meta device) in place of
each listed linear, so transformers' own loader fills its buffers from the checkpoint. Saving: a
sparsified transformers model carries this quantizer (`attach`, called by `sparsify` and
`load_compressed`), so `save_pretrained` writes the quantization_config of the model as it is then.

Importing this module registers the method; `import vnm_compile` imports it once transformers has
loaded its quantizer registry (`vnm_compile.checkpoint.register_with_transformers`). Without
`import vnm_compile`, transformers does not know "vnm": it warns "Unknown quantization type" and
leaves the sparse layers randomly initialised.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .checkpoint import SparseLayer, check_replaceable, describe, replace_module, sparse_layers
from .modules import VNMLinear

METHOD = "vnm"


@register_quantization_config(METHOD)
class VNMQuantizationConfig(QuantizationConfigMixin):
    """The `quantization_config` of a V:N:M checkpoint: the checkpoint header (see
    `vnm_compile.checkpoint.describe`), checked on construction. Made by `sparsify`, never by hand."""

    def __init__(self, layers: dict[str, dict[str, Any]] | None = None, format: str | None = None,
                 format_version: int | None = None, permutations_folded: bool | None = None,
                 quant_method: str = METHOD, **unknown: Any):
        if unknown:
            raise ValueError(f"the vnm quantization_config has unknown fields {sorted(unknown)}")
        self.quant_method = METHOD
        self.format, self.format_version = format, format_version
        self.permutations_folded = permutations_folded
        self.layers = layers
        self.sparse_layers()  # a header this version cannot read fails here, before the model is built

    def sparse_layers(self) -> dict[str, SparseLayer]:
        header = {key: value for key, value in self.to_dict().items() if key != "quant_method"}
        return sparse_layers(header, source="the checkpoint's quantization_config")


@register_quantizer(METHOD)
class VNMHfQuantizer(HfQuantizer):
    """Restores VNMLinear layers from a checkpoint; it never compresses (that is `vnm_compile.sparsify`)."""

    requires_calibration = True  # only a checkpoint that is already sparse loads

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        for name, layer in self.quantization_config.sparse_layers().items():
            dense = check_replaceable(model, name, layer)
            # in the dtype transformers built the model in (from_pretrained's dtype=), as a dense layer would be
            replace_module(model, name, layer.skeleton(dense.weight.dtype))
            # Some models' weight initialisation reaches into a block's linears by name (GPT-2 rescales
            # `block.c_proj.weight`), where a VNMLinear has no tensor; the block's tensors all come
            # from the checkpoint, so its initialisation is skipped.
            model.get_submodule(name.rpartition(".")[0])._is_hf_initialized = True
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        # transformers fills a tensor the checkpoint lacks with uninitialised memory and a warning; a
        # sparse layer has no sensible initialisation, so that is an error (loaded tensors carry the flag)
        for name, module in model.named_modules():
            if isinstance(module, VNMLinear):
                missing = [leaf for leaf, tensor in module._buffers.items()
                           if tensor is not None and not getattr(tensor, "_is_hf_initialized", False)]
                if missing:
                    raise ValueError(f"layer {name}: the checkpoint lacks its {', '.join(missing)}")
        return model

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[None, dict]:
        """Called by save_pretrained before it writes config.json: describe the model as it is now."""
        self.quantization_config = VNMQuantizationConfig(**describe(model))
        model.config.quantization_config = self.quantization_config
        return None, {}

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # adapters on top train; the compressed weights are buffers and stay as they are

    @property
    def is_compileable(self) -> bool:
        return True


def attach(model: nn.Module) -> None:
    """Give a sparsified transformers model what `from_pretrained` gives one loaded from a V:N:M
    checkpoint: the vnm quantizer and `config.quantization_config`. A weight tie whose target or
    source is now a VNMLinear is dropped from the config (the embedding stays dense, the linear is
    compressed: they no longer share a tensor), so `tie_weights()` leaves the sparse layer alone."""
    from transformers.modeling_utils import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and _ties_sparse_layer(module):
            module.config.tie_word_embeddings = False
    model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    quantizer = VNMHfQuantizer(VNMQuantizationConfig(**describe(model)), pre_quantized=True)
    model.hf_quantizer = quantizer
    model.quantization_method = METHOD
    model.config.quantization_config = quantizer.quantization_config


def _ties_sparse_layer(model: nn.Module) -> bool:
    names = [name for pair in model.get_expanded_tied_weights_keys().items() for name in pair]
    return any(isinstance(model.get_submodule(name.rpartition(".")[0]), VNMLinear) for name in names)
