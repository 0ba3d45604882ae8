"""The shell scripts: which index setup.sh takes torch from (dry runs, no installs) and docker-smoke.sh's checks."""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import free_port, require_data

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SPEC = "torch==2.14.1 torchvision==0.29.1"
DEFAULT_INDEX = "http://default-index.invalid/simple"


def _copy_script(tmp_path: Path, name: str) -> Path:
    """A copy in tmp_path/scripts, so the script's `cd ..` lands in tmp_path, never in the repository."""
    (tmp_path / "scripts").mkdir(exist_ok=True)
    return Path(shutil.copy(SCRIPTS / name, tmp_path / "scripts" / name))


def _dry_run(tmp_path: Path, path: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    script = _copy_script(tmp_path, "setup.sh")
    full_env = {k: v for k, v in os.environ.items() if k not in ("TORCH_INDEX_URL", "TORCH_SPEC")}
    # PIP_INDEX_URL: the "default index" pip reports, so the expected command is known
    full_env.update(SETUP_DRY_RUN="1", PYTHON=sys.executable, PIP_INDEX_URL=DEFAULT_INDEX, **env)
    if path is not None:
        full_env["PATH"] = path
    result = subprocess.run(
        ["bash", str(script), "serve"], env=full_env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / ".venv").exists(), "a dry run must not create .venv"
    return result


def _command(result: subprocess.CompletedProcess[str]) -> str:
    prefix = "setup: dry run, would run: "
    lines = [line for line in result.stdout.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, result.stdout
    return lines[0].removeprefix(prefix)


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def cpu_index(tmp_path: Path) -> Iterator[str]:
    """A local stand-in for PyTorch's CPU wheel index: a folder with torch/ in it, over HTTP."""
    root = tmp_path / "index"
    (root / "torch").mkdir(parents=True)
    (root / "torch" / "index.html").write_text("<a href='torch-2.14.1+cpu.whl'>torch</a>")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=root))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_torch_index_url_always_wins(tmp_path: Path, cpu_index: str) -> None:
    result = _dry_run(
        tmp_path, TORCH_INDEX_URL="http://mine.invalid/whl", CAPTIONER_NVIDIA_GPU="0", CAPTIONER_CPU_INDEX_URL=cpu_index
    )
    assert _command(result) == f".venv/bin/python -m pip install -q --index-url http://mine.invalid/whl {SPEC}"
    assert "TORCH_INDEX_URL=http://mine.invalid/whl" in result.stderr


def test_no_gpu_and_reachable_cpu_index_takes_cpu_wheels(tmp_path: Path, cpu_index: str) -> None:
    result = _dry_run(tmp_path, CAPTIONER_NVIDIA_GPU="0", CAPTIONER_CPU_INDEX_URL=cpu_index)
    index = cpu_index.rstrip("/")
    assert _command(result) == (
        f".venv/bin/python -m pip install -q --index-url {index} --extra-index-url {DEFAULT_INDEX} {SPEC}"
    )
    assert f"CPU wheels from {index}" in result.stderr


def test_no_gpu_and_unreachable_cpu_index_falls_back_and_says_so(tmp_path: Path) -> None:
    unreachable = _closed_port_url()
    result = _dry_run(tmp_path, CAPTIONER_NVIDIA_GPU="0", CAPTIONER_CPU_INDEX_URL=unreachable)
    assert _command(result) == f".venv/bin/python -m pip install -q {SPEC}"
    assert f"{unreachable.rstrip('/')} does not answer: falling back to the default index" in result.stderr
    assert DEFAULT_INDEX in result.stderr


def test_gpu_takes_the_default_index_without_probing(tmp_path: Path, cpu_index: str) -> None:
    result = _dry_run(tmp_path, CAPTIONER_NVIDIA_GPU="1", CAPTIONER_CPU_INDEX_URL=cpu_index)
    assert _command(result) == f".venv/bin/python -m pip install -q {SPEC}"
    assert "NVIDIA GPU found" in result.stderr


