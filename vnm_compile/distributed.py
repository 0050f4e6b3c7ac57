"""Tensor parallelism for V:N:M-compressed models: `parallelize(model, mesh, plan)` shards the VNMLinear
layers of a `vnm.sparsify`-ed model as PyTorch's ColwiseParallel and RowwiseParallel shard nn.Linear,
through torch's own `parallelize_module`, with the same plans (torchtitan's, Megatron-style):

    model = vnm.sparsify(model, example_inputs, vnm.VNMConfig(v=64, m=8))   # the full model, on every rank
    plan = {"layers.*.self_attn.q_proj": ColwiseParallel(), ..., "layers.*.mlp.down_proj": RowwiseParallel()}
    vnm.parallelize(model, init_device_mesh("cuda", (2,)), plan)

A V:N:M weight shards along its own structure, so every rank holds an ordinary smaller V:N:M weight:
- colwise (output rows) at whole V-row blocks: rank r holds rows [r R/n, (r+1) R/n) of `values` and
  `metadata`, the matching row blocks of `columns`, and that slice of the bias; its output is its
  slice of the output channels (Shard(-1)), as nn.Linear's under ColwiseParallel.
- rowwise (input channels) at whole M-column groups: rank r holds groups [r G/n, (r+1) G/n) of
  `values`, `columns` and `metadata`; its output is a partial sum (Partial()), reduced by the style's
  all-reduce (or reduce-scatter), and the bias sits on the mesh's first rank only (its Partial shard),
  so the reduction adds it once.
Each rank's shard is cut by `distribute_tensor` from `src_data_rank`, as the dense styles cut theirs,
and held as plain tensors by the same VNMLinear, now of the local shape: the op, its kernels and the
dispatcher see an ordinary weight. Input and output go through the dense styles' own layout handling,
so input_layouts, output_layouts and use_local_output mean what they mean for nn.Linear (sequence
parallel included). Plain shards rather than DTensor buffers: `distribute_module` would replicate
plain buffers, the op takes the local in_features, and two M-groups share a metadata byte, so a
rank holding an odd number of groups has no DTensor placement for its metadata. The styles are
subclasses of the dense ones that take over VNMLinear and leave every other module to them (as
torchao's float8 styles do); `parallelize` swaps them into a plan, so a dense model's plan serves.

Permutations: the channel-permutation search runs in `vnm.sparsify`, on the full weights, before
sharding (sparsify first, then parallelize), and is folded into the weights there; sharding cuts
the folded weights by position. That is consistent: a permutation group's channels are either never
sharded (the residual stream: colwise layers read all of it, rowwise layers write all of it after
the reduction, norms and embeddings see it whole) or sharded by the same positions on every side
(an MLP hidden: rank r's gate/up rows and down columns are the same positions of the one permuted
order, so each rank makes exactly the channels it consumes). Attention head reshapes are barriers
to the search, so q/k/v rows and o columns keep their order and shard by heads as dense ones do.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from .format import VNMWeight, pack_slots, unpack_slots
from .modules import VNMLinear


def parallelize(model: nn.Module, device_mesh: DeviceMesh, plan: ParallelStyle | dict[str, ParallelStyle], *,
                src_data_rank: int | None = 0) -> nn.Module:
    """`torch.distributed.tensor.parallel.parallelize_module(model, device_mesh, plan)` where the
    plan's ColwiseParallel and RowwiseParallel also shard VNMLinear layers (see the module's
    docstring); every other style and module is parallelize_module's. In place, like
    parallelize_module: returns `model`, its layers replaced by this rank's shards.

    device_mesh: the 1-D tensor-parallel mesh (e.g. `world_mesh["tp"]`). A VNMLinear that does not
    shard into whole blocks raises ValueError naming it: colwise needs out_features to be a multiple
    of v * mesh size, rowwise in_features a multiple of m * mesh size.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(device_mesh, DeviceMesh) or device_mesh.ndim != 1:
        raise ValueError(f"device_mesh must be a 1-D DeviceMesh (the tensor-parallel dimension, e.g. "
                         f"world_mesh['tp']), got {device_mesh!r}")
    layer_names = {id(module): name for name, module in model.named_modules()}
    if isinstance(plan, dict):
        plan = {path: _with_vnm(style, layer_names) for path, style in plan.items()}
    else:
        plan = _with_vnm(plan, layer_names)
    return parallelize_module(model, device_mesh, plan, src_data_rank=src_data_rank)


def _with_vnm(style: Any, layer_names: dict[int, str]) -> Any:
    """The style that also shards VNMLinear, for torch's own ColwiseParallel and RowwiseParallel
    (subclasses, e.g. float8 ones, have their own rules and stay as they are)."""
    for dense, sparse in ((ColwiseParallel, _VNMColwiseParallel), (RowwiseParallel, _VNMRowwiseParallel)):
        if type(style) is dense:
            translated = sparse.__new__(sparse)
            translated.__dict__.update(vars(style))
            translated.layer_names = layer_names
            return translated
    return style


