"""Unstructured magnitude pruning of an ONNX model's weight layers, so that users can try
the compiler on their own dense models."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper


@dataclass
class PrunedLayer:
    node: str
    op: str
    weight: str
    shape: tuple
    density: float  # after pruning
    pruned: bool
    why_not: str = ""


def prune_model(
    model: onnx.ModelProto,
    sparsity: float,
    *,
    first_conv: bool = False,
    depthwise: bool = False,
    classifier: bool = True,
    keep_scale: bool = False,
) -> tuple[onnx.ModelProto, list[PrunedLayer]]:
    """Zeroes the smallest ``sparsity`` fraction of each Conv / ConvTranspose / Gemm / MatMul
    weight, per layer.

    The first convolution and depthwise convolutions hold few weights that matter a lot and
    stay dense unless asked; ``classifier`` covers the Gemm / MatMul producing a graph output.
    ``keep_scale`` multiplies each pruned layer's kept weights back to the layer's original
    norm, as fine-tuning after pruning would: without it, a randomly initialised deep network
    loses a third to a half of its signal per pruned layer and ends up computing its biases.
    Returns the pruned copy and what was done to each layer.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    initializers = {init.name: init for init in model.graph.initializer}
    graph_inputs = {i.name for i in model.graph.input} - set(initializers)
    graph_outputs = {o.name for o in model.graph.output}
    layers = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        weight_name = node.input[1]
        if weight_name not in initializers:
            continue
        weight = numpy_helper.to_array(initializers[weight_name])
        why_not = _why_not(node, weight, graph_inputs, graph_outputs, first_conv, depthwise, classifier)
        if not why_not:
            pruned = magnitude_prune(weight, sparsity)
            if keep_scale and pruned.any():
                pruned *= np.linalg.norm(weight) / np.linalg.norm(pruned)
            weight = pruned
            initializers[weight_name].CopyFrom(numpy_helper.from_array(weight, weight_name))
        density = float(np.count_nonzero(weight)) / weight.size
        layers.append(PrunedLayer(node.name or weight_name, node.op_type, weight_name, weight.shape, density, not why_not, why_not))
    return model, layers


def magnitude_prune(weight: np.ndarray, sparsity: float) -> np.ndarray:
    """``weight`` with its ``sparsity`` fraction of smallest magnitudes set to zero."""
    keep = weight.size - int(round(sparsity * weight.size))
    if keep >= weight.size:
        return weight.copy()
    flat = np.abs(weight).reshape(-1)
    pruned = np.zeros_like(weight).reshape(-1)
    if keep > 0:
        largest = np.argpartition(flat, -keep)[-keep:]
        pruned[largest] = weight.reshape(-1)[largest]
    return pruned.reshape(weight.shape)


def _why_not(node, weight, graph_inputs, graph_outputs, first_conv, depthwise, classifier) -> str:
    if node.op_type in ("Conv", "ConvTranspose"):
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        group_inputs = weight.shape[1] if node.op_type == "Conv" else weight.shape[0] // group
        if group > 1 and group_inputs == 1 and not depthwise:
            return "depthwise (kept dense; --prune-depthwise)"
        if node.input[0] in graph_inputs and not first_conv:
            return "first convolution (kept dense; --prune-first-conv)"
    elif set(node.output) & graph_outputs and not classifier:
        return "classifier (kept dense; --prune-classifier)"
    return ""