def test_cpu_index_probe_works_without_curl(tmp_path: Path, cpu_index: str) -> None:
    # a PATH with only what setup.sh needs besides curl: the probe falls back to Python's urllib
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "uname"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    result = _dry_run(tmp_path, path=str(bin_dir), CAPTIONER_NVIDIA_GPU="0", CAPTIONER_CPU_INDEX_URL=cpu_index)
    assert f"--index-url {cpu_index.rstrip('/')} " in _command(result)

    result = _dry_run(tmp_path, path=str(bin_dir), CAPTIONER_NVIDIA_GPU="0", CAPTIONER_CPU_INDEX_URL=_closed_port_url())
    assert _command(result) == f".venv/bin/python -m pip install -q {SPEC}"


SHELL_SCRIPTS = sorted(p.name for p in SCRIPTS.glob("*.sh"))


@pytest.mark.parametrize("name", SHELL_SCRIPTS)
def test_scripts_parse(name: str) -> None:
    subprocess.run(["bash", "-n", str(SCRIPTS / name)], check=True, timeout=30)


def test_docker_smoke_builds_the_readme_tag() -> None:
    text = (SCRIPTS / "docker-smoke.sh").read_text()
    assert re.search(r'^IMAGE="\$\{IMAGE:-captioner\}"$', text, re.MULTILINE)
    readme = (SCRIPTS.parent / "README.md").read_text()
    assert "docker build -t captioner ." in readme


