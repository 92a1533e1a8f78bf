"""Decode graph: a step graph (model.onnx or a variant) and app/sampling.py's sampler in one
ONNX graph that advances every row K characters per call, so only ids leave onnxruntime.

    ids (B,) int32, states (B, U)..., temperature (B,) float32, top_k (B,) int64,
    top_p (B,) float32, uniforms (B, K) float64
      -> next_ids (B, K) int32, states (B, U)... [, chosen_prob (B, K), top_ids (B, K, 5),
         top_probs (B, K, 5)]

Step j feeds ids_j (ids for j = 0, else the id sampled at step j - 1) through a copy of the step
graph (the copies share its weights) and samples ids_{j+1} from the logits with uniforms[:, j].
The sampler is app.sampling.sample_next written in ONNX ops, in float64 as the host computes:
temperature 0 is the float32 argmax; otherwise softmax(logits / T) with top-k (0 = off) and
top-p (1 = off; the smallest prefix by descending probability whose mass reaches top_p, always
>= 1 id) applied on the probabilities sorted by TopK (ties: lower id first, as the host's stable
argsort), then the inverse CDF: the count of cumsum(probs) <= u * total, the likeliest kept id
when rounding puts the target past the end. Divisions, cumulative sums and comparisons are
IEEE-exact and sequential on both sides; exp and the normalising sum may differ in the last bit
from numpy's, which can move a draw only when u * total lies within ~1e-16 of a CDF step.
As on the host, work no row needs is skipped (If nodes): the sort when no row filters, all of
the float64 arithmetic when every row is greedy.

The graph holds no weights of its own: every large initializer is stored as external data
pointing at its bytes inside the source graph file (`source` in model.json, with its sha256),
so a decode graph adds tens of kilobytes to a model folder instead of another copy of the
weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from app.artifact import DecodeGraphSpec, ModelMetadata

TOP_ALTERNATIVES = 5  # app.engine.TOP_ALTERNATIVES: the `details` option's alternatives
MIN_EXTERNAL_BYTES = 1024  # smaller initializers (shapes, axes) stay inline
MIN_OPSET = 13  # Unsqueeze/Squeeze/ReduceSum with axes as inputs


class DecodeGraphError(ValueError):
    """A step graph the decode graph cannot be built from."""


class _Builder:
    """Nodes and constants of the graph under construction, with unique tensor names."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"dec/{hint}_{self._n}"

    def const(self, hint: str, value: Any, dtype: Any) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, outputs: int = 1,
           **attrs: Any) -> Any:
        from onnx import helper

        names = [self.name(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=names[0], **attrs))
        return names[0] if outputs == 1 else names

    def any(self, x: str, hint: str) -> str:
        """A bool tensor -> one bool, True when any element is (the condition of an If)."""
        from onnx import TensorProto

        as_int = self.op("Cast", [x], to=TensorProto.INT64)
        return str(self.op("Cast", [self.op("ReduceMax", [as_int], keepdims=0)], hint,
                           to=TensorProto.BOOL))

    def cond(self, condition: str, then: Callable[[], str], otherwise: Callable[[], str],
             elem_type: int, hint: str) -> str:
        """An If node whose branches are built by `then` / `otherwise` (each returns the name of
        its result). Branch constants go to the main graph, which a branch may read."""
        from onnx import helper

        branches = []
        for build in (then, otherwise):
            outer, self.nodes = self.nodes, []
            result = build()
            out = self.name(f"{hint}_branch")  # produced inside the branch, as If requires
            self.nodes.append(helper.make_node("Identity", [result], [out], name=out))
            branches.append(helper.make_graph(self.nodes, out, [], [
                helper.make_tensor_value_info(out, elem_type, None)]))
            self.nodes = outer
        return str(self.op("If", [condition], hint, then_branch=branches[0],
                           else_branch=branches[1]))

    def reduce(self, op_type: str, x: str, axis: int, keepdims: int) -> str:
        """ReduceMax takes axes as an attribute before opset 18, ReduceSum before opset 13."""
        if op_type == "ReduceMax" and self.opset < 18:
            return str(self.op(op_type, [x], axes=[axis], keepdims=keepdims))
        return str(self.op(op_type, [x, self.const("axes", [axis], np.int64)],
                           keepdims=keepdims))


