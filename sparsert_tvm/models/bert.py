"""A BERT encoder as ONNX with random weights: ``layers`` blocks of multi-head self-attention
and a GELU feed-forward network, each followed by a residual add and LayerNorm. The input is
the embedded sequence ``[batch, seq, hidden]`` (embeddings are a table lookup, not a sparse
product). BERT-base is the default: 12 layers, hidden 768, 12 heads, feed-forward 3072."""

from __future__ import annotations

import math

import numpy as np
import onnx

from .graph import GraphBuilder


def bert_encoder(rng, layers=12, hidden=768, heads=12, ffn=3072, seq=128, batch=1) -> onnx.ModelProto:
    if hidden % heads:
        raise ValueError("hidden must be a multiple of heads")
    g = GraphBuilder(rng)
    head = hidden // heads
    split = g.constant(np.array([batch, seq, heads, head], np.int64), "shape")
    merge = g.constant(np.array([batch, seq, hidden], np.int64), "shape")
    x = "x"
    for _ in range(layers):
        q, k, v = (
            g.node("Transpose", [g.node("Reshape", [g.linear(x, hidden, hidden), split])], perm=[0, 2, 1, 3])
            for _ in range(3)
        )
        scores = g.node("MatMul", [q, g.node("Transpose", [k], perm=[0, 1, 3, 2])])
        scores = g.node("Mul", [scores, g.constant(np.float32(1 / math.sqrt(head)))])
        context = g.node("MatMul", [g.node("Softmax", [scores], axis=-1), v])
        context = g.node("Reshape", [g.node("Transpose", [context], perm=[0, 2, 1, 3]), merge])
        x = _add_norm(g, x, g.linear(context, hidden, hidden, gain=0.5), hidden)
        h = _gelu(g, g.linear(x, hidden, ffn))
        x = _add_norm(g, x, g.linear(h, ffn, hidden, gain=0.5), hidden)
    return g.model((batch, seq, hidden), x, (batch, seq, hidden), "bert_encoder")


def _add_norm(g: GraphBuilder, x: str, branch: str, hidden: int) -> str:
    scale = g.constant(np.ones(hidden, np.float32), "gamma")
    shift = g.constant(np.zeros(hidden, np.float32), "beta")
    return g.node("LayerNormalization", [g.node("Add", [x, branch]), scale, shift], axis=-1, epsilon=1e-12)


def _gelu(g: GraphBuilder, x: str) -> str:
    """``x * (1 + erf(x / sqrt 2)) / 2`` (ONNX's Gelu operator needs opset 20)."""
    erf = g.node("Erf", [g.node("Div", [x, g.constant(np.float32(math.sqrt(2)))])])
    return g.node("Mul", [g.node("Mul", [x, g.node("Add", [erf, g.constant(np.float32(1))])]), g.constant(np.float32(0.5))])
