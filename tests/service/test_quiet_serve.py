"""``captioner-serve`` at a newcomer's terminal: a first start is a handful of lines, Ctrl-C one more."""

from __future__ import annotations

from pathlib import Path

import pytest

from captioner.onnx_export import EXPORT_VERSION
from tests.interrupt import Output, interrupt, script

INTERRUPTED = "captioner-serve: interrupted\n"


def _serve(checkpoint: Path, *flags: str) -> list[str]:
    return [script("captioner-serve"), "--port", "0", "--checkpoint", str(checkpoint), *flags]


def _listening(output: Output) -> bool:
    return any("Uvicorn running on" in line for line in output.stderr)


def _exporter_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if "onnx_ir" in line or "onnxscript" in line]


def test_ctrl_c_stops_a_running_server_with_one_line(tiny_checkpoint: Path) -> None:
    run = interrupt(_serve(tiny_checkpoint, "--backend", "torch"), _listening)
    assert run.returncode == 130, run.describe()
    assert run.after == [INTERRUPTED], run.describe()


@pytest.mark.slow
def test_verbose_keeps_uvicorns_shutdown_lines(tiny_checkpoint: Path) -> None:
    run = interrupt(_serve(tiny_checkpoint, "--backend", "torch", "--verbose"), _listening)
    assert run.returncode == 130, run.describe()
    assert run.after[-1] == INTERRUPTED and any("Application shutdown complete" in line for line in run.after)


@pytest.mark.slow
def test_a_first_start_exports_quietly_in_a_handful_of_lines(tiny_checkpoint: Path, tmp_path: Path) -> None:
    command = _serve(tiny_checkpoint, "--backend", "onnxruntime")
    run = interrupt(command, _listening, env={"CAPTIONER_CACHE_DIR": str(tmp_path / "cache")})
    assert run.returncode == 130, run.describe()
    assert _exporter_lines(run.before) == [] and "Traceback" not in "".join(run.before), run.describe()
    assert len(run.before) <= 8, run.describe()  # uvicorn's start, the export's two lines, "serving ..."
    progress = [line for line in run.before if "captioner.export_cache" in line]
    assert len(progress) == 2 and "exporting tiny.pt to ONNX" in progress[0] and "exported in" in progress[1]
    assert run.after == [INTERRUPTED], run.describe()


@pytest.mark.slow
def test_ctrl_c_during_the_first_start_export_stops_at_once(tiny_checkpoint: Path, tmp_path: Path) -> None:
    def exporting(output: Output) -> bool:
        return any("exporting tiny.pt to ONNX" in line for line in output.stderr)

    env = {"CAPTIONER_CACHE_DIR": str(tmp_path / "cache")}
    run = interrupt(_serve(tiny_checkpoint, "--backend", "onnxruntime"), exporting, env=env)
    assert run.returncode == 130, run.describe()
    assert run.after == [INTERRUPTED], run.describe()  # no "serving ...": it did not finish the export first
    assert (tmp_path / "cache" / "onnx").is_dir()  # it had begun: the cache folder is there ...
    assert not list((tmp_path / "cache" / "onnx").glob(f"v{EXPORT_VERSION}-*/"))  # ... the export is not


@pytest.mark.slow
def test_verbose_shows_what_the_exporters_libraries_say(tiny_checkpoint: Path, tmp_path: Path) -> None:
    env = {"CAPTIONER_CACHE_DIR": str(tmp_path / "cache")}
    command = _serve(tiny_checkpoint, "--backend", "onnxruntime", "--verbose")
    run = interrupt(command, lambda output: len(_exporter_lines(output.stderr)) >= 3, env=env)
    assert run.returncode == 130, run.describe()
    assert run.after[-1] == INTERRUPTED and "Traceback" not in "".join(run.after), run.describe()
