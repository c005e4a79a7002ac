"""Float32 TFLite flatbuffers written with the ``tflite`` package's builder functions, so
that the TFLite frontend is tested without TensorFlow. Layouts as TFLite has them: NHWC
activations, fully connected weights ``[out, in]``, convolution and transposed convolution
filters ``[out, kh, kw, in]``.
"""

from __future__ import annotations

import flatbuffers
import numpy as np
import tflite
from tflite.ActivationFunctionType import ActivationFunctionType
from tflite.BuiltinOperator import BuiltinOperator
from tflite.BuiltinOptions import BuiltinOptions
from tflite.Padding import Padding
from tflite.TensorType import TensorType


class TfliteModel:
    """Tensors and operators of one subgraph, serialised by ``build``."""

    def __init__(self):
        self.tensors: list[tuple[str, tuple, np.ndarray | None, str]] = []
        self.operators: list[tuple[int, list[int], list[int], str, dict]] = []

    def tensor(self, name: str, shape, data: np.ndarray | None = None, dtype: str = "float32") -> int:
        self.tensors.append((name, tuple(shape), None if data is None else np.ascontiguousarray(data, dtype), dtype))
        return len(self.tensors) - 1

    def fully_connected(self, x: int, weight: np.ndarray, bias: np.ndarray, out_shape, relu=False) -> int:
        w = self.tensor(f"w{len(self.tensors)}", weight.shape, weight)
        b = self.tensor(f"b{len(self.tensors)}", bias.shape, bias)
        y = self.tensor(f"fc{len(self.tensors)}", out_shape)
        self.operators.append((BuiltinOperator.FULLY_CONNECTED, [x, w, b], [y], "fc", {"relu": relu}))
        return y

    def conv_1x1(self, x: int, weight: np.ndarray, bias: np.ndarray, out_shape, relu=False) -> int:
        """``weight[out, in]`` as a 1x1 CONV_2D filter ``[out, 1, 1, in]``, stride 1, VALID."""
        w = self.tensor(f"w{len(self.tensors)}", (weight.shape[0], 1, 1, weight.shape[1]), weight)
        b = self.tensor(f"b{len(self.tensors)}", bias.shape, bias)
        y = self.tensor(f"conv{len(self.tensors)}", out_shape)
        self.operators.append((BuiltinOperator.CONV_2D, [x, w, b], [y], "conv", {"relu": relu}))
        return y

    def transpose_conv(self, x: int, weight: np.ndarray, bias: np.ndarray, out_shape, stride: int, same: bool) -> int:
        """TRANSPOSE_CONV of filter ``weight[out, kh, kw, in]`` to ``out_shape`` (NHWC, given
        as the op's int32 input, as TFLite does), SAME or VALID padding."""
        shape = self.tensor(f"shape{len(self.tensors)}", (4,), np.array(out_shape), "int32")
        w = self.tensor(f"w{len(self.tensors)}", weight.shape, weight)
        b = self.tensor(f"b{len(self.tensors)}", bias.shape, bias)
        y = self.tensor(f"deconv{len(self.tensors)}", out_shape)
        attrs = {"relu": False, "stride": stride, "same": same}
        self.operators.append((BuiltinOperator.TRANSPOSE_CONV, [shape, w, x, b], [y], "transpose_conv", attrs))
        return y

    def build(self, inputs: list[int], outputs: list[int]) -> bytes:
        b = flatbuffers.Builder(1024)
        # Buffer 0 is the empty buffer of every activation tensor.
        buffer_offsets = [self._buffer(b, None)] + [self._buffer(b, d) for _, _, d, _ in self.tensors if d is not None]
        tensor_offsets, next_buffer = [], 1
        for name, shape, data, dtype in self.tensors:
            buffer = 0
            if data is not None:
                buffer, next_buffer = next_buffer, next_buffer + 1
            tensor_offsets.append(self._tensor(b, name, shape, buffer, dtype))
        codes = sorted({op for op, *_ in self.operators})
        operator_offsets = [self._operator(b, codes.index(op), ins, outs, kind, attrs) for op, ins, outs, kind, attrs in self.operators]
        subgraph = self._subgraph(b, tensor_offsets, inputs, outputs, operator_offsets)
        code_offsets = []
        for code in codes:
            tflite.OperatorCodeStart(b)
            tflite.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))
            tflite.OperatorCodeAddBuiltinCode(b, code)
            tflite.OperatorCodeAddVersion(b, 1)
            code_offsets.append(tflite.OperatorCodeEnd(b))
        vectors = {
            "codes": _offsets(b, tflite.ModelStartOperatorCodesVector, code_offsets),
            "subgraphs": _offsets(b, tflite.ModelStartSubgraphsVector, [subgraph]),
            "buffers": _offsets(b, tflite.ModelStartBuffersVector, buffer_offsets),
        }
        description = b.CreateString("sparsert test model")
        tflite.ModelStart(b)
        tflite.ModelAddVersion(b, 3)
        tflite.ModelAddOperatorCodes(b, vectors["codes"])
        tflite.ModelAddSubgraphs(b, vectors["subgraphs"])
        tflite.ModelAddBuffers(b, vectors["buffers"])
        tflite.ModelAddDescription(b, description)
        b.Finish(tflite.ModelEnd(b), file_identifier=b"TFL3")
        return bytes(b.Output())

    @staticmethod
    def _buffer(b, data):
        vector = b.CreateNumpyVector(data.view(np.uint8).reshape(-1)) if data is not None else None
        tflite.BufferStart(b)
        if vector is not None:
            tflite.BufferAddData(b, vector)
        return tflite.BufferEnd(b)

    @staticmethod
    def _tensor(b, name, shape, buffer, dtype):
        shape_vector = _int_vector(b, shape)
        name_offset = b.CreateString(name)
        tflite.TensorStart(b)
        tflite.TensorAddShape(b, shape_vector)
        tflite.TensorAddType(b, TensorType.INT32 if dtype == "int32" else TensorType.FLOAT32)
        tflite.TensorAddBuffer(b, buffer)
        tflite.TensorAddName(b, name_offset)
        return tflite.TensorEnd(b)

    @staticmethod
    def _operator(b, code_index, inputs, outputs, kind, attrs):
        activation = ActivationFunctionType.RELU if attrs["relu"] else ActivationFunctionType.NONE
        if kind == "fc":
            tflite.FullyConnectedOptionsStart(b)
            tflite.FullyConnectedOptionsAddFusedActivationFunction(b, activation)
            options, options_type = tflite.FullyConnectedOptionsEnd(b), BuiltinOptions.FullyConnectedOptions
        elif kind == "transpose_conv":
            tflite.TransposeConvOptionsStart(b)
            tflite.TransposeConvOptionsAddPadding(b, Padding.SAME if attrs["same"] else Padding.VALID)
            tflite.TransposeConvOptionsAddStrideW(b, attrs["stride"])
            tflite.TransposeConvOptionsAddStrideH(b, attrs["stride"])
            options, options_type = tflite.TransposeConvOptionsEnd(b), BuiltinOptions.TransposeConvOptions
        else:
            tflite.Conv2DOptionsStart(b)
            tflite.Conv2DOptionsAddPadding(b, Padding.VALID)
            tflite.Conv2DOptionsAddStrideW(b, 1)
            tflite.Conv2DOptionsAddStrideH(b, 1)
            tflite.Conv2DOptionsAddDilationWFactor(b, 1)
            tflite.Conv2DOptionsAddDilationHFactor(b, 1)
            tflite.Conv2DOptionsAddFusedActivationFunction(b, activation)
            options, options_type = tflite.Conv2DOptionsEnd(b), BuiltinOptions.Conv2DOptions
        in_vector, out_vector = _int_vector(b, inputs), _int_vector(b, outputs)
        tflite.OperatorStart(b)
        tflite.OperatorAddOpcodeIndex(b, code_index)
        tflite.OperatorAddInputs(b, in_vector)
        tflite.OperatorAddOutputs(b, out_vector)
        tflite.OperatorAddBuiltinOptionsType(b, options_type)
        tflite.OperatorAddBuiltinOptions(b, options)
        return tflite.OperatorEnd(b)

    @staticmethod
    def _subgraph(b, tensors, inputs, outputs, operators):
        tensor_vector = _offsets(b, tflite.SubGraphStartTensorsVector, tensors)
        operator_vector = _offsets(b, tflite.SubGraphStartOperatorsVector, operators)
        in_vector, out_vector = _int_vector(b, inputs), _int_vector(b, outputs)
        name = b.CreateString("main")
        tflite.SubGraphStart(b)
        tflite.SubGraphAddTensors(b, tensor_vector)
        tflite.SubGraphAddInputs(b, in_vector)
        tflite.SubGraphAddOutputs(b, out_vector)
        tflite.SubGraphAddOperators(b, operator_vector)
        tflite.SubGraphAddName(b, name)
        return tflite.SubGraphEnd(b)


def _offsets(b, start, offsets):
    start(b, len(offsets))
    for offset in reversed(offsets):
        b.PrependUOffsetTRelative(offset)
    return b.EndVector()


def _int_vector(b, values):
    return b.CreateNumpyVector(np.asarray(values, np.int32))
