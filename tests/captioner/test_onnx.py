"""ONNX export and the onnxruntime backend: files, self-check, parity for every decoding method, cache, errors."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner import Captioner, DecodingOptions
from captioner.caption_rules import CaptionRules
from captioner.checkpoint import CheckpointError
from captioner.cli import main
from captioner.export_cache import cached_export_dir
from captioner.onnx_backend import BackendUnavailable
from captioner.onnx_export import (
    GRAPH_FILES,
    MANIFEST_FILE,
    METADATA_FILE,
    ExportError,
    check_export,
    export_onnx,
    write_manifest,
)
from captioner.transforms import Preprocess
from tests.helpers import tiny_captioner

ort = pytest.importorskip("onnxruntime")

VARIANTS = {  # the default model's shape, and one that differs in every other way the graphs depend on
    "lstm-attention": {"attention": True},
    "gru-2-layers-first-word-plain": {"attention": False, "cell": "gru", "num_layers": 2, "image_input": "first_word"},
}


def _photos(tmp: Path, count: int = 3) -> list[str]:
    """Small pictures with some structure (the tiny model's preprocessing crops 64 px)."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        coarse = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)
        path = tmp / f"photo{i}.png"
        Image.fromarray(coarse).resize((90 + 10 * i, 80), Image.BICUBIC).save(path)
        paths.append(str(path))
    return paths


RULES = CaptionRules(frozenset({"a", "the", "on", "in"}), frozenset({("black", "dog")}), frozenset({"on", "runs"}))


@dataclass
class Exported:
    checkpoint: Path
    folder: Path  # its ONNX export
    reference: Captioner  # the checkpoint on PyTorch
    onnx_model: Captioner  # the export on onnxruntime
    photos: list[str]


def _export(tmp: Path, **decoder_kwargs) -> Exported:
    checkpoint = tmp / "model.pt"
    model = tiny_captioner(**decoder_kwargs)
    model.caption_rules = RULES  # every parity test below decodes under them on both backends
    model.save(checkpoint)
    reference = Captioner.from_checkpoint(checkpoint)
    export_onnx(reference, tmp / "onnx", source=str(checkpoint), source_sha256="0" * 64)
    onnx_model = Captioner.from_checkpoint(tmp / "onnx", backend="onnxruntime")
    return Exported(checkpoint, tmp / "onnx", reference, onnx_model, _photos(tmp))


@pytest.fixture(
    scope="module",
    # the default model's shape runs in the fast subset; the second export is for the full run
    params=[pytest.param(name, marks=[pytest.mark.slow] if i else []) for i, name in enumerate(VARIANTS)],
)
def exported(request, tmp_path_factory) -> tuple[Captioner, Captioner, list[str]]:
    """(PyTorch model, the same on onnxruntime, photos) for one decoder variant."""
    found = _export(tmp_path_factory.mktemp(request.param), **VARIANTS[request.param])
    return found.reference, found.onnx_model, found.photos


@pytest.fixture(scope="module")
def attention_export(tmp_path_factory) -> Exported:
    """The lstm-attention variant, for the tests that need one export to work on."""
    return _export(tmp_path_factory.mktemp("attention"), attention=True)


def _copy_export(found: Exported, target: Path) -> Path:
    shutil.copytree(found.folder, target)
    return target


def _perturb(graph: Path, name_part: str) -> None:
    """Add 0.5 to the first float weight of ``graph`` whose name contains ``name_part``, and update the export's
    manifest (an exporter that wrote wrong weights, rather than a file changed afterwards)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph))
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if name_part in init.name and array.dtype == np.float32 and array.size > 1:
            init.CopyFrom(numpy_helper.from_array(array + 0.5, init.name))
            onnx.save(model, str(graph))
            write_manifest(graph.parent)
            return
    raise AssertionError(
        f"no float weight named like {name_part!r} in {graph}: {[i.name for i in model.graph.initializer]}"
    )


METHODS = {
    "greedy": DecodingOptions(method="greedy", max_length=12),
    "sample": DecodingOptions(method="sample", temperature=0.8, top_k=5, top_p=0.9, num_captions=3, seed=7),
    "sample-plain": DecodingOptions(method="sample", num_captions=2, seed=3),
    "beam": DecodingOptions(method="beam", beam_size=4, num_captions=3, length_penalty=0.7),
    "beam-1": DecodingOptions(method="beam", beam_size=1),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_decoding_method_gives_the_same_captions_on_both_backends(exported, method) -> None:
    reference, onnx_model, photos = exported
    expected = reference.caption(photos, METHODS[method])
    got = onnx_model.caption(photos, METHODS[method])
    assert onnx_model.backend == "onnxruntime" and reference.backend == "torch"
    for want, have in zip(expected, got, strict=True):
        assert [c.tokens for c in have.captions] == [c.tokens for c in want.captions]
        assert [c.log_prob for c in have.captions] == pytest.approx([c.log_prob for c in want.captions], abs=1e-3)
        assert have.attention_shape == want.attention_shape
        for w, h in zip(want.captions, have.captions, strict=True):
            if w.attention is None:
                assert h.attention is None
            else:  # the attention maps, word by word
                np.testing.assert_allclose(np.array(h.attention), np.array(w.attention), atol=1e-4)


def test_attention_maps_come_back_from_the_step_graph(exported) -> None:
    reference, onnx_model, photos = exported
    if not reference.decoder.config.attention:
        pytest.skip("no attention in this variant")
    result = onnx_model.caption(photos[:1], method="greedy")[0]
    caption = result.captions[0]
    assert caption.attention is not None and len(caption.attention) == len(caption.tokens)
    h, w = result.attention_shape
    assert all(len(row) == h * w and sum(row) == pytest.approx(1.0, abs=1e-4) for row in caption.attention)


def test_the_encoder_graph_takes_any_batch_size(exported) -> None:
    reference, onnx_model, photos = exported
    pixels = reference.preprocess(photos)
    for batch in (1, 3):
        got = onnx_model.encode(pixels[:batch])
        assert isinstance(got, np.ndarray)  # ONNX Runtime's model is numpy throughout
        np.testing.assert_allclose(got, reference.encode(pixels[:batch]).numpy(), atol=1e-3, rtol=1e-3)
    # chunked runs give the same features as one run
    np.testing.assert_array_equal(onnx_model.encoder.forward_features(pixels, chunk_size=2), onnx_model.encode(pixels))


def test_the_export_folder_holds_the_graphs_and_what_describes_them(exported) -> None:
    reference, onnx_model, _ = exported
    folder = onnx_model.export_dir
    assert {p.name for p in folder.iterdir()} == {*GRAPH_FILES.values(), METADATA_FILE, MANIFEST_FILE}
    meta = json.loads((folder / METADATA_FILE).read_text())
    assert meta["vocab"] == list(reference.vocab.tokens)
    assert reference.caption_rules == onnx_model.caption_rules == RULES  # the rules travel in the export
    assert Preprocess.from_dict(meta["preprocess"]) == reference.preprocess_config
    assert meta["config"]["decoder"] == reference.config.to_dict()["decoder"]
    assert meta["source"]["sha256"] == "0" * 64 and meta["opset"] >= 17
    assert set(meta["versions"]) == {"captioner", "torch", "onnx", "onnxruntime"}
    assert meta["check"]["logit_max_abs_diff"] <= meta["check"]["tolerances"]["logit_atol"]
    assert meta["parameters"] == sum(p.numel() for p in reference.parameters())  # before fusing
    # every graph's inputs and outputs are the ones the metadata names, with a dynamic batch
    for part, file in GRAPH_FILES.items():
        session = ort.InferenceSession(str(folder / file), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == meta["io"][part]["inputs"]
        assert [o.name for o in session.get_outputs()] == meta["io"][part]["outputs"]
        assert all(isinstance(i.shape[0], str) for i in session.get_inputs())


def test_the_self_check_catches_a_graph_that_disagrees(attention_export, tmp_path) -> None:
    model = attention_export.reference
    folder = _copy_export(attention_export, tmp_path / "copy")
    check_export(model, folder)  # an intact export passes
    _perturb(folder / GRAPH_FILES["decoder_step"], "head")  # the output layer's weights
    with pytest.raises(ExportError, match="decoder logits differ"):
        check_export(model, folder)
    _perturb(folder / GRAPH_FILES["encoder"], "conv")
    with pytest.raises(ExportError, match="encoder features differ"):
        check_export(model, folder)


@pytest.fixture(scope="module")
def head_export(tmp_path_factory) -> Exported:
    """The lstm-attention variant with a (fake) ImageNet-1k class head on its encoder."""
    return _export(tmp_path_factory.mktemp("head"), attention=True, class_head=True)


def test_the_class_head_is_an_encoder_output_with_the_same_probabilities(head_export) -> None:
    reference, onnx_model = head_export.reference, head_export.onnx_model
    meta = json.loads((head_export.folder / METADATA_FILE).read_text())
    assert meta["io"]["encoder"]["outputs"] == ["grid", "class_logits"]
    assert meta["check"]["class_probability_max_abs_diff"] <= 1e-3
    assert onnx_model.encoder.has_class_head
    options = DecodingOptions(method="beam", beam_size=3)
    expected, got = reference.caption(head_export.photos, options), onnx_model.caption(head_export.photos, options)
    for want, have in zip(expected, got, strict=True):
        assert want.class_probabilities is not None and have.class_probabilities is not None
        assert have.class_probabilities.shape == (1000,) and have.class_probabilities.dtype == np.float32
        np.testing.assert_allclose(have.class_probabilities, want.class_probabilities, atol=1e-3)
        assert want.class_probabilities.max() > 0.05  # peaked: agreement within 1e-3 is not agreement on ~1/1000
        assert list(np.argsort(-have.class_probabilities)[:5]) == list(np.argsort(-want.class_probabilities)[:5])
        assert [c.tokens for c in have.captions] == [c.tokens for c in want.captions]
    # chunked runs of the graph give the same logits as one run
    pixels = reference.preprocess(head_export.photos)
    whole = onnx_model.encoder.forward_features_and_logits(pixels)
    chunked = onnx_model.encoder.forward_features_and_logits(pixels, chunk_size=2)
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b)


def test_without_a_class_head_the_encoder_graph_has_no_class_output(exported) -> None:
    reference, onnx_model, photos = exported
    assert reference.encoder.classifier is None and not onnx_model.encoder.has_class_head
    assert json.loads((onnx_model.export_dir / METADATA_FILE).read_text())["io"]["encoder"]["outputs"] == ["grid"]
    assert all(r.class_probabilities is None for r in onnx_model.caption(photos[:2], method="greedy"))


def test_the_self_check_catches_a_class_head_that_disagrees(head_export, tmp_path) -> None:
    folder = _copy_export(head_export, tmp_path / "copy")
    import onnx
    from onnx import numpy_helper

    graph = folder / GRAPH_FILES["encoder"]
    model = onnx.load(str(graph))
    # the classes' weight rows moved by one (adding a constant, as _perturb does, would leave a softmax as it is)
    (weight,) = [init for init in model.graph.initializer if init.name.endswith("classifier.weight")]
    weight.CopyFrom(numpy_helper.from_array(np.roll(numpy_helper.to_array(weight), 1, axis=0), weight.name))
    onnx.save(model, str(graph))
    write_manifest(folder)
    with pytest.raises(ExportError, match="class probabilities differ"):
        check_export(head_export.reference, folder)
    with pytest.raises(ExportError, match="PyTorch encoder has no class head but the exported one has"):
        check_export(tiny_captioner(attention=True), folder)


def test_a_failed_export_leaves_nothing_and_a_foreign_folder_is_refused(tmp_path, monkeypatch) -> None:
    import captioner.onnx_export as onnx_export

    model = tiny_captioner()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an earlier ONNX export"):
        export_onnx(model, tmp_path / "mine", source="x", source_sha256="0" * 64)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"

    written = []

    def fail_on_the_second_graph(module, args, path, inputs, outputs):
        if written:
            raise RuntimeError("simulated exporter crash")
        path.write_bytes(b"half an export")
        written.append(path)

    monkeypatch.setattr(onnx_export, "_export_graph", fail_on_the_second_graph)
    with pytest.raises(ExportError, match="simulated exporter crash"):
        export_onnx(model, tmp_path / "out", source="x", source_sha256="0" * 64)
    assert written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no folder, no temporary left behind


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_an_unwritable_cache_is_a_one_line_error_naming_the_setting(tmp_path, monkeypatch, code) -> None:
    """A read-only root file system (Kubernetes' readOnlyRootFilesystem) as well as permissions."""
    checkpoint = tmp_path / "model.pt"
    tiny_captioner().save(checkpoint)
    monkeypatch.setenv("CAPTIONER_CACHE_DIR", str(tmp_path / "cache"))

    def failing_with(error_code: int):
        def export(*args, **kwargs):
            raise OSError(error_code, os.strerror(error_code))

        return export

    monkeypatch.setattr("captioner.export_cache._export_into_cache", failing_with(code))
    with pytest.raises(CheckpointError, match="set CAPTIONER_CACHE_DIR to a writable folder"):
        Captioner.from_checkpoint(checkpoint, backend="onnxruntime")
    monkeypatch.setattr("captioner.export_cache._export_into_cache", failing_with(errno.ENOSPC))
    with pytest.raises(CheckpointError, match="No space left") as raised:  # one line too, but not about permissions
        Captioner.from_checkpoint(checkpoint, backend="onnxruntime")
    assert "set CAPTIONER_CACHE_DIR" not in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.slow
def test_a_checkpoint_is_exported_once_into_the_cache(tmp_path, monkeypatch) -> None:
    import captioner.onnx_export as onnx_export

    monkeypatch.setenv("CAPTIONER_CACHE_DIR", str(tmp_path / "cache"))
    checkpoint = tmp_path / "model.pt"
    tiny_captioner().save(checkpoint)
    calls = []
    real_export = onnx_export.export_onnx
    monkeypatch.setattr(onnx_export, "export_onnx", lambda *a, **k: calls.append(1) or real_export(*a, **k))
    # two loads at once (replicas starting together on a shared cache): one exports, the other waits for it
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: Captioner.from_checkpoint(checkpoint, backend="onnxruntime"), range(2))
    assert len(calls) == 1
    Captioner.from_checkpoint(checkpoint, backend="onnxruntime")
    assert len(calls) == 1
    assert first.export_dir == second.export_dir == cached_export_dir(checkpoint)
    assert first.export_dir.parent == tmp_path / "cache" / "onnx"
    meta = json.loads((first.export_dir / METADATA_FILE).read_text())
    assert meta["source"]["checkpoint"] == str(checkpoint)
    # another checkpoint (other weights) has its own place in the cache
    tiny_captioner(seed=5).save(checkpoint)
    assert cached_export_dir(checkpoint) != first.export_dir


def test_without_onnxruntime_the_error_names_the_extra(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    checkpoint = tmp_path / "model.pt"
    tiny_captioner().save(checkpoint)
    with pytest.raises(BackendUnavailable, match=r"captioner\[onnx\]"):
        Captioner.from_checkpoint(checkpoint, backend="onnxruntime")
    photo = _photos(tmp_path, 1)[0]
    assert main(["caption", photo, "--checkpoint", str(checkpoint), "--backend", "onnxruntime"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "captioner[onnx]" in err


def test_backend_errors_are_clear(attention_export, tmp_path) -> None:
    folder = _copy_export(attention_export, tmp_path / "onnx")
    with pytest.raises(CheckpointError, match="is an ONNX export"):
        Captioner.from_checkpoint(folder)  # backend torch
    with pytest.raises(ValueError, match="unknown backend"):
        Captioner.from_checkpoint(folder, backend="tensorrt")
    with pytest.raises(ValueError, match="runs on CPU"):
        Captioner.from_checkpoint(folder, backend="onnxruntime", device="cuda:0")
    with pytest.raises(CheckpointError, match="not found"):
        Captioner.from_checkpoint(tmp_path / "missing", backend="onnxruntime")
    with pytest.raises(RuntimeError, match="cannot be saved"):
        attention_export.onnx_model.save(tmp_path / "x.pt")
    with pytest.raises(ExportError, match="needs the PyTorch model"):
        export_onnx(attention_export.onnx_model, tmp_path / "again", source="x", source_sha256="0" * 64)
    (folder / GRAPH_FILES["decoder_step"]).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        Captioner.from_checkpoint(folder, backend="onnxruntime")
    (folder / METADATA_FILE).write_text("{}")
    with pytest.raises(CheckpointError, match="not a captioner ONNX export"):
        Captioner.from_checkpoint(folder, backend="onnxruntime")


@pytest.mark.slow
def test_cli_export_onnx_and_caption_with_it(tmp_path, capsys) -> None:
    checkpoint = tmp_path / "model.pt"
    tiny_captioner(attention=True).save(checkpoint)
    photos = _photos(tmp_path)
    out = tmp_path / "exported"
    assert main(["export", str(checkpoint), str(out), "--format", "onnx", "--check-images", *photos]) == 0
    printed = capsys.readouterr().out
    assert "check passed on 3 images" in printed and "encoder.onnx" in printed
    assert {p.name for p in out.iterdir()} == {*GRAPH_FILES.values(), METADATA_FILE, MANIFEST_FILE}
    argv = ["caption", *photos, "--method", "beam", "--json"]
    assert main([*argv, "--checkpoint", str(checkpoint)]) == 0
    with_torch = json.loads(capsys.readouterr().out)
    assert main([*argv, "--checkpoint", str(out), "--backend", "onnxruntime"]) == 0
    with_onnx = json.loads(capsys.readouterr().out)
    assert [r["captions"][0]["text"] for r in with_onnx["results"]] == [
        r["captions"][0]["text"] for r in with_torch["results"]
    ]
    # misuse: one line, exit 2
    for extra, message in (
        (["--half"], "--half applies to --format pt"),
        (["--calibration-images", photos[0]], "needs --quantize int8"),
        (["--quantize", "int8"], "needs --calibration-images"),
        (["--check-images", str(tmp_path / "nope.jpg")], "no such file or folder"),
    ):
        assert main(["export", str(checkpoint), str(tmp_path / "x"), "--format", "onnx", *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["export", str(checkpoint), str(tmp_path / "y.pt"), "--quantize", "int8"]) == 2
    assert "apply to --format onnx" in capsys.readouterr().err


@pytest.mark.slow
def test_int8_export_quantizes_the_encoder_and_still_captions(attention_export, tmp_path, capsys) -> None:
    checkpoint, fp32 = attention_export.checkpoint, attention_export.folder
    photos = _photos(tmp_path, 6)
    int8 = tmp_path / "int8"
    argv = ["export", str(checkpoint), str(int8), "--format", "onnx", "--quantize", "int8"]
    assert main([*argv, "--calibration-images", str(tmp_path), "--check-images", *photos[:2]]) == 0
    capsys.readouterr()
    meta = json.loads((int8 / METADATA_FILE).read_text())
    assert meta["quantization"][0] == {
        "type": "int8",
        "part": "encoder",
        "method": "static",
        "calibration_images": 6,
        "format": "QDQ",
    }
    assert [record["part"] for record in meta["quantization"]] == ["encoder", "decoder"]
    assert (int8 / "encoder.onnx").stat().st_size < (fp32 / "encoder.onnx").stat().st_size / 3
    model = Captioner.from_checkpoint(int8, backend="onnxruntime")
    assert model.encoder.quantized and model.decoder.quantized
    result = model.caption(photos[:2], method="beam")
    assert all(r.captions[0].tokens for r in result)


def test_gemms_rewritten_as_matmuls_compute_the_same(attention_export) -> None:
    import onnx

    from captioner.onnx_quantize import gemms_as_matmuls

    path = attention_export.folder / GRAPH_FILES["decoder_step"]
    graph = onnx.load(str(path))
    assert any(node.op_type == "Gemm" for node in graph.graph.node)  # what the exporter writes for Linear
    gemms_as_matmuls(graph.graph)
    assert not any(node.op_type == "Gemm" for node in graph.graph.node)
    rng = np.random.default_rng(0)
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    after = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {}
    for graph_input in before.get_inputs():
        shape = [3 if isinstance(d, str) else d for d in graph_input.shape]
        feed[graph_input.name] = (
            rng.integers(4, 10, shape).astype(np.int64)
            if graph_input.name == "tokens"
            else rng.standard_normal(shape).astype(np.float32)
        )
    for expected, got in zip(before.run(None, feed), after.run(None, feed), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_gemms_that_share_a_weight_are_rewritten_once() -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from captioner.onnx_quantize import gemms_as_matmuls

    weight = np.arange(12, dtype=np.float32).reshape(3, 4) / 10  # (out, in), as Linear exports it
    nodes = [
        helper.make_node("Identity", ["x"], ["x2"]),
        helper.make_node("Gemm", ["x", "w", "b"], ["y1"], name="first", transB=1),
        helper.make_node("Gemm", ["x2", "w"], ["y2"], name="second", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in ("y1", "y2")],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.ones(3, np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    gemms_as_matmuls(model.graph)
    onnx.checker.check_model(model)
    assert sorted(init.name for init in model.graph.initializer) == ["b", "w_t"]
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = {"x": np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)}
    for expected, got in zip(before.run(None, x), after.run(None, x), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_an_int8_decoder_export_needs_no_calibration_and_captions_with_every_method(
    attention_export, tmp_path, capsys
) -> None:
    import onnx

    checkpoint, fp32 = attention_export.checkpoint, attention_export.folder
    photos = attention_export.photos
    out = tmp_path / "int8-decoder"
    assert main(["export", str(checkpoint), str(out), "--format", "onnx", "--quantize", "int8-decoder"]) == 0
    capsys.readouterr()
    meta = json.loads((out / METADATA_FILE).read_text())
    assert [record["part"] for record in meta["quantization"]] == ["decoder"]
    assert 0 < meta["check"]["logit_max_relative_diff"] <= meta["check"]["tolerances"]["int8_logit_rtol"]
    for part in ("decoder_init", "decoder_step"):
        ops = {node.op_type for node in onnx.load(str(out / GRAPH_FILES[part])).graph.node}
        assert "MatMulNBits" in ops and "Gemm" not in ops
    assert (out / GRAPH_FILES["encoder"]).read_bytes() == (fp32 / GRAPH_FILES["encoder"]).read_bytes()
    model = Captioner.from_checkpoint(out, backend="onnxruntime")
    assert model.decoder.quantized and not model.encoder.quantized
    for method, options in (("greedy", {}), ("beam", {}), ("sample", {"seed": 1})):
        assert all(r.captions[0].tokens for r in model.caption(photos, method=method, **options))
    # misuse: calibration photos are for the encoder's int8 only
    argv = ["export", str(checkpoint), str(tmp_path / "x"), "--format", "onnx", "--quantize", "int8-decoder"]
    assert main([*argv, "--calibration-images", photos[0]]) == 2
    assert "needs --quantize int8" in capsys.readouterr().err


def test_the_self_check_catches_an_int8_decoder_that_disagrees(attention_export, tmp_path) -> None:
    model = attention_export.reference
    out = tmp_path / "int8-decoder"
    export_onnx(model, out, source=str(attention_export.checkpoint), source_sha256="0" * 64, quantize="int8-decoder")
    _perturb(out / GRAPH_FILES["decoder_step"], "head")  # the output layer's bias: int8 leaves it in fp32
    with pytest.raises(ExportError, match="int8 decoder logits differ from fp32"):
        check_export(model, out)


def test_importing_the_weight_quantizer_leaves_the_root_logger_as_it_was(tmp_path, monkeypatch) -> None:
    import logging

    from captioner.onnx_quantize import _import_keeping_root_logger

    # what onnxruntime.quantization.matmul_nbits_quantizer does when imported
    (tmp_path / "configures_logging.py").write_text("import logging\nlogging.basicConfig(level=logging.INFO)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # a program that has not configured logging
    monkeypatch.setattr(root, "level", logging.WARNING)
    _import_keeping_root_logger("configures_logging")
    assert root.handlers == [] and root.level == logging.WARNING


def test_quantized_parts_reads_old_and_new_records() -> None:
    from captioner.export_format import quantized_parts

    assert quantized_parts(None) == frozenset()
    assert quantized_parts({"type": "int8", "part": "encoder", "method": "static"}) == {"encoder"}  # before 0.x
    assert quantized_parts([{"part": "encoder"}, {"part": "decoder"}]) == {"encoder", "decoder"}


@pytest.mark.slow  # quantization: ~10 s
def test_an_int8_export_keeps_the_class_head(head_export, tmp_path) -> None:
    photos = _photos(tmp_path, 4)
    reference = head_export.reference
    export_onnx(
        reference,
        tmp_path / "int8",
        source=str(head_export.checkpoint),
        source_sha256="0" * 64,
        quantize="int8",
        calibration_images=photos,
    )
    meta = json.loads((tmp_path / "int8" / METADATA_FILE).read_text())
    assert meta["io"]["encoder"]["outputs"] == ["grid", "class_logits"]
    assert isinstance(meta["check"]["class_probability_max_abs_diff"], float)  # reported, not enforced, for int8
    # no check photos given: the check ran on calibration photos, not synthetic colour fields
    assert meta["check"]["image_source"] == "given images" and meta["check"]["images"] == 4
    model = Captioner.from_checkpoint(tmp_path / "int8", backend="onnxruntime")
    assert model.encoder.quantized and model.encoder.has_class_head
    probabilities = model.caption(photos[:2], method="greedy")[0].class_probabilities
    assert probabilities is not None and abs(float(probabilities.sum()) - 1.0) < 1e-4


def test_info_and_export_accept_default(capsys) -> None:
    assert main(["info", "default"]) == 0
    assert json.loads(capsys.readouterr().out)["encoder"]["name"] == "efficientnet_lite2"


def test_eval_on_both_backends_scores_the_same(attention_export, tmp_path) -> None:
    from tests.helpers import make_flickr_folder
    from training.cli import eval_main

    data = make_flickr_folder(tmp_path / "data", per_split=(4, 2, 6))
    predictions = {}
    for backend, checkpoint in (("torch", attention_export.checkpoint), ("onnxruntime", attention_export.folder)):
        out = tmp_path / backend
        argv = ["--checkpoint", str(checkpoint), "--data", str(data), "--backend", backend, "--method", "greedy"]
        argv += ["--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--no-progress", "--no-java"]
        assert eval_main(argv) == 0
        predictions[backend] = json.loads((out / "predictions.json").read_text())
    assert predictions["onnxruntime"] == predictions["torch"]
    # each backend's features are cached apart (the ONNX encoder's are keyed by its graph)
    assert len(list((tmp_path / "cache").iterdir())) == 2


# Prepended to a child's script: `import torch` fails there as in an install without it (ModuleNotFoundError).
NO_TORCH = """
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("No module named 'torch'")
sys.meta_path.insert(0, NoTorch())
"""

TORCH_BLOCKED = (
    NO_TORCH
    + """
import json
from captioner.loading import load_captioner
model = load_captioner(sys.argv[1])
photos = sys.argv[2:]
out = {}
for name, options in {"beam": {"beam_size": 3, "num_captions": 2}, "greedy": {"method": "greedy"},
                      "sample": {"method": "sample", "seed": 5, "num_captions": 2}}.items():
    results = model.caption(photos, **options)
    out[name] = [[c.tokens for c in r.captions] for r in results]
    out[name + "_tags"] = [[t.name for t in r.tags] for r in results]
out["type"] = type(model).__name__
out["torch_loaded"] = any(m == "torch" or m.startswith("torch.") for m in sys.modules)
print(json.dumps(out))
"""
)


def test_an_export_captions_without_torch_as_torch_does(head_export) -> None:
    """The runtime path imports no torch at all (it is blocked in the child), and every decoding method gives the
    torch model's captions and tags."""
    run = subprocess.run(
        [sys.executable, "-c", TORCH_BLOCKED, str(head_export.folder), *head_export.photos],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout)
    assert got["type"] == "OnnxCaptioner" and got["torch_loaded"] is False
    reference = head_export.reference
    for name, options in {
        "beam": DecodingOptions(beam_size=3, num_captions=2),
        "greedy": DecodingOptions(method="greedy"),
        "sample": DecodingOptions(method="sample", seed=5, num_captions=2),
    }.items():
        results = reference.caption(head_export.photos, options)
        assert got[name] == [[c.tokens for c in r.captions] for r in results], name
        assert got[name + "_tags"] == [[t.name for t in r.tags] for r in results], name


def test_without_torch_a_checkpoint_is_a_one_line_error_naming_what_runs(tmp_path) -> None:
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"not read")
    script = NO_TORCH + (
        "from captioner.loading import load_captioner\n"
        "from captioner.checkpoint import CheckpointError\n"
        "from captioner.onnx_backend import BackendUnavailable\n"
        "for backend in ('auto', 'onnxruntime', 'torch'):\n"
        "    try:\n"
        "        load_captioner(sys.argv[1], backend=backend)\n"
        "    except (CheckpointError, BackendUnavailable) as exc:\n"
        "        print(type(exc).__name__, '|', exc)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(checkpoint)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 3
    for line in lines[:2]:  # auto resolves to onnxruntime without torch
        assert line.startswith("CheckpointError | ") and "needs torch" in line and "--format onnx" in line
    assert lines[2].startswith("BackendUnavailable | ") and "captioner[torch]" in lines[2]


APPS_WITHOUT_TORCH = """
import contextlib, io, json
import service.cli  # what captioner-serve runs
from training.data_commands import main  # what the captioner console script runs
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    status = main(["caption", *sys.argv[2:], "--checkpoint", sys.argv[1], "--json"])
cli = [r["captions"][0]["text"] for r in json.loads(printed.getvalue())["results"]]

from fastapi.testclient import TestClient
from service.app import create_app
from service.settings import Settings
api = []
with TestClient(create_app(Settings(checkpoint=sys.argv[1], require_api_keys=False))) as client:
    backend = client.get("/model").json()["backend"]
    for photo in sys.argv[2:]:
        with open(photo, "rb") as f:
            api.append(client.post("/caption", files={"image": f}).json()["captions"][0]["text"])
print(json.dumps({"status": status, "cli": cli, "api": api, "backend": backend,
                  "torch_loaded": any(m == "torch" or m.startswith("torch.") for m in sys.modules)}))
"""


def test_the_command_line_and_the_service_run_an_export_without_torch(head_export) -> None:
    """``captioner caption`` and the API on an export with torch unimportable: torch's captions, torch never loaded."""
    run = subprocess.run(
        [sys.executable, "-c", NO_TORCH + APPS_WITHOUT_TORCH, str(head_export.folder), *head_export.photos],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    expected = [r.captions[0].text for r in head_export.reference.caption(head_export.photos, DecodingOptions())]
    assert got["status"] == 0 and got["backend"] == "onnxruntime" and got["torch_loaded"] is False
    assert got["cli"] == expected and got["api"] == expected


def test_without_torch_the_commands_that_need_it_say_so_in_one_line(tmp_path) -> None:
    script = NO_TORCH + (
        "from training.data_commands import main\n"
        "for command in (['info'], ['export', 'default', sys.argv[1], '--format', 'onnx'],\n"
        "                ['rules', 'default', sys.argv[1], '--data', sys.argv[1]]):\n"
        "    print(main(command))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert run.stdout.split() == ["2", "2", "2"], run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 3 and all("needs torch" in line and "captioner[torch]" in line for line in lines), lines
    assert not (tmp_path / "out").exists()