def _local(tensor: torch.Tensor, mesh: DeviceMesh, placement: Placement, src_data_rank: int | None) -> torch.Tensor:
    """This rank's piece of `tensor` under `placement`, taken as the dense styles take theirs."""
    return distribute_tensor(tensor, mesh, [placement], src_data_rank=src_data_rank).to_local().contiguous()


class _VNMStyle:
    """What the colwise and rowwise V:N:M styles share: hold the shard, hook the dense style's layout
    handling around the local op. Mixed in before ColwiseParallel or RowwiseParallel."""

    layer_names: dict[int, str]
    takes: tuple[Placement, ...]  # the input layout the local op needs
    computed: Placement           # what the local op's output is of the full output
    # and `_shard(module, mesh, name) -> (local weight, local bias)`

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, VNMLinear):
            return super()._apply(module, device_mesh)
        name = self.layer_names.get(id(module), f"VNMLinear({module.extra_repr()})")
        if getattr(module, "_distribute_module_applied", False):
            raise ValueError(f"layer {name} is sharded already; parallelize a model once")
        weight, bias = self._shard(module, device_mesh, name)
        module.values, module.columns, module.metadata = weight.values, weight.columns, weight.metadata
        module.bias = bias
        module.in_features, module.out_features = weight.in_features, weight.out_features
        # The dense style's hooks, around the local op: its input arrives as a DTensor of the
        # desired layout, its output leaves as the DTensor the dense op would have made.
        prepare_input = partial(self._prepare_input_fn, self.input_layouts, self.takes)
        prepare_output = partial(self._prepare_output_fn, self.output_layouts, self.use_local_output)
        computed = self.computed
        module.register_forward_pre_hook(lambda mod, inputs: prepare_input(mod, inputs, device_mesh).to_local())
        module.register_forward_hook(lambda mod, inputs, output: prepare_output(
            mod, DTensor.from_local(output, device_mesh, (computed,), run_check=False), device_mesh))
        module._distribute_module_applied = True  # what distribute_module marks: a second sharding raises
        return module


class _VNMColwiseParallel(_VNMStyle, ColwiseParallel):
    """ColwiseParallel that also shards a VNMLinear's output rows at whole V-row blocks."""

    takes = (Replicate(),)
    computed = Shard(-1)

    def _shard(self, module: VNMLinear, mesh: DeviceMesh, name: str) -> tuple[VNMWeight, torch.Tensor | None]:
        ranks = mesh.size()
        if module.out_features % (module.v * ranks):
            raise ValueError(
                f"layer {name}: ColwiseParallel over {ranks} ranks shards its {module.out_features} output rows "
                f"at whole {module.v}-row blocks, so out_features must be a multiple of v * {ranks} = "
                f"{module.v * ranks}")
        local = partial(_local, mesh=mesh, placement=Shard(0), src_data_rank=self.src_data_rank)
        weight = VNMWeight(local(module.values), local(module.columns), local(module.metadata), module.v, module.m,
                           module.in_features)
        return weight, None if module.bias is None else local(module.bias)


class _VNMRowwiseParallel(_VNMStyle, RowwiseParallel):
    """RowwiseParallel that also shards a VNMLinear's input channels at whole M-column groups."""

    takes = (Shard(-1),)
    computed = Partial()

    def _shard(self, module: VNMLinear, mesh: DeviceMesh, name: str) -> tuple[VNMWeight, torch.Tensor | None]:
        ranks = mesh.size()
        if module.in_features % (module.m * ranks):
            raise ValueError(
                f"layer {name}: RowwiseParallel over {ranks} ranks shards its {module.in_features} input channels "
                f"at whole {module.m}-column groups, so in_features must be a multiple of m * {ranks} = "
                f"{module.m * ranks}")
        local = partial(_local, mesh=mesh, src_data_rank=self.src_data_rank)
        weight = module.weight
        # Two groups share a metadata byte: shard the unpacked slots, then pack each rank's own.
        slots = unpack_slots(weight.metadata, weight.groups).to(torch.uint8)
        local_weight = VNMWeight(local(weight.values, placement=Shard(1)), local(weight.columns, placement=Shard(1)),
                                 pack_slots(local(slots, placement=Shard(1))), weight.v, weight.m,
                                 weight.in_features // ranks)
        bias = None
        if module.bias is not None:
            bias = local(module.bias, placement=Replicate())
            if mesh.get_local_rank() != 0:
                bias = torch.zeros_like(bias)
        return local_weight, bias
