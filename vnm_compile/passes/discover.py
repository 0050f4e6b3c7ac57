"""discover: the channel spaces of an FX graph, the permutation groups they form, and the linears to sparsify.

Every dimension of size > 1 of every parameter is a vertex of an undirected graph (networkx). The
graph is walked in order, tracking for each dimension of each tensor which parameter dimension it
carries, if any. An op that passes a channel permutation through (elementwise ops, activations,
norms, residual adds, reshapes that keep the dimension whole, ...) links the dimensions it lines up;
an op that absorbs one (a linear's rows and columns, an embedding's columns, a norm's weight) links the
parameter dimension. A connected component is a permutation group: one permutation, applied to every
parameter dimension in it, leaves the graph's outputs unchanged. A component is blocked, and keeps its
order, when any of its dimensions meets something that cannot follow a permutation: a head reshape,
a concat or split along channels, a graph input or output, or an op not known here.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..config import VNMConfig
from ..eligibility import skip_reason
from ..kernels import op  # noqa: F401  (defines torch.ops.vnm.linear, a node kind below)
from .common import module_path

if TYPE_CHECKING:
    from ..pipeline import PassState

Key = tuple  # ("p", parameter name, dimension)


@dataclass(frozen=True)
class Opaque:
    """A dimension that carries no permutable channels, and why."""

    reason: str


@dataclass
class LinearSite:
    """A linear in the graph: `x @ W.T + b` (F.linear) or `x @ W + b` (addmm/matmul, weight stored in x out)."""

    node: str
    name: str
    input: str          # FX node of x
    weight: str         # parameter name
    transposed: bool
    out_features: int
    in_features: int
    in_group: int | None = None
    out_group: int | None = None
    skip_reason: str | None = None
    stored: bool = False    # a vnm.linear already in the graph (a loaded or sparsified model's VNMLinear)


@dataclass
class Group:
    """Channels that share one permutation: the columns of `readers`, the rows of `writers`, and the
    parameter dimensions in `dims` (all of them, biases, norms and embeddings included)."""

    id: int
    size: int
    readers: list[str] = field(default_factory=list)
    writers: list[str] = field(default_factory=list)
    dims: list[tuple[str, int]] = field(default_factory=list)
    blocked_by: list[str] = field(default_factory=list)

    @property
    def permutable(self) -> bool:
        return not self.blocked_by


@dataclass
class Discovery:
    linears: dict[str, LinearSite]          # by FX node name, in graph order
    groups: dict[int, Group]                # groups that hold at least one linear
    parameter_groups: dict[tuple[str, int], int]  # (parameter name, dim) -> group id
    value_groups: dict[str, Any]            # node -> group id (or None) per dim; a list for tuples
    blockers: dict[str, str]                # node that stopped a permutation -> why


def discover(state: PassState) -> Discovery:
    """Channel spaces, permutation groups and eligible linears of Dynamo's graph (`state.gm`, whose
    parameter nodes `state.parameters` names); `state.extra_skips` keeps linears dense, by name."""
    tracer = _ChannelTracer(state.parameters)
    for node in state.gm.graph.nodes:
        tracer.visit(node)
    discovery = tracer.result(state.config, state.extra_skips)
    _refuse_sharded(discovery, state.weights)
    return discovery


def _refuse_sharded(discovery: Discovery, weights: dict[str, torch.Tensor]) -> None:
    """Masks and permutations are searched on whole weights, so a model holding DTensor (tensor-parallel)
    parameters is compressed before it is sharded. A graph of stored V:N:M layers only reads its
    parameters (its dense linears stay dense, nothing is permuted), so it may hold them."""
    if any(site.stored for site in discovery.linears.values()) or not torch.distributed.is_available():
        return
    from torch.distributed.tensor import DTensor

    sharded = [name for name, tensor in weights.items() if isinstance(tensor, DTensor)]
    if sharded:
        raise ValueError(
            f"layer {sharded[0].rpartition('.')[0] or sharded[0]}: its parameter {sharded[0]} is a DTensor (tensor "
            f"parallelism; {len(sharded)} such parameters in this graph), which the vnm passes do not support: "
            "they choose masks and permutations on whole weights. Compress the full model first, then shard "
            "it: vnm.sparsify(model, example_inputs, config), then vnm.parallelize(model, mesh, plan)")


def _shape(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (list, tuple)):
        return [_shape(item) for item in value]
    return None


def _example(node: fx.Node) -> Any:
    return node.meta.get("example_value", node.meta.get("val"))


def _is_one(size: Any) -> bool:
    return type(size) is int and size == 1


def _same(a: Any, b: Any) -> bool:
    if type(a) is int and type(b) is int:
        return a == b
    return statically_known_true(a == b)


def _is_key(dim: Any) -> bool:
    return isinstance(dim, tuple)


def _function_kinds() -> dict[Any, str]:
    kinds = {}
    table = {
        "elementwise": (
            operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
            operator.pow, operator.neg, operator.pos, operator.abs, operator.iadd, operator.isub,
            operator.imul, operator.itruediv, operator.eq, operator.ne, operator.lt, operator.le,
            operator.gt, operator.ge, operator.and_, operator.or_, operator.xor, operator.invert,
            torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.pow, torch.neg, torch.abs,
            torch.exp, torch.log, torch.log1p, torch.expm1, torch.sqrt, torch.rsqrt, torch.tanh,
            torch.sigmoid, torch.erf, torch.relu, torch.square, torch.reciprocal, torch.maximum,
            torch.minimum, torch.clamp, torch.clip, torch.where, torch.sin, torch.cos, torch.masked_fill,
            torch.sign, torch.lerp, torch.addcmul, torch.addcdiv, torch.eq, torch.ne, torch.lt, torch.le,
            torch.gt, torch.ge, torch.logical_and, torch.logical_or, torch.logical_not, torch.isnan,
            torch.isinf, torch.isfinite, torch.nan_to_num, F.gelu, F.silu, F.relu, F.relu6, F.sigmoid,
            F.tanh, F.softplus, F.mish, F.elu, F.selu, F.celu, F.leaky_relu, F.hardswish, F.hardsigmoid,
            F.hardtanh, F.logsigmoid, F.dropout, F.alpha_dropout,
        ),
        "like": (torch.ones_like, torch.zeros_like, torch.full_like),
        "softmax": (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax),
        "reduce": (torch.mean, torch.sum, torch.amax, torch.amin, torch.logsumexp, torch.prod, torch.var,
                   torch.std, torch.norm, torch.linalg.vector_norm),
        "reshape": (torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze),
        "expand": (torch.broadcast_to,),
        "transpose": (torch.transpose, torch.swapaxes, torch.permute, torch.t, torch.movedim),
        "split": (torch.split, torch.chunk, torch.tensor_split, torch.unbind),
        "narrow": (torch.narrow, torch.select),
        "cat": (torch.cat, torch.concat, torch.concatenate),
        "stack": (torch.stack,),
        "getitem": (operator.getitem,),
        "linear": (F.linear,),
        "stored": (torch.ops.vnm.linear.default,),
        "addmm": (torch.addmm,),
        "matmul": (torch.matmul, operator.matmul, torch.mm, torch.bmm),
        "embedding": (F.embedding,),
        "norm": (F.layer_norm, torch.layer_norm, F.rms_norm, torch.rms_norm),
        "batch_norm": (F.batch_norm,),
        "conv": (F.conv1d, F.conv2d, F.conv3d),
        "neutral": (
            getattr, torch.ops.aten.sym_size.int, torch._C._set_grad_enabled, torch._C._log_api_usage_once,
            torch.amp.autocast_mode._enter_autocast, torch.amp.autocast_mode._exit_autocast,
            torch.arange, torch.ones, torch.zeros, torch.full, torch.empty, torch.tensor,
        ),
    }
    for kind, targets in table.items():
        for target in targets:
            kinds[target] = kind
    return kinds


_FUNCTION_KINDS = _function_kinds()
_METHOD_KINDS = {
    **dict.fromkeys((
        "add", "sub", "mul", "div", "true_divide", "pow", "neg", "abs", "exp", "log", "sqrt", "rsqrt",
        "tanh", "sigmoid", "erf", "relu", "square", "reciprocal", "clamp", "clip", "masked_fill", "sin",
        "cos", "sign", "lerp", "eq", "ne", "lt", "le", "gt", "ge", "logical_not", "logical_and",
        "logical_or", "bool", "int", "long", "float", "half", "bfloat16", "double", "contiguous", "clone",
        "detach", "add_", "sub_", "mul_", "div_", "masked_fill_", "clamp_", "pow_", "neg_", "exp_",
        "tanh_", "sigmoid_", "relu_", "copy_", "fill_", "zero_", "requires_grad_", "nan_to_num",
    ), "elementwise"),
    **dict.fromkeys(("to", "type", "type_as", "cpu", "cuda"), "cast"),
    **dict.fromkeys(("softmax", "log_softmax"), "softmax"),
    **dict.fromkeys(("mean", "sum", "amax", "amin", "logsumexp", "prod", "var", "std", "norm"), "reduce"),
    **dict.fromkeys(("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
                     "reshape_as"), "reshape"),
    **dict.fromkeys(("expand", "expand_as", "broadcast_to"), "expand"),
    "repeat": "repeat",
    **dict.fromkeys(("transpose", "swapaxes", "swapdims", "permute", "t", "movedim", "moveaxis"), "transpose"),
    **dict.fromkeys(("split", "chunk", "tensor_split", "split_with_sizes", "unbind"), "split"),
    **dict.fromkeys(("narrow", "select"), "narrow"),
    **dict.fromkeys(("matmul", "mm", "bmm"), "matmul"),
    **dict.fromkeys(("size", "dim", "numel", "ndimension", "nelement", "get_device", "is_contiguous",
                     "is_floating_point", "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor",
                     "stride"), "neutral"),
}
# Where the `dim` argument of a reduction or split sits when it is passed positionally.
_DIM_POSITION = {"norm": 2, "linalg_vector_norm": 2, "unbind": 1}


def _op_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _argument(node: fx.Node, position: int, name: str, default: Any = None) -> Any:
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def _tensor_nodes(value: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return found


@dataclass
class _Candidate:
    node: str
    name: str
    input: str
    weight_node: fx.Node
    transposed: bool
    shape: tuple[int, int]   # (out_features, in_features)
    dtype: torch.dtype
    problem: str | None      # why it cannot be rewritten, whatever the config says
    stored: bool = False


class _ChannelTracer:
    def __init__(self, parameters: dict[str, str]):
        self.parameters = parameters
        self.graph = nx.Graph()
        self.blocked: dict[Key, list[str]] = {}
        self.blockers: dict[str, str] = {}
        self.dims: dict[fx.Node, Any] = {}
        self.candidates: list[_Candidate] = []
        self.autocast_depth = 0
        self.handlers: dict[str, Callable[[fx.Node], Any]] = {
            "elementwise": self._elementwise, "cast": self._first, "like": self._first,
            "softmax": self._first, "reduce": self._reduce, "reshape": self._reshape,
            "expand": self._expand, "repeat": self._repeat, "transpose": self._transpose,
            "split": self._split, "narrow": self._narrow, "cat": self._cat, "stack": self._stack,
            "getitem": self._getitem, "linear": self._linear, "stored": self._stored, "addmm": self._addmm,
            "matmul": self._matmul,
            "embedding": self._embedding, "norm": self._norm, "batch_norm": self._batch_norm,
            "conv": self._conv, "neutral": self._neutral,
        }

    # -- bookkeeping --------------------------------------------------------------------------------

    def _link(self, a: Key, b: Key) -> None:
        if a != b:
            self.graph.add_edge(a, b)

    def _block(self, key: Key, node: fx.Node, reason: str) -> None:
        self.blocked.setdefault(key, []).append(f"{node.name}: {reason}")
        self.blockers.setdefault(node.name, reason)

    def _block_all(self, value: Any, node: fx.Node, reason: str) -> None:
        if isinstance(value, list):
            for item in value:
                self._block_all(item, node, reason)
        elif isinstance(value, tuple):
            for dim in value:
                if _is_key(dim):
                    self._block(dim, node, reason)

    def _unify(self, a: Any, b: Any, node: fx.Node, reason: str) -> Any:
        """Two dimensions that must carry the same channels; returns the shared one."""
        if _is_key(a) and _is_key(b):
            self._link(a, b)
            return a
        if _is_key(a) or _is_key(b):
            key, other = (a, b) if _is_key(a) else (b, a)
            self._block(key, node, f"{reason} ({other.reason})" if isinstance(other, Opaque) else reason)
            return other
        return a if a is not None else b

    def _dims(self, arg: Any) -> Any:
        return self.dims.get(arg) if isinstance(arg, fx.Node) else None

    def _opaque(self, shape: Any, reason: str) -> Any:
        if isinstance(shape, list):
            return [self._opaque(item, reason) for item in shape]
        if isinstance(shape, tuple):
            return tuple(Opaque(reason) for _ in shape)
        return None

    # -- the walk -----------------------------------------------------------------------------------

    def visit(self, node: fx.Node) -> None:
        shape = _shape(_example(node))
        if node.op in ("placeholder", "get_attr"):
            if node.name in self.parameters and isinstance(shape, tuple):
                name = self.parameters[node.name]
                self.dims[node] = tuple(Opaque("size 1") if _is_one(size) else ("p", name, d)
                                        for d, size in enumerate(shape))
                for key in self.dims[node]:
                    if _is_key(key):
                        self.graph.add_node(key, size=shape[key[2]])
            else:
                self.dims[node] = self._opaque(shape, "a graph input")
            return
        if node.op == "output":
            for arg in _tensor_nodes(node.args):
                self._block_all(self._dims(arg), node, "graph output: keeping its order would need a runtime permute")
            return
        if node.op == "call_function":
            kind = _FUNCTION_KINDS.get(node.target)
        elif node.op == "call_method":
            kind = _METHOD_KINDS.get(node.target)
        else:
            kind = None
        if node.target is torch.amp.autocast_mode._enter_autocast:
            self.autocast_depth += 1
        elif node.target is torch.amp.autocast_mode._exit_autocast:
            self.autocast_depth -= 1
        handler = self.handlers.get(kind, self._unknown)
        try:
            self.dims[node] = handler(node)
        except Exception as error:  # an argument pattern the rule does not cover: stay safe, block
            self.dims[node] = self._unknown(node, f"could not be analysed ({type(error).__name__}: {error})")
        if self.dims[node] is None and shape is not None:
            self.dims[node] = self._opaque(shape, f"output of {_op_name(node)}")

    def _unknown(self, node: fx.Node, why: str = "is not known to pass a channel permutation through") -> Any:
        reason = f"{_op_name(node)} {why}"
        for arg in _tensor_nodes((node.args, node.kwargs)):
            self._block_all(self._dims(arg), node, reason)
        return None

    def _neutral(self, node: fx.Node) -> Any:
        return None

    def _first(self, node: fx.Node) -> Any:
        return self._dims(node.args[0])

    def _broadcast(self, node: fx.Node, operands: list[fx.Node]) -> Any:
        """Elementwise over broadcast operands: the non-broadcast dimensions at each position align."""
        shapes = [_shape(_example(arg)) for arg in operands]
        pairs = [(self._dims(arg), shape) for arg, shape in zip(operands, shapes) if isinstance(shape, tuple)]
        out_shape = _shape(_example(node))
        if not isinstance(out_shape, tuple):
            return None
        out = []
        for position in range(-len(out_shape), 0):
            dims = [dims[position] for dims, shape in pairs
                    if len(shape) >= -position and not _is_one(shape[position]) and dims is not None]
            merged = None
            for dim in dims:
                merged = dim if merged is None else self._unify(merged, dim, node, f"{_op_name(node)} combines it with")
            out.append(merged if merged is not None else Opaque("broadcast"))
        return tuple(out)

    def _elementwise(self, node: fx.Node) -> Any:
        if node.target is torch.where and len(node.args) + len(node.kwargs) < 3:
            return self._unknown(node)
        return self._broadcast(node, _tensor_nodes((node.args, node.kwargs)))

    def _reduce(self, node: fx.Node) -> Any:
        dims = self._dims(node.args[0])
        position = _DIM_POSITION.get(_op_name(node), 1)
        reduced = _argument(node, position, "dim")
        if isinstance(reduced, bool):  # x.var(unbiased)
            reduced = None
        ndim = len(dims)
        if reduced is None or reduced == []:
            reduced = range(ndim)
        reduced = {d % ndim for d in ((reduced,) if isinstance(reduced, int) else reduced)}
        keepdim = len(_shape(_example(node)) or ()) == ndim
        out = []
        for d, dim in enumerate(dims):
            if d not in reduced:
                out.append(dim)
            elif keepdim:
                out.append(Opaque("reduced"))
        return tuple(out)

    def _reshape(self, node: fx.Node) -> Any:
        """A reshape keeps dimension d whole iff some output dimension has its size and the same
        number of elements after it (row-major order); otherwise it splits or merges it."""
        dims = self._dims(node.args[0])
        in_shape, out_shape = _shape(_example(node.args[0])), _shape(_example(node))
        out: list[Any] = [Opaque(f"{_op_name(node)} regroups the dimensions")] * len(out_shape)
        for d, dim in enumerate(dims):
            if not _is_key(dim):
                continue
            after = math.prod(in_shape[d + 1:])
            for e, size in enumerate(out_shape):
                if _same(size, in_shape[d]) and _same(math.prod(out_shape[e + 1:]), after) and not _is_key(out[e]):
                    out[e] = dim
                    break
            else:
                self._block(dim, node, f"{_op_name(node)} splits or merges these channels (e.g. into attention heads)")
        return tuple(out)

    def _expand(self, node: fx.Node) -> Any:
        dims, in_shape = self._dims(node.args[0]), _shape(_example(node.args[0]))
        out_shape = _shape(_example(node))
        lead = len(out_shape) - len(in_shape)
        return tuple(Opaque("expanded") if e < lead or _is_one(in_shape[e - lead]) else dims[e - lead]
                     for e in range(len(out_shape)))

    def _repeat(self, node: fx.Node) -> Any:
        dims, in_shape = self._dims(node.args[0]), _shape(_example(node.args[0]))
        out_shape = _shape(_example(node))
        lead = len(out_shape) - len(in_shape)
        out = []
        for e, size in enumerate(out_shape):
            dim = dims[e - lead] if e >= lead else Opaque("repeated")
            if e >= lead and not _same(size, in_shape[e - lead]):
                if _is_key(dim):
                    self._block(dim, node, "repeat tiles these channels")
                dim = Opaque("repeated")
            out.append(dim)
        return tuple(out)

    def _transpose(self, node: fx.Node) -> Any:
        """Any pure reordering of dimensions: apply it to a meta tensor whose strides name the dims."""
        dims = self._dims(node.args[0])
        probe = torch.empty_strided((1,) * len(dims), tuple(range(1, len(dims) + 1)), device="meta")
        args = [probe, *node.args[1:]]
        moved = getattr(probe, node.target)(*args[1:], **node.kwargs) if isinstance(node.target, str) \
            else node.target(*args, **node.kwargs)
        return tuple(dims[stride - 1] for stride in moved.stride())

    def _split(self, node: fx.Node) -> Any:
        dims = self._dims(node.args[0])
        name = _op_name(node)
        along = _argument(node, _DIM_POSITION.get(name, 2), "dim", 0) % len(dims)
        if _is_key(dims[along]):
            self._block(dims[along], node, f"{name} cuts these channels apart")
        pieces = _shape(_example(node))
        if name == "unbind":
            piece = dims[:along] + dims[along + 1:]
        else:
            piece = dims[:along] + (Opaque("split"),) + dims[along + 1:]
        return [piece for _ in pieces]

    def _narrow(self, node: fx.Node) -> Any:
        dims = self._dims(node.args[0])
        along = _argument(node, 1, "dim") % len(dims)
        if _is_key(dims[along]):
            self._block(dims[along], node, f"{_op_name(node)} picks some of these channels")
        if _op_name(node) == "select":
            return dims[:along] + dims[along + 1:]
        return dims[:along] + (Opaque("narrowed"),) + dims[along + 1:]

    def _cat(self, node: fx.Node) -> Any:
        tensors = _argument(node, 0, "tensors")
        ndim = len(_shape(_example(node)))
        along = _argument(node, 1, "dim", node.kwargs.get("axis", 0)) % ndim
        tensors = [arg for arg in tensors if len(_shape(_example(arg))) == ndim]  # legacy empty inputs drop out
        for arg in tensors:
            if _is_key(self._dims(arg)[along]):
                self._block(self._dims(arg)[along], node, "concatenation along these channels")
        out = self._align(node, tensors, "concatenation combines it with", skip=along)
        return out[:along] + (Opaque("concatenated"),) + out[along + 1:]

    def _stack(self, node: fx.Node) -> Any:
        tensors = _argument(node, 0, "tensors")
        along = _argument(node, 1, "dim", 0) % len(_shape(_example(node)))
        out = self._align(node, tensors, "stack combines it with")
        return out[:along] + (Opaque("stacked"),) + out[along:]

    def _align(self, node: fx.Node, tensors: list[fx.Node], reason: str, skip: int | None = None) -> tuple:
        """Dimensions of equally shaped tensors that end up in one output dimension, position by position."""
        out = list(self._dims(tensors[0]))
        for arg in tensors[1:]:
            for d, dim in enumerate(self._dims(arg)):
                if d != skip:
                    out[d] = self._unify(out[d], dim, node, reason)
        return tuple(out)

    def _getitem(self, node: fx.Node) -> Any:
        source, index = node.args
        dims = self._dims(source)
        if isinstance(dims, list):
            return dims[index] if isinstance(index, int) else None
        if not isinstance(dims, tuple):
            return None
        index = index if isinstance(index, tuple) else (index,)
        if any(isinstance(item, (fx.Node, torch.Tensor, list)) for item in index):
            return self._unknown(node)  # advanced indexing
        if Ellipsis in index:
            at = index.index(Ellipsis)
            fill = len(dims) - sum(item is not None for item in index if item is not Ellipsis)
            index = index[:at] + (slice(None),) * fill + index[at + 1:]
        index = index + (slice(None),) * (len(dims) - sum(item is not None for item in index))
        out, d = [], 0
        for item in index:
            if item is None:
                out.append(Opaque("new axis"))
                continue
            dim = dims[d]
            d += 1
            whole = isinstance(item, slice) and item == slice(None)
            if _is_key(dim) and not whole:
                self._block(dim, node, "indexing picks some of these channels")
                dim = Opaque("indexed")
            if not isinstance(item, int) and not isinstance(item, torch.SymInt):
                out.append(dim)
        return tuple(out)

    # -- absorbers ----------------------------------------------------------------------------------

    def _weight_of(self, node: fx.Node, x: fx.Node, weight: Any, transposed: bool, problem: str | None) -> None:
        shape = _shape(_example(weight)) if isinstance(weight, fx.Node) else None
        if not isinstance(shape, tuple) or len(shape) != 2:
            return
        stack = node.meta.get("nn_module_stack") or {}
        innermost = list(stack.values())[-1] if stack else None
        is_linear_module = innermost is not None and isinstance(innermost[1], type) and (
            issubclass(innermost[1], torch.nn.Linear) or innermost[1].__name__ == "Conv1D")
        weight_name = self.parameters.get(weight.name)
        if is_linear_module:
            name = module_path(innermost[0])
        elif weight_name is not None:
            name = weight_name.removesuffix(".weight")
        else:
            name = node.name
        if weight_name is None:
            problem = problem or "its weight is computed in the graph, not a parameter"
        elif self.autocast_depth:
            problem = problem or "it runs under autocast, so its input dtype is only known at run time"
        out_features, in_features = (shape[1], shape[0]) if transposed else shape
        example = _example(weight)
        self.candidates.append(_Candidate(node.name, name, x.name, weight, transposed, (out_features, in_features),
                                          example.dtype, problem))

    def _linear(self, node: fx.Node) -> Any:
        x, weight = node.args[0], node.args[1]
        bias = _argument(node, 2, "bias")
        x_dims, w_dims = self._dims(x), self._dims(weight)
        if x_dims is None or w_dims is None or len(w_dims) != 2:
            return self._unknown(node)
        self._unify(x_dims[-1], w_dims[1], node, "linear input is not a channel space")
        out = x_dims[:-1] + (w_dims[0],)
        if bias is not None:
            self._unify(w_dims[0], self._dims(bias)[0], node, "linear bias")
        self._weight_of(node, x, weight, transposed=False, problem=None)
        return out

    def _stored(self, node: fx.Node) -> Any:
        """A vnm.linear already in the graph: its compressed weight cannot be permuted, so its input and
        output keep their order; it is a site the sparsify stage takes over as it is."""
        x, values, rows, in_features = node.args[0], node.args[1], _shape(_example(node.args[1]))[0], node.args[7]
        self._unknown(node, "is a stored V:N:M weight, whose channels keep their order")
        stack = node.meta.get("nn_module_stack") or {}
        values_name = self.parameters.get(values.name, node.name)
        name = module_path(list(stack.values())[-1][0]) if stack else values_name.removesuffix(".values")
        self.candidates.append(_Candidate(node.name, name, x.name, values, False, (rows, in_features),
                                          _example(values).dtype, None, stored=True))
        return None

    def _addmm(self, node: fx.Node) -> Any:
        bias, x, weight = node.args[:3]
        x_dims, w_dims = self._dims(x), self._dims(weight)
        if x_dims is None or w_dims is None or len(w_dims) != 2:
            return self._unknown(node)
        self._unify(x_dims[-1], w_dims[0], node, "linear input is not a channel space")
        scaled = node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1
        bias_shape = _shape(_example(bias)) if isinstance(bias, fx.Node) else None
        problem = "addmm with alpha/beta or a bias that is not a vector" if scaled or not (
            isinstance(bias_shape, tuple) and len(bias_shape) == 1) else None
        out = self._broadcast_with(node, bias, (x_dims[0], w_dims[1]))
        self._weight_of(node, x, weight, transposed=True, problem=problem)
        return out

    def _broadcast_with(self, node: fx.Node, bias: Any, product: tuple) -> Any:
        bias_dims = self._dims(bias)
        if bias_dims is None:
            return product
        bias_shape = _shape(_example(bias))
        out = list(product)
        for position in range(-len(bias_dims), 0):
            if not _is_one(bias_shape[position]):
                out[position] = self._unify(out[position], bias_dims[position], node, "bias")
        return tuple(out)

    def _matmul(self, node: fx.Node) -> Any:
        a, b = node.args[:2]
        a_dims, b_dims = self._dims(a), self._dims(b)
        if a_dims is None or b_dims is None or len(a_dims) < 2 or len(b_dims) < 2:
            return self._unknown(node)
        self._unify(a_dims[-1], b_dims[-2], node, "matmul contracts it with")
        if len(b_dims) == 2 and b.name in self.parameters:
            self._weight_of(node, a, b, transposed=True, problem=None)
        batch = self._broadcast_dims(node, a_dims[:-2], b_dims[:-2], _shape(_example(a))[:-2], _shape(_example(b))[:-2])
        return batch + (a_dims[-2], b_dims[-1])

    def _broadcast_dims(self, node, a_dims, b_dims, a_shape, b_shape) -> tuple:
        out = []
        for position in range(-max(len(a_dims), len(b_dims)), 0):
            found = [dims[position] for dims, shape in ((a_dims, a_shape), (b_dims, b_shape))
                     if len(dims) >= -position and not _is_one(shape[position])]
            merged = found[0] if found else Opaque("broadcast")
            for dim in found[1:]:
                merged = self._unify(merged, dim, node, "batched matmul combines it with")
            out.append(merged)
        return tuple(out)

    def _embedding(self, node: fx.Node) -> Any:
        ids, weight = node.args[:2]
        ids_dims, w_dims = self._dims(ids), self._dims(weight)
        if w_dims is None or len(w_dims) != 2 or _argument(node, 3, "max_norm") is not None:
            return self._unknown(node)
        if _is_key(w_dims[0]):
            self._block(w_dims[0], node, "embedding rows are looked up by token id")
        self._block_all(ids_dims, node, "used as embedding indices")
        return tuple(Opaque("token") for _ in ids_dims) + (w_dims[1],)

    def _norm(self, node: fx.Node) -> Any:
        """layer_norm(x, shape, weight, bias) and rms_norm(x, shape, weight): statistics over the last
        dims are order-free; weight and bias scale those dims channel by channel."""
        x_dims = self._dims(node.args[0])
        normalized = _argument(node, 1, "normalized_shape")
        count = 1 if isinstance(normalized, int) else len(normalized)
        is_rms = _op_name(node) == "rms_norm"
        params = [_argument(node, 2, "weight")] + ([] if is_rms else [_argument(node, 3, "bias")])
        for param in params:
            param_dims = self._dims(param)
            if param_dims is None:
                continue
            for i in range(count):
                param_shape = _shape(_example(param))
                if not _is_one(param_shape[i]):
                    self._unify(x_dims[len(x_dims) - count + i], param_dims[i], node, "norm weight")
        return x_dims

    def _batch_norm(self, node: fx.Node) -> Any:
        x_dims = self._dims(node.args[0])
        for position, name in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")):
            param_dims = self._dims(_argument(node, position, name))
            if param_dims:
                self._unify(x_dims[1], param_dims[0], node, "batch norm statistics")
        return x_dims

    def _conv(self, node: fx.Node) -> Any:
        x, weight = node.args[:2]
        bias = _argument(node, 2, "bias")
        x_dims, w_dims = self._dims(x), self._dims(weight)
        if x_dims is None or w_dims is None or _argument(node, 6, "groups", 1) != 1:
            return self._unknown(node)
        self._unify(x_dims[1], w_dims[1], node, "convolution input is not a channel space")
        for dim in x_dims[2:]:
            if _is_key(dim):
                self._block(dim, node, "convolution slides over this dimension")
        for dim in w_dims[2:]:
            if _is_key(dim):
                self._block(dim, node, "convolution kernel window")
        if bias is not None:
            self._unify(w_dims[0], self._dims(bias)[0], node, "convolution bias")
        spatial = tuple(Opaque("convolved") for _ in x_dims[2:])
        return (x_dims[0], w_dims[0]) + spatial

    # -- the result ---------------------------------------------------------------------------------

    def result(self, config: VNMConfig, extra_skips: dict[str, str]) -> Discovery:
        component_of: dict[Key, int] = {}
        components = list(nx.connected_components(self.graph))
        for index, component in enumerate(components):
            for key in component:
                component_of[key] = index
        group_of_component: dict[int, int] = {}
        groups: dict[int, Group] = {}
        linears: dict[str, LinearSite] = {}
        for candidate in self.candidates:
            weight_name = self.parameters.get(candidate.weight_node.name)
            site = LinearSite(candidate.node, candidate.name, candidate.input, weight_name or "", candidate.transposed,
                              *candidate.shape, skip_reason=self._skip_reason(candidate, config, extra_skips),
                              stored=candidate.stored)
            linears[site.node] = site
            if weight_name is None:
                continue
            in_dim, out_dim = (0, 1) if candidate.transposed else (1, 0)
            for dim, role in ((in_dim, "readers"), (out_dim, "writers")):
                key = ("p", weight_name, dim)
                if key not in component_of:
                    continue
                component = component_of[key]
                if component not in group_of_component:
                    group_id = len(groups)
                    group_of_component[component] = group_id
                    groups[group_id] = self._group(group_id, components[component])
                group = groups[group_of_component[component]]
                getattr(group, role).append(site.node)
                if role == "readers":
                    site.in_group = group.id
                else:
                    site.out_group = group.id
        parameter_groups = {(key[1], key[2]): group_of_component[component_of[key]]
                            for key in component_of if component_of[key] in group_of_component}

        def group_ids(dims: Any) -> Any:
            if isinstance(dims, list):
                return [group_ids(item) for item in dims]
            if isinstance(dims, tuple):
                return tuple(group_of_component.get(component_of[d]) if _is_key(d) else None for d in dims)
            return None

        value_groups = {node.name: group_ids(dims) for node, dims in self.dims.items()}
        blockers = dict(self.blockers)
        blockers.update({site.node: site.skip_reason for site in linears.values() if site.skip_reason})
        return Discovery(linears, groups, parameter_groups, value_groups, blockers)

    def _group(self, group_id: int, component: set) -> Group:
        keys = sorted(component)
        sizes = {self.graph.nodes[key]["size"] for key in keys}
        reasons = [reason for key in keys for reason in self.blocked.get(key, [])]
        if len(sizes) != 1:
            reasons.append(f"dimensions of different sizes {sorted(sizes)} meet")
        return Group(group_id, min(sizes), dims=[(key[1], key[2]) for key in keys], blocked_by=sorted(set(reasons)))

    def _skip_reason(self, candidate: _Candidate, config: VNMConfig, extra_skips: dict[str, str]) -> str | None:
        if candidate.stored:
            return None
        if any(other.stored for other in self.candidates):
            return "the model holds stored V:N:M layers (it was compressed already): its dense linears stay dense"
        return candidate.problem or skip_reason(candidate.name, *candidate.shape, candidate.dtype, config, extra_skips)