def _smoke(tmp_path: Path, bin_dir: Path) -> subprocess.CompletedProcess[str]:
    script = _copy_script(tmp_path, "docker-smoke.sh")
    _copy_script(tmp_path, "docker-daemon.sh")
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"not used")
    env = {"PATH": str(bin_dir), "APT_INSTALL": "0", "HOME": str(tmp_path)}
    return subprocess.run(
        [shutil.which("bash"), str(script), str(photo)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _bin_dir(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "id", "seq", "sleep"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    return bin_dir


def test_docker_smoke_names_the_package_for_a_missing_docker(tmp_path: Path) -> None:
    result = _smoke(tmp_path, _bin_dir(tmp_path))
    assert result.returncode == 1
    assert "docker is not installed (Debian/Ubuntu: apt-get install -y docker.io)" in result.stderr


def test_docker_smoke_names_the_package_for_a_missing_dockerd(tmp_path: Path) -> None:
    bin_dir = _bin_dir(tmp_path)
    fake_docker = bin_dir / "docker"
    fake_docker.write_text("#!/bin/sh\nexit 1\n")  # a client with no daemon to answer it
    fake_docker.chmod(0o755)
    result = _smoke(tmp_path, bin_dir)
    assert result.returncode == 1
    assert "dockerd is not installed (Debian/Ubuntu: apt-get install -y docker.io)" in result.stderr


def _gpu_check(*args: str, timeout: float = 30, venv: Path | None = None) -> subprocess.CompletedProcess[str]:
    """gpu-check.sh with ``args``, on ``venv`` (default: the environment running these tests, whatever its name)."""
    venv = venv or Path(sys.executable).parent.parent
    return subprocess.run(
        ["bash", str(SCRIPTS / "gpu-check.sh"), *args],
        env={**os.environ, "VENV": str(venv), "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _summary_rows(stdout: str) -> dict[str, list[str]]:
    """gpu-check's summary table: step -> its cells (step, status, seconds, result), in the table's order."""
    return {
        cells[0]: cells
        for line in stdout.splitlines()
        if line.startswith("| ") and (cells := [cell.strip() for cell in line.split("|")[1:]])[0] != "step"
    }


def test_gpu_check_without_data_says_so_and_fails(tmp_path: Path) -> None:
    """Nothing checked is not a pass: a CI job or a user's `&&` must not read it as one."""
    result = _gpu_check("--no-setup", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "out"))
    assert result.returncode == 1, result.stderr
    assert result.stderr == f"gpu-check: no Flickr8k at {tmp_path / 'absent'}: nothing was checked (pass --data DIR)\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "tpu"], "--device must be cuda, cuda:N or cpu, got 'tpu'"),
        (["--port", "http"], "--port must be a port number in [0, 65535] (0: a free one), got 'http'"),
        (["--port", "70000"], "--port must be a port number in [0, 65535] (0: a free one), got '70000'"),
        (["--port"], "--port needs a value (see --help)"),
        (["--scale", "300"], "--scale must be a photo count of at least 400, got '300'"),
        (["--scale", "lots"], "--scale must be a photo count of at least 400, got 'lots'"),
        (["--scale"], "--scale needs a value (see --help)"),
    ],
)
def test_gpu_check_refuses_bad_options_in_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = _gpu_check("--data", str(tmp_path), *args)
    assert result.returncode == 2 and result.stderr == f"gpu-check: {message}\n"


_BENCH_TABLE = """
| measure                            |       bare |       ours |  ratio |  goal |
|------------------------------------|------------|------------|--------|-------|
| encoder images/s                   |       13.8 |        7.8 |   56% |  70% MISSED |
| LSTM train captions/s (V=42)       |     1704.9 |     1278.1 |   75% |  50% met |
"""


def _scale_report(missed: list[str]) -> dict:
    """What bench/scale.py writes with --json, cut down to what gpu-check's summary reads."""
    return {
        "sizes": [500, 2000],
        "summary": {
            "exponent_of": "seconds",
            "largest_exponent": {"stage": "feature cache", "k": 1.31 if missed else 0.93},
            "largest_peak": {"stage": "cross-entropy epoch", "mb": 812.4},
            "missed": missed,
        },
    }


def _stand_in_venv(tmp_path: Path, scale_missed: tuple[str, ...] = ()) -> Path:
    """A VENV whose commands stand in for the real ones at once (train, eval and serve write what the summary
    reads; serve answers /caption over HTTP), whose python shows _BENCH_TABLE for the throughput bench and, for
    the scale bench, writes its JSON with ``scale_missed`` as the stages that missed a goal (its arguments go to
    scale-args.txt), and claims a CUDA device for the environment step: gpu-check's own logic, in seconds, on
    any machine."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (tmp_path / "bench.txt").write_text(_BENCH_TABLE)
    (tmp_path / "scale.json").write_text(json.dumps(_scale_report(list(scale_missed))))
    (tmp_path / "scale.txt").write_text("".join(f"| {stage} | ... | MISSED (k) |\n" for stage in scale_missed))
    scripts = {
        "python": f"""#!/bin/sh
if [ "$1" = bench/training_throughput.py ]; then cat {tmp_path / "bench.txt"}; exit 0; fi
if [ "$1" = bench/scale.py ]; then
    echo "$@" >{tmp_path / "scale-args.txt"}
    while [ $# -gt 0 ]; do case "$1" in --json) cp {tmp_path / "scale.json"} "$2"; shift 2 ;; *) shift ;; esac; done
    cat {tmp_path / "scale.txt"}; exit 0
fi
if [ "$1" = - ] && [ $# = 2 ] && [ "$2" != cpu ]; then cat >/dev/null; echo "torch stand-in"; exit 0; fi
exec {sys.executable} "$@"
""",
        "captioner-train": """#!/bin/sh
while [ $# -gt 0 ]; do case "$1" in --output-dir) out="$2"; shift 2 ;; *) shift ;; esac; done
mkdir -p "$out" && : >"$out/best.pt"
echo '{"epoch": 1, "train_loss": 3.2, "captions_per_s": 99, "val_loss": 3.0, "val_CIDEr": 0.1}' >"$out/log.jsonl"
""",
        "captioner-eval": """#!/bin/sh
while [ $# -gt 0 ]; do case "$1" in --out) out="$2"; shift 2 ;; *) shift ;; esac; done
mkdir -p "$out" && echo '{"images": 8, "metrics": {"BLEU-4": 0.1, "CIDEr": 0.2}}' >"$out/metrics.json"
""",
        "captioner-serve": f"""#!{sys.executable}
import argparse, http.server, json, signal, threading
parser = argparse.ArgumentParser()
parser.add_argument("--host")
parser.add_argument("--port", type=int)
args, _ = parser.parse_known_args()
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({{"captions": [{{"text": "a dog"}}], "timing": {{"model_ms": 3.0}}}}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
server = http.server.HTTPServer((args.host, args.port), Handler)
signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
print("serving stand-in on cpu with torch", flush=True)
print(f"Uvicorn running on http://{{args.host}}:{{server.server_address[1]}}", flush=True)
server.serve_forever()
""",
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir.parent


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_gpu_check_never_shows_ok_for_missed_goals_and_serves_on_the_port_asked(tmp_path: Path, device: str) -> None:
    """The throughput bench missed a goal: its row says MISSED, not ok; on a GPU the check fails, on CPU (toy
    sizes, goals set for a GPU) it says so and passes. ``--port`` is the port captioner-serve listens on."""
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(data / "photo.jpg")
    port = free_port()
    result = _gpu_check(
        *("--device", device, "--no-setup", "--data", str(data), "--out", str(tmp_path / "out"), "--port", str(port)),
        timeout=120,
        venv=_stand_in_venv(tmp_path),
    )
    rows = _summary_rows(result.stdout)
    assert {name: row[1] for name, row in rows.items()} == {
        "environment": "ok",
        "train": "ok",
        "eval": "ok",
        "serve": "ok",
        "throughput": "MISSED",
    }, result.stdout + result.stderr
    assert "encoder images/s 7.8 (56% of bare, goal 70% MISSED)" in rows["throughput"][3]
    assert "gpu-check: throughput missed 1 of its goals" in result.stderr
    assert f"Uvicorn running on http://127.0.0.1:{port}" in (tmp_path / "out" / "logs" / "server.log").read_text()
    last = result.stdout.splitlines()[-1]
    if device == "cpu":
        assert result.returncode == 0
        assert last.startswith("gpu-check: every step ran; throughput MISSED goals set for a GPU")
    else:
        assert result.returncode == 1
        assert last == f"gpu-check: FAILED: not passed: throughput (MISSED) (logs in {tmp_path / 'out' / 'logs'})"


@pytest.mark.parametrize(
    ("device", "missed"), [("cuda", ()), ("cuda", ("feature cache",)), ("cpu", ("feature cache",))]
)
def test_gpu_check_scale_step_runs_the_scale_bench_on_the_device(
    tmp_path: Path, device: str, missed: tuple[str, ...]
) -> None:
    """``--scale N`` runs bench/scale.py at N/4 and N photos on the device and shows how the pipeline grows; a
    stage that missed a goal makes the row MISSED, which fails the check on a GPU and is reported on CPU."""
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(data / "photo.jpg")
    result = _gpu_check(
        *("--device", device, "--no-setup", "--data", str(data), "--out", str(tmp_path / "out"), "--scale", "2000"),
        timeout=120,
        venv=_stand_in_venv(tmp_path, scale_missed=missed),
    )
    rows = _summary_rows(result.stdout)
    args = (tmp_path / "scale-args.txt").read_text().split()
    assert args[:5] == ["bench/scale.py", "--images", "500,2000", "--device", device], args
    assert args[args.index("--json") + 1] == str(tmp_path / "out" / "scale.json")
    k = "1.31" if missed else "0.93"
    expected = f"500 and 2,000 photos: wall time ~ N^{k} at most (feature cache), peak 812 MB (cross-entropy epoch)"
    assert rows["scale"][1:] == [
        "MISSED" if missed else "ok",
        rows["scale"][2],
        expected + ("; MISSED: feature cache" if missed else ""),
    ], result.stdout + result.stderr
    last, logs = result.stdout.splitlines()[-1], tmp_path / "out" / "logs"
    if device == "cuda":  # the stand-in throughput bench misses a goal too
        assert result.returncode == 1
        not_passed = "throughput (MISSED), scale (MISSED)" if missed else "throughput (MISSED)"
        assert last == f"gpu-check: FAILED: not passed: {not_passed} (logs in {logs})"
    else:
        assert result.returncode == 0
        assert last.startswith("gpu-check: every step ran; throughput and scale MISSED goals set for a GPU")


@pytest.mark.slow
def test_gpu_check_runs_every_step_on_cpu(tmp_path: Path) -> None:
    """The GPU check's CPU mode: the same steps at toy sizes, the COCO-scale step at 500 and 2,000 photos
    (``--scale 2000``), ending in a table with a row per step."""
    data = require_data("flickr8k")
    if not (Path(sys.executable).parent / "captioner-serve").exists():
        pytest.skip(f"no captioner-serve beside {sys.executable} (pip install -e '.[train,serve]')")
    out = tmp_path / "check"
    port = free_port()
    args = ("--device", "cpu", "--no-setup", "--data", str(data), "--out", str(out), "--port", str(port))
    result = _gpu_check(*args, "--scale", "2000", timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = _summary_rows(result.stdout)
    results = {name: row[3] for name, row in rows.items()}
    # at toy sizes on CPU the bench's GPU goals may be missed: then the row says so, never ok
    throughput = "MISSED" if "MISSED" in results["throughput"] else "ok"
    # the same for the scale step: at 500 and 2,000 photos on a shared CPU, fixed costs and other jobs can push a
    # stage's measured exponent past 1.15 (seen once in the suite under load); the row must then say so
    scale_status = "MISSED" if "MISSED" in results["scale"] else "ok"
    assert [row[:2] for row in rows.values()] == [
        ["environment", "ok"],
        ["train", "ok"],
        ["eval", "ok"],
        ["serve", "ok"],
        ["throughput", throughput],
        ["scale", scale_status],
    ], result.stdout
    assert f"Uvicorn running on http://127.0.0.1:{port}" in (out / "logs" / "server.log").read_text()
    assert "AMP off" in results["environment"]
    assert results["train"].startswith("1 epoch on 16 images: loss ") and "val CIDEr" in results["train"]
    assert results["eval"].startswith("8 test images, beam 3: BLEU-4 ")
    assert results["serve"].startswith('cpu with torch: "')  # a caption came back through /caption
    assert "encoder images/s" in results["throughput"] and "LSTM train captions/s" in results["throughput"]
    assert re.fullmatch(
        r"500 and 2,000 photos: CPU time ~ N\^[0-9.]+ at most \(.+\), peak [0-9,]+ MB \(.+?\)(; MISSED: .+)?",
        results["scale"],
    )
    scale = json.loads((out / "scale.json").read_text())
    assert scale["sizes"] == [500, 2000] and set(scale["stages"]) >= {"feature cache", "cross-entropy epoch"}
    assert (out / "train" / "best.pt").is_file() and (out / "eval" / "metrics.json").is_file()
    assert "captioner-serve exited with status 0 after SIGTERM" in (out / "logs" / "serve.log").read_text()


@pytest.mark.slow
def test_serve_sh_serves_the_default_model(tmp_path: Path) -> None:
    """The README's first command as a newcomer meets it: ``scripts/serve.sh --port P`` with an empty export cache
    (the first start exports the model to ONNX) answers a caption, prints a handful of lines and no third-party
    warnings, and Ctrl-C stops it with one line and status 130."""
    httpx = pytest.importorskip("httpx")
    if Path(sys.executable).parents[1] != SCRIPTS.parent / ".venv":
        pytest.skip("serve.sh sets up this clone's .venv; these tests run from another environment")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_")}
    env.update(CAPTIONER_CACHE_DIR=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    server = subprocess.Popen(
        ["bash", str(SCRIPTS / "serve.sh"), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    photo = io.BytesIO()
    Image.linear_gradient("L").convert("RGB").resize((320, 240)).save(photo, "JPEG")
    try:
        deadline = time.monotonic() + 420  # setup (a no-op once installed) and the first-start export
        while True:
            assert server.poll() is None, f"serve.sh exited {server.returncode}:\n{server.stdout.read()}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "serve.sh was not ready within 7 minutes"
            time.sleep(1)
        reply = httpx.post(f"{url}/caption", files={"image": ("photo.jpg", photo.getvalue())}, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["captions"][0]["text"]
        server.send_signal(signal.SIGINT)  # Ctrl-C
        output, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    lines = output.splitlines()
    assert server.returncode == 130, output
    assert lines[-1] == "captioner-serve: interrupted", output
    assert "Traceback" not in output and "Warning" not in output and "warn(" not in output, output
    assert not [line for line in lines if "onnx_ir" in line or "onnxscript" in line], output
    assert len(lines) <= 15, f"{len(lines)} lines on a first start:\n{output}"


def test_serve_sh_installs_the_client_too_and_passes_its_arguments_on(tmp_path: Path) -> None:
    script = _copy_script(tmp_path, "serve.sh")
    calls = tmp_path / "calls"
    (tmp_path / "scripts" / "setup.sh").write_text(f'#!/usr/bin/env bash\necho "setup.sh $*" >> {calls}\n')
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "captioner-serve").write_text(f'#!/usr/bin/env bash\necho "serve $*" >> {calls}\n')
    for stub in (tmp_path / "scripts" / "setup.sh", tmp_path / ".venv" / "bin" / "captioner-serve"):
        stub.chmod(0o755)
    subprocess.run(["bash", str(script), "--port", "9000"], check=True, timeout=30)
    # the README uses the Python client (the client extra) right after serve.sh
    assert calls.read_text().splitlines() == ["setup.sh serve,client", "serve --port 9000"]