class _RowParams:
    """Per-row sampling parameters prepared once per call, shared by the K steps."""

    def __init__(self, b: _Builder, spec: DecodeGraphSpec, vocab: int) -> None:
        from onnx import TensorProto

        axis1 = b.const("axis1", [1], np.int64)
        temperature = spec.temperature_input
        self.sampled = b.op("Greater", [temperature, b.const("zero", 0.0, np.float32)],
                            "sampled")  # (B,) bool: temperature 0 rows are greedy
        # Greedy rows divide by 1, as the host does, so no row sees inf or NaN.
        t = b.op("Where", [self.sampled, temperature, b.const("one", 1.0, np.float32)])
        self.t64 = b.op("Unsqueeze", [b.op("Cast", [t], to=TensorProto.DOUBLE), axis1],
                        "t64")  # (B, 1)
        top_k = spec.top_k_input
        v64 = b.const("vocab", vocab, np.int64)
        filtering = b.op("And", [b.op("Greater", [top_k, b.const("zero", 0, np.int64)]),
                                 b.op("Less", [top_k, v64])])
        k = b.op("Unsqueeze", [b.op("Where", [filtering, top_k, v64]), axis1], "k")  # (B, 1)
        rank = b.const("rank", np.arange(vocab)[None, :], np.int64)  # (1, V)
        self.keep_rank = b.op("Less", [rank, k], "keep_rank")  # (B, V) bool, in sorted order
        # The likeliest id is always kept, as on the host: a top_p below float32's range
        # arrives as 0, and mass_before < 0 would keep nothing.
        self.first = b.op("Equal", [rank, b.const("zero", 0, np.int64)], "first")  # (1, V)
        top_p = b.op("Unsqueeze", [spec.top_p_input, axis1])  # (B, 1) float32
        self.top_p64 = b.op("Cast", [top_p], "top_p64", to=TensorProto.DOUBLE)
        # top_p >= 1 keeps every id: the mass before the tail can round up to 1.0.
        self.p_off = b.op("GreaterOrEqual", [top_p, b.const("one", 1.0, np.float32)], "p_off")
        # As the host, skip work no row needs: the sort when no row filters, all sampling
        # arithmetic when every row is greedy (If nodes; on the CPU each op costs a few us).
        self.any_sampled = b.any(self.sampled, "any_sampled")
        self.any_filter = b.any(b.op("Or", [filtering, b.op("Less", [
            spec.top_p_input, b.const("one", 1.0, np.float32)])]), "any_filter")


def _sample(b: _Builder, logits: str, u: str, rows: _RowParams, vocab: int) -> str:
    """logits (B, V) float32, u (B, 1) float64 -> ids (B,) int64, as app.sampling.sample_next."""
    from onnx import TensorProto

    greedy = b.op("ArgMax", [logits], "greedy", axis=1, keepdims=0, select_last_index=0)

    def sampled() -> str:
        x = b.op("Div", [b.op("Cast", [logits], to=TensorProto.DOUBLE), rows.t64])  # (B, V)
        x = b.op("Sub", [x, b.reduce("ReduceMax", x, axis=1, keepdims=1)])
        p = b.op("Exp", [x], "p")  # (B, V) float64, unnormalised
        probs = b.cond(rows.any_filter, lambda: _filtered(b, p, rows, vocab), lambda: p,
                       TensorProto.DOUBLE, "probs")
        cdf = b.op("CumSum", [probs, b.const("axis", 1, np.int64)], "cdf")  # (B, V)
        total = b.op("Slice", [cdf, b.const("last", [vocab - 1], np.int64),
                               b.const("end", [vocab], np.int64),
                               b.const("axes", [1], np.int64)])  # (B, 1)
        target = b.op("Mul", [u, total], "target")  # (B, 1)
        below = b.op("Cast", [b.op("LessOrEqual", [cdf, target])], to=TensorProto.INT64)
        drawn = b.reduce("ReduceSum", below, axis=1, keepdims=0)  # (B,)
        # Past the end only when u * total rounds up to total: the likeliest kept id, as the
        # host does.
        fallback = b.op("ArgMax", [probs], axis=1, keepdims=0, select_last_index=0)
        drawn = b.op("Where", [b.op("Less", [drawn, b.const("vocab", vocab, np.int64)]),
                               drawn, fallback])
        return str(b.op("Where", [rows.sampled, drawn, greedy]))

    return b.cond(rows.any_sampled, sampled, lambda: str(greedy), TensorProto.INT64, "next")


