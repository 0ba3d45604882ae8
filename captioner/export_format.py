"""The ONNX export's format: its files, version and the names of every graph input and output.

The one place both sides read: the exporter (:mod:`captioner.onnx_export`, torch) writes exports in this format,
and the runtime (:mod:`captioner.onnx_backend`, :mod:`captioner.export_integrity`; no torch) reads them. See
:mod:`captioner.onnx_export` for what each file holds.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from captioner.config import DecoderConfig

EXPORT_FORMAT = "captioner-onnx"
# 2: manifest.json; loaders refuse an export without one. 3: the encoder graph's class_logits output; a cached
# version-2 export of a model with a class head would answer without class probabilities, so it is exported again.
EXPORT_VERSION = 3
METADATA_FILE = "captioner.json"
GRAPH_FILES = {"encoder": "encoder.onnx", "decoder_init": "decoder_init.onnx", "decoder_step": "decoder_step.onnx"}
MANIFEST_FILE = "manifest.json"
DIGESTED_FILES = (METADATA_FILE, *GRAPH_FILES.values())  # what the manifest lists: every other file of an export
NOT_WRITABLE_BY_OTHERS = ~(stat.S_IWGRP | stat.S_IWOTH)  # mask for an export's modes: only its owner writes
# what ``--quantize`` may ask for, and the parts of the model each stores in int8 (captioner.onnx_quantize)
QUANTIZE_CHOICES = {"int8-decoder": ("decoder",), "int8": ("encoder", "decoder")}


def quantized_parts(quantization: Any) -> frozenset[str]:
    """The parts (``encoder``, ``decoder``) an export stores in int8, from its metadata's ``quantization``: a list
    of records, one per part, or None; an export from before the decoder could be quantized has one record."""
    if quantization is None:
        return frozenset()
    records = quantization if isinstance(quantization, list) else [quantization]
    return frozenset(str(record["part"]) for record in records)


def state_names(config: DecoderConfig) -> tuple[str, ...]:
    """Names of the recurrent state tensors: ``h`` and, for the LSTM, ``c``."""
    return ("h", "c") if config.cell == "lstm" else ("h",)


def encoder_output_names(has_class_head: bool) -> list[str]:
    return ["grid", *(("class_logits",) if has_class_head else ())]


def init_output_names(config: DecoderConfig) -> list[str]:
    return [*state_names(config), *(("memory", "keys") if config.attention else ())]


def step_input_names(config: DecoderConfig) -> list[str]:
    return ["tokens", *init_output_names(config)]


def step_output_names(config: DecoderConfig) -> list[str]:
    return ["logits", *(f"next_{n}" for n in state_names(config)), *(("alpha",) if config.attention else ())]


def is_export_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding an export (its metadata file), rather than a checkpoint file."""
    return (Path(path) / METADATA_FILE).is_file()
