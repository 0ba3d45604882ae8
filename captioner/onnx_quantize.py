"""int8 graphs for the ONNX export (``captioner export ... --format onnx --quantize int8-decoder|int8``).

The decoder (``--quantize int8-decoder``, and part of ``int8``): its weight matrices stored as int8, in blocks of
:data:`DECODER_BLOCK` input rows with one scale each (ONNX Runtime's ``MatMulNBits``, 8 bits, symmetric), the
products computed in int8 with each block of the activations quantized as it runs (``accuracy_level`` 4). No
calibration: the weights are all it needs. A decoder step at beam 3 reads 20 MB of fp32 weights for a few rows of
activations, so its time is the memory's, and a quarter of the bytes is most of the gain: a step for 3 rows ran in
0.39 against 1.13 ms on the 2-core VM. On the default model (Flickr8k, beam 3) CIDEr moved by 0.0000 on dev and
+0.0006 on test, and 981 and 974 of the 1,000 captions were the fp32 decoder's.

The encoder (``--quantize int8``): static quantization (ONNX Runtime's ``quantize_static``): QDQ format,
int8 weights per output channel, uint8 activations whose ranges come from min/max over calibration
photos. It needs those photos: dynamic quantization (no calibration, activations quantized per run)
moved the default model's features by 64 % (relative norm, 4 Flickr8k dev photos), which the export's
check refuses. Measured on the default model, calibrated on 300 Flickr8k training photos (beam 3,
1,000 photos), with the int8 decoder: dev CIDEr 0.5442 against 0.5485 in fp32, test 0.5923 against 0.5985; the
encoder runs about 2x faster than the fp32 graph. What else was tried: docs/benchmarks.md, "int8 encoder".
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from captioner.model import Captioner

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 16
DECODER_BLOCK = 32  # input rows per scale of the int8 decoder weights
DECODER_GRAPHS = ("decoder_init", "decoder_step")
NARROW_OUTPUTS = 16  # weight matrices with fewer output columns stay fp32 (see narrow_matmuls)


class _PixelBatches:
    """ONNX Runtime's ``CalibrationDataReader`` protocol over preprocessed photos, a batch at a time."""

    def __init__(self, model: Captioner, paths: list[str]) -> None:
        self._batches: Iterator[dict[str, Any]] = self._generate(model, paths)

    @staticmethod
    def _generate(model: Captioner, paths: list[str]) -> Iterator[dict[str, Any]]:
        from captioner.transforms import ImageError

        for start in range(0, len(paths), CALIBRATION_BATCH):
            batch = []
            for path in paths[start : start + CALIBRATION_BATCH]:
                try:
                    batch.append(model.preprocess([path]))
                except ImageError as exc:
                    log.warning("calibration: skipping %s: %s", path, exc)
            if batch:
                import torch

                yield {"pixels": torch.cat(batch).numpy()}

    def get_next(self) -> dict[str, Any] | None:
        return next(self._batches, None)


def quantize_encoder(path: Path, model: Captioner, calibration_images: list[str]) -> dict[str, Any]:
    """Replace the fp32 ``encoder.onnx`` at ``path`` with an int8 one; returns what was done, for the metadata."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration_images:
        raise ValueError("int8 quantization needs calibration photos (--calibration-images): a few hundred like yours")
    prepared = path.with_suffix(".prep.onnx")
    quantized = path.with_suffix(".int8.onnx")
    try:
        quant_pre_process(str(path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(quantized),
            _PixelBatches(model, calibration_images),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        info = {"method": "static", "calibration_images": len(calibration_images), "format": "QDQ"}
        os.replace(quantized, path)
    finally:
        prepared.unlink(missing_ok=True)
        quantized.unlink(missing_ok=True)
    log.info("quantized the encoder to int8 (%s)", info["method"])
    return {"type": "int8", "part": "encoder", **info}


def quantize_decoder(folder: Path) -> dict[str, Any]:
    """Replace the fp32 decoder graphs in the export ``folder`` with ones whose weight matrices are int8; returns
    what was done, for the metadata."""
    import onnx

    from captioner.export_format import GRAPH_FILES

    nbits = _import_keeping_root_logger("onnxruntime.quantization.matmul_nbits_quantizer")
    DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer = nbits.DefaultWeightOnlyQuantConfig, nbits.MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(
        block_size=DECODER_BLOCK, is_symmetric=True, accuracy_level=4, bits=8, op_types_to_quantize=("MatMul",)
    )
    for part in DECODER_GRAPHS:
        path = folder / GRAPH_FILES[part]
        graph = onnx.load(str(path))
        gemms_as_matmuls(graph.graph)
        quantizer = MatMulNBitsQuantizer(graph, algo_config=config, nodes_to_exclude=narrow_matmuls(graph.graph))
        quantizer.process()
        quantized = path.with_suffix(".int8.onnx")
        try:
            quantizer.model.save_model_to_file(str(quantized), use_external_data_format=False)
            os.replace(quantized, path)
        finally:
            quantized.unlink(missing_ok=True)
    log.info("quantized the decoder's weights to int8")
    return {
        "type": "int8",
        "part": "decoder",
        "method": "weights",
        "block_size": DECODER_BLOCK,
        "format": "MatMulNBits",
    }


def narrow_matmuls(graph: Any) -> list[str]:
    """The ``MatMul`` nodes of ``graph`` whose constant weight has fewer than :data:`NARROW_OUTPUTS` output columns
    (attention's score vector, one column): int8 saves nothing there, and ``MatMulNBits`` ran the 512 x 1 product
    over 3 x 81 rows in 225 against fp32's 40 us."""
    shapes = {init.name: list(init.dims) for init in graph.initializer}
    narrow = []
    for node in graph.node:
        shape = shapes.get(node.input[1]) if node.op_type == "MatMul" else None
        if shape is not None and len(shape) == 2 and shape[1] < NARROW_OUTPUTS:
            narrow.append(node.name)
    return narrow


def _import_keeping_root_logger(name: str) -> Any:
    """Import module ``name`` and undo what its import did to the root logger: ONNX Runtime's weight quantizer calls
    ``logging.basicConfig(level=INFO)`` when imported, which would print every library's INFO lines from then on in
    a program that had not configured logging."""
    import importlib

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return importlib.import_module(name)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def gemms_as_matmuls(graph: Any) -> None:
    """Rewrite ``graph``'s ``Gemm`` nodes over a constant weight as ``MatMul`` (+ ``Add`` of the bias), in place: the
    exporter writes a 2-d ``Linear`` as ``Gemm``, and ONNX Runtime's weight quantizer handles only ``MatMul``."""
    import numpy as np
    from onnx import helper, numpy_helper

    weights = {init.name: init for init in graph.initializer}
    nodes = []
    for node in graph.node:
        if node.op_type != "Gemm" or node.input[1] not in weights:
            nodes.append(node)
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0 or attributes.get("transA", 0):
            nodes.append(node)  # not the form Linear exports to: left as it is
            continue
        name = node.input[1]  # MatMul wants (in, out): a transposed (out, in) weight is laid out anew, once
        if attributes.get("transB", 0):
            name = f"{name}_t"
            if name not in weights:  # a weight two Gemms share
                weight = numpy_helper.to_array(weights[node.input[1]]).T
                weights[name] = numpy_helper.from_array(np.ascontiguousarray(weight), name)
                graph.initializer.append(weights[name])
        has_bias = len(node.input) > 2 and node.input[2] != ""
        product = f"{node.output[0]}_product" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product], name=f"{node.name}_matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