def _filtered(b: _Builder, p: str, rows: _RowParams, vocab: int) -> str:
    """p (B, V) float64 with the ids outside each row's top-k and top-p set to 0."""
    sorted_p, order = b.op("TopK", [p, b.const("v", [vocab], np.int64)], "sorted", outputs=2,
                           axis=1, largest=1, sorted=1)  # descending, ties by lower id
    norm = b.op("Div", [sorted_p, b.reduce("ReduceSum", sorted_p, axis=1, keepdims=1)])
    before = b.op("Sub", [b.op("CumSum", [norm, b.const("axis", 1, np.int64)]), norm],
                  "mass_before")
    keep = b.op("And", [rows.keep_rank, b.op("Or", [
        rows.first, b.op("Or", [b.op("Less", [before, rows.top_p64]), rows.p_off])])])
    kept = b.op("Where", [keep, sorted_p, b.const("zero", 0.0, np.float64)])
    # `order` is a permutation, so the scatter overwrites every entry of p: kept, in id order.
    return str(b.op("ScatterElements", [p, order, kept], "filtered", axis=1))


def _details(b: _Builder, logits: str, chosen: str) -> tuple[str, str, str]:
    """The model's own distribution (temperature 1): chosen_prob (B, 1), top (B, 1, 5) x 2."""
    from onnx import TensorProto

    axis1 = b.const("axis1", [1], np.int64)
    probs = b.op("Softmax", [logits], "probs32", axis=1)  # (B, V) float32, as app.sampling
    prob = b.op("GatherElements", [probs, b.op("Unsqueeze", [chosen, axis1])], axis=1)
    top_p, top_i = b.op("TopK", [probs, b.const("k", [TOP_ALTERNATIVES], np.int64)], "top",
                        outputs=2, axis=1, largest=1, sorted=1)
    top_i = b.op("Cast", [top_i], to=TensorProto.INT32)
    return (prob, b.op("Unsqueeze", [top_i, axis1]), b.op("Unsqueeze", [top_p, axis1]))


def _step_copy(b: _Builder, step: Any, j: int, ids_2d: str, meta: ModelMetadata,
               states_in: list[str]) -> tuple[str, list[str]]:
    """Copy j of the step graph's nodes, names prefixed, weights shared: (logits, states)."""
    from onnx import GraphProto
    from onnx.compose import add_prefix_graph

    g = GraphProto()
    g.CopyFrom(step.graph)
    del g.initializer[:]  # shared: the decode graph holds them once, unprefixed
    del g.value_info[:]
    prefix = f"s{j}/"
    g = add_prefix_graph(g, prefix, rename_initializers=False)
    b.nodes.append(_identity(ids_2d, prefix + meta.onnx.ids_input))
    for src, spec in zip(states_in, meta.onnx.states, strict=True):
        b.nodes.append(_identity(src, prefix + spec.input))
    b.nodes.extend(g.node)
    return prefix + meta.onnx.logits_output, [prefix + s.output for s in meta.onnx.states]


def _identity(src: str, dst: str) -> Any:
    from onnx import helper

    return helper.make_node("Identity", [src], [dst], name=dst)


