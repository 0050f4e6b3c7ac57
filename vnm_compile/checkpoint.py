"""Compressed checkpoints: a sparsified model in one safetensors file that loads without its dense
weights, example inputs or the passes.

    vnm.save_compressed(model_s, "model.vnm.safetensors")
    model = vnm.load_compressed(lambda: LlamaForCausalLM(config), "model.vnm.safetensors")

The file holds every parameter and buffer of the model (a tied tensor once), each VNMLinear as its
`values`, `columns` and `metadata` (and `bias`), and, in the safetensors metadata under "vnm_compile",
a JSON header (`describe`): the format name and version, that permutations are folded into the
parameters (the file is the model as it runs), the aliases of tied tensors, and per sparse layer its
pattern, shape, dtype and whether it has a bias. The weight is stored out x in whatever module it
replaced (nn.Linear or GPT-2's Conv1D, which stores in x out): the loading model's module says which.

Loading builds the model on the meta device, puts a VNMLinear made of the file's tensors in place of
each listed layer and assigns every other tensor from the file: nothing dense is allocated for a
sparse layer, and the loaded model holds the file's tensors, read once, and nothing else.

Hugging Face checkpoints (`save_pretrained` / `from_pretrained`) carry the same header as the
`quantization_config` of config.json, read by `vnm_compile.hf_quantizer`, which `import vnm_compile`
registers with transformers (`hf_registration`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .calibration import linear_module_types
from .format import WEIGHT_DTYPES, VNMWeight
from .modules import VNMLinear

FORMAT = "vnm-compile"
FORMAT_VERSION = 1
HEADER_KEY = "vnm_compile"  # the safetensors metadata entry holding the JSON header
SPARSE_TENSORS = ("values", "columns", "metadata")
_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in WEIGHT_DTYPES}


@dataclass(frozen=True)
class SparseLayer:
    """One VNMLinear as the header records it: enough to build its skeleton before reading tensors."""

    v: int
    m: int
    out_features: int
    in_features: int
    dtype: str
    bias: bool

    @classmethod
    def of(cls, module: VNMLinear) -> SparseLayer:
        return cls(module.v, module.m, module.out_features, module.in_features,
                   str(module.values.dtype).removeprefix("torch."), module.bias is not None)

    def skeleton(self, dtype: torch.dtype | None = None) -> VNMLinear:
        """A VNMLinear of this shape on the meta device, for a loader to fill; its values and bias in
        `dtype` (default: the stored one)."""
        rows, groups = self.out_features, -(-self.in_features // self.m)
        floats = {"device": "meta", "dtype": dtype or _DTYPES[self.dtype]}
        indices = {"device": "meta", "dtype": torch.uint8}
        weight = VNMWeight(torch.empty(rows, 2 * groups, **floats),
                           torch.empty(-(-rows // self.v), groups, 4, **indices),
                           torch.empty(rows, -(-groups // 2), **indices), self.v, self.m, self.in_features)
        return VNMLinear(weight, torch.empty(rows, **floats) if self.bias else None)


def describe(model: nn.Module) -> dict[str, Any]:
    """The header of `model`'s checkpoint: format, version, and its VNMLinear layers by name."""
    layers = {name: asdict(SparseLayer.of(module)) for name, module in model.named_modules()
              if isinstance(module, VNMLinear)}
    if not layers:
        raise ValueError("model has no VNMLinear layers: compress it with vnm_compile.sparsify first")
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "permutations_folded": True, "layers": layers}


def sparse_layers(header: dict[str, Any], source: str = "the checkpoint") -> dict[str, SparseLayer]:
    """The sparse layers a header lists, after checking that this version of vnm-compile reads it."""
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{source} is not a {FORMAT} checkpoint (its header says format "
                         f"{header.get('format') if isinstance(header, dict) else header!r})")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{source} has {FORMAT} format version {version!r}; this vnm-compile reads version "
                         f"{FORMAT_VERSION}: load it with the vnm-compile that wrote it and save it again")
    if header.get("permutations_folded") is not True:
        raise ValueError(f"{source} does not say its permutations are folded into its parameters")
    if not isinstance(header.get("layers"), dict):
        raise ValueError(f"{source}: the header lists no sparse layers")
    layers = {}
    for name, fields in header["layers"].items():
        try:
            layers[name] = SparseLayer(**fields)
            if layers[name].dtype not in _DTYPES:
                raise ValueError(f"dtype {layers[name].dtype!r} is not one of {sorted(_DTYPES)}")
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source}: the header's entry for layer {name} is malformed ({error})") from error
    return layers