def build_decode_graph(step: Any, meta: ModelMetadata, spec: DecodeGraphSpec) -> Any:
    """The decode graph (onnx.ModelProto) for `step`, the step graph of `meta`'s model.
    Its initializers are still inline: `externalise_weights` points them at the source file."""
    from onnx import TensorProto, helper

    opset = next((o.version for o in step.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise DecodeGraphError(f"the step graph has opset {opset}; the decode graph needs "
                               f">= {MIN_OPSET}")
    vocab = len(meta.vocab)
    b = _Builder(opset)
    rows = _RowParams(b, spec, vocab)
    axis1 = b.const("axis1", [1], np.int64)
    ids = spec.ids_input  # (B,) int32: fed at step 0
    states = [s.input for s in meta.onnx.states]
    picked: list[str] = []
    details: list[tuple[str, str, str]] = []
    for j in range(spec.steps):
        logits, states = _step_copy(b, step, j, b.op("Unsqueeze", [ids, axis1], "ids_b1"),
                                    meta, states)
        logits = b.op("Squeeze", [logits, axis1], "logits")  # (B, 1, V) -> (B, V)
        u = b.op("Gather", [spec.uniforms_input, b.const("j", [j], np.int64)], "u",
                 axis=1)  # (B, 1) float64
        nxt = _sample(b, logits, u, rows, vocab)  # (B,) int64
        ids = b.op("Cast", [nxt], "ids", to=TensorProto.INT32)
        picked.append(b.op("Unsqueeze", [ids, axis1]))  # (B, 1)
        if spec.details:
            details.append(_details(b, logits, nxt))
    _concat(b, picked, spec.ids_output)
    out_info = [helper.make_tensor_value_info(spec.ids_output, TensorProto.INT32,
                                              ["batch", spec.steps])]
    for src, s in zip(states, meta.onnx.states, strict=True):
        b.nodes.append(_identity(src, s.output))
        out_info.append(helper.make_tensor_value_info(s.output, TensorProto.FLOAT,
                                                      ["batch", s.size]))
    if spec.details:
        detail_outputs: list[tuple[str, int, list[str | int]]] = [
            (spec.chosen_prob_output, TensorProto.FLOAT, ["batch", spec.steps]),
            (spec.top_ids_output, TensorProto.INT32, ["batch", spec.steps, TOP_ALTERNATIVES]),
            (spec.top_probs_output, TensorProto.FLOAT, ["batch", spec.steps, TOP_ALTERNATIVES]),
        ]
        for k, (name, dtype, shape) in enumerate(detail_outputs):
            _concat(b, [d[k] for d in details], name)
            out_info.append(helper.make_tensor_value_info(name, dtype, shape))
    in_info = [
        helper.make_tensor_value_info(spec.ids_input, TensorProto.INT32, ["batch"]),
        *(helper.make_tensor_value_info(s.input, TensorProto.FLOAT, ["batch", s.size])
          for s in meta.onnx.states),
        helper.make_tensor_value_info(spec.temperature_input, TensorProto.FLOAT, ["batch"]),
        helper.make_tensor_value_info(spec.top_k_input, TensorProto.INT64, ["batch"]),
        helper.make_tensor_value_info(spec.top_p_input, TensorProto.FLOAT, ["batch"]),
        helper.make_tensor_value_info(spec.uniforms_input, TensorProto.DOUBLE,
                                      ["batch", spec.steps]),
    ]
    graph = helper.make_graph(b.nodes, f"{meta.name}_decode_k{spec.steps}", in_info, out_info,
                              [*step.graph.initializer, *b.inits])
    model = helper.make_model(graph, opset_imports=list(step.opset_import),
                              producer_name="charlstm.training.decode_graph")
    model.ir_version = step.ir_version
    return model


def _concat(b: _Builder, parts: list[str], name: str) -> None:
    """Stack the K per-step outputs along axis 1 under the output's contract name."""
    from onnx import helper

    if len(parts) == 1:
        b.nodes.append(helper.make_node("Identity", parts, [name], name=name))
    else:
        b.nodes.append(helper.make_node("Concat", parts, [name], name=name, axis=1))


def externalise_weights(model: Any, source_bytes: bytes, source_file: str) -> int:
    """Point every large initializer at its identical bytes inside the source graph file (an
    ONNX file stores a raw tensor as one contiguous byte string); returns the bytes saved.
    Any occurrence of the same bytes holds the same values, so the first one found is used."""
    from onnx import TensorProto
    from onnx.external_data_helper import set_external_data

    saved = 0
    for tensor in model.graph.initializer:
        raw = tensor.raw_data
        if len(raw) < MIN_EXTERNAL_BYTES or tensor.data_location == TensorProto.EXTERNAL:
            continue
        offset = source_bytes.find(raw)
        if offset < 0:  # not a weight of the source graph (none of ours is this large)
            continue
        set_external_data(tensor, source_file, offset=offset, length=len(raw))
        tensor.ClearField("raw_data")
        saved += len(raw)
    return saved