def check_replaceable(model: nn.Module, name: str, layer: SparseLayer) -> nn.Module:
    """The module of `model` that the sparse layer `name` replaces, after checking that it fits."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the checkpoint has a sparse layer {name}, which the model does not have") from None
    if isinstance(module, (VNMLinear, nn.Linear)):
        shape = (module.out_features, module.in_features)
    elif isinstance(module, linear_module_types()):  # Conv1D: weight in x out
        shape = (module.nf, module.weight.shape[0])
    else:
        raise ValueError(f"layer {name}: the checkpoint has a sparse linear there, the model a {type(module).__name__}")
    if shape != (layer.out_features, layer.in_features):
        raise ValueError(f"layer {name}: the checkpoint's is {layer.out_features}x{layer.in_features} "
                         f"(out x in), the model's {shape[0]}x{shape[1]}")
    if (getattr(module, "bias", None) is not None) != layer.bias:
        raise ValueError(f"layer {name}: the checkpoint's {'has' if layer.bias else 'has no'} bias, the model's "
                         f"{'has none' if layer.bias else 'has one'}")
    return module


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name), leaf, module)


def _tensor_slots(model: nn.Module) -> dict[str, tuple[nn.Module, str, torch.Tensor]]:
    """Every parameter and buffer (persistent or not) of `model` by full name, a shared one under
    each of its names: (owning module, attribute, tensor)."""
    slots = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for store in (module._parameters, module._buffers):
            for leaf, tensor in store.items():
                if tensor is not None:
                    slots[f"{prefix}.{leaf}" if prefix else leaf] = (module, leaf, tensor)
    return slots


def save_compressed(model: nn.Module, path: str | os.PathLike) -> None:
    """Write `model` (sparsified: its VNMLinear layers compressed, its permutations folded) to one
    safetensors file that `load_compressed` reads back without the dense weights or the passes."""
    from safetensors.torch import save_file

    header = describe(model)
    tensors, names_of = {}, {}
    aliases = {}  # a tensor reachable under several names (tied) is stored once, under the first
    for name, (_, _, tensor) in _tensor_slots(model).items():
        if id(tensor) in names_of:
            aliases[name] = names_of[id(tensor)]
            continue
        names_of[id(tensor)] = name
        tensor = tensor.detach().contiguous()
        # a view into a larger tensor (e.g. one part of a fused weight) is stored alone
        tensors[name] = tensor.clone() if tensor.untyped_storage().nbytes() != tensor.nbytes else tensor
    header["aliases"] = aliases
    save_file(tensors, os.fspath(path), metadata={"format": "pt", HEADER_KEY: json.dumps(header)})


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a compressed checkpoint (see `describe`), without reading its tensors."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as file:
        metadata = file.metadata() or {}
    if HEADER_KEY not in metadata:
        raise ValueError(f"{os.fspath(path)} is not a {FORMAT} checkpoint (no {HEADER_KEY!r} entry in its "
                         "safetensors metadata); a save_pretrained directory loads with from_pretrained")
    return json.loads(metadata[HEADER_KEY])


def load_compressed(
    model: nn.Module | Callable[[], nn.Module],
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """The model of `path`, written by `save_compressed`, in eval mode, its tensors on `device`.

    model: a function building the dense model (called on the meta device, so no dense weight is
    allocated), or the model itself, which is changed in place (build it under
    `torch.device("meta")` to the same effect). The sparse layers the file lists become VNMLinear
    modules of the file's tensors; every other parameter and buffer takes the file's tensor.
    A layer or tensor of the file that does not fit the model raises ValueError naming it, before
    the model is changed.
    """
    from safetensors import safe_open

    if not isinstance(model, nn.Module):
        if not callable(model):
            raise TypeError(f"model must be an nn.Module or a function building one, got {type(model).__name__}")
        with torch.device("meta"):
            model = model()
        if not isinstance(model, nn.Module):
            raise TypeError(f"the model function returned a {type(model).__name__}, not an nn.Module")
    source = os.fspath(path)
    header = read_header(source)
    layers = sparse_layers(header, source)
    aliases = header.get("aliases", {})
    replaced = {id(check_replaceable(model, name, layer)) for name, layer in layers.items()}
    slots = {name: slot for name, slot in _tensor_slots(model).items() if id(slot[0]) not in replaced}
    with safe_open(source, framework="pt", device=str(torch.device(device))) as file:
        _check_tensors(file, source, layers, {name: tensor for name, (_, _, tensor) in slots.items()}, aliases)
        for name, layer in layers.items():
            tensors = {leaf: file.get_tensor(f"{name}.{leaf}") for leaf in SPARSE_TENSORS}
            try:
                weight = VNMWeight(**tensors, v=layer.v, m=layer.m, in_features=layer.in_features)
            except ValueError as error:
                raise ValueError(f"layer {name}: {error}") from error
            replace_module(model, name, VNMLinear(weight, file.get_tensor(f"{name}.bias") if layer.bias else None))
        loaded: dict[str, torch.Tensor] = {}
        for name, (module, leaf, tensor) in slots.items():
            stored_name = aliases.get(name, name)
            if stored_name not in loaded:  # tied names share one tensor, as they did when saved
                value = file.get_tensor(stored_name)
                loaded[stored_name] = (nn.Parameter(value, requires_grad=tensor.requires_grad)
                                       if isinstance(tensor, nn.Parameter) else value)
            store = module._parameters if leaf in module._parameters else module._buffers
            store[leaf] = loaded[stored_name]
    record_sparse_layers(model)
    return model.eval()


def _check_tensors(file: Any, source: str, layers: dict[str, SparseLayer], dense: dict[str, torch.Tensor],
                   aliases: dict[str, str]) -> None:
    """Raise ValueError, naming the tensor, unless `file` holds exactly the sparse layers' tensors
    and the model's other tensors (`dense`, by name), each in the model's shape."""
    expected = {aliases.get(name, name): (name, tensor.shape) for name, tensor in dense.items()}
    for name, layer in layers.items():
        expected.update({f"{name}.{leaf}": (f"layer {name}'s {leaf}", tensor.shape)
                         for leaf, tensor in layer.skeleton().named_buffers()})
    stored = set(file.keys())
    for stored_name, (what, shape) in expected.items():
        if stored_name not in stored:
            raise ValueError(f"{source} lacks {what}, which the model has")
        if tuple(file.get_slice(stored_name).get_shape()) != tuple(shape):
            raise ValueError(f"{what} has shape {tuple(file.get_slice(stored_name).get_shape())} in {source}, "
                             f"{tuple(shape)} in the model")
    unused = sorted(stored - set(expected))
    if unused:
        raise ValueError(f"{source} has tensors the model does not: {', '.join(unused[:8])}"
                         + (f" and {len(unused) - 8} more" if len(unused) > 8 else ""))


def record_sparse_layers(model: nn.Module) -> None:
    """Make what the model's framework records about it agree with its VNMLinear layers: for a
    transformers model, the vnm quantizer and `quantization_config` (so that `save_pretrained`
    writes a checkpoint `from_pretrained` restores), and no tie to a weight a sparse layer replaced.
    A model without VNMLinear layers (permutations folded, nothing compressed) has nothing to record."""
    if not any(isinstance(module, VNMLinear) for module in model.modules()):
        return
    if "transformers.modeling_utils" in sys.modules:  # a transformers model exists only once it is loaded
        from .hf_quantizer import attach

        attach(model)
