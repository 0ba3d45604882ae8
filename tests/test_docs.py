"""The README's and docs' commands, run, so the docs cannot rot the way the Docker path once did.

Every fenced ``bash`` block in README.md, MODEL_CARD.md and docs/*.md says how it is tested, in its info string:

- ``run``: executed here, as a user would paste it, in a scratch folder that holds ``photo.jpg``, ``photos/`` (three
  photos), and links to this clone's ``.venv``, ``scripts``, ``deploy`` and ``configs``; port 8000 becomes a free port.
  ``with-server``: a ``captioner-serve`` is started on that port first (the README's first command);
  ``needs=flickr8k``: ``data/flickr8k`` links to ../shared/data/flickr8k, and the block skips without it.
- ``run-by=tests/FILE.py::TEST``: a test that runs it (or its equivalent with a scratch set-up); checked to exist.
- ``no-run="reason"``: nothing here can run it (a cluster, a GPU, hours of training); the reason is shown.

The ``yaml`` blocks of docs/deploy.md are checked too: the Ingress against the Kubernetes schema and the Service it
names, the Prometheus scrape job against the pod annotations it reads.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from markdown_it import MarkdownIt
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "MODEL_CARD.md", *sorted((ROOT / "docs").glob("*.md"))]
FLICKR8K = ROOT.parent / "shared" / "data" / "flickr8k"
# real photos when the shared data is here (two dogs in snow first, docker-smoke's photo); generated ones otherwise
PHOTOS = ["3385593926_d3e9c21170.jpg", "1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg"]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
DOCUMENTED_PORT = "8000"


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    marks: dict[str, str]  # run, with-server, needs, run-by, no-run
    text: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _marks(info: str) -> dict[str, str]:
    marks = {}
    for word in shlex.split(info)[1:]:
        key, _, value = word.partition("=")
        marks[key] = value
    return marks


def fenced_blocks(path: Path) -> list[Block]:
    tokens = MarkdownIt("commonmark").parse(path.read_text())
    blocks = []
    for token in tokens:
        if token.type == "fence" and token.info.strip():
            language = token.info.split()[0]
            assert token.map is not None
            blocks.append(Block(path, token.map[0] + 1, language, _marks(token.info), token.content))
    return blocks


ALL_BLOCKS = [block for doc in DOCS for block in fenced_blocks(doc)]
SHELL_BLOCKS = [b for b in ALL_BLOCKS if b.language in SHELL_LANGUAGES]
RUN_BLOCKS = [b for b in SHELL_BLOCKS if "run" in b.marks]


def test_the_docs_have_blocks_to_check() -> None:
    assert len(SHELL_BLOCKS) >= 15 and len(RUN_BLOCKS) >= 6, [b.name for b in SHELL_BLOCKS]


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=lambda b: b.name)
def test_every_shell_block_says_how_it_is_tested(block: Block) -> None:
    assert block.language == "bash", f"{block.name}: write shell blocks as ```bash"
    ways = {"run", "run-by", "no-run"} & block.marks.keys()
    assert len(ways) == 1, f'{block.name}: mark the block with one of run, run-by=TEST, no-run="reason"'
    unknown = block.marks.keys() - {"run", "run-by", "no-run", "with-server", "needs"}
    assert not unknown, f"{block.name}: unknown marks {sorted(unknown)}"
    if "no-run" in block.marks:
        assert len(block.marks["no-run"].split()) >= 3, f"{block.name}: say why no test can run it"
    if "run-by" in block.marks:
        file, _, test = block.marks["run-by"].partition("::")
        assert (ROOT / file).is_file(), f"{block.name}: no test file {file}"
        assert re.search(rf"^def {re.escape(test)}\(", (ROOT / file).read_text(), re.MULTILINE), (
            f"{block.name}: {file} has no test {test}"
        )
    if "with-server" in block.marks or "needs" in block.marks:
        assert "run" in block.marks, f"{block.name}: with-server and needs go with run"


# ---- running the `run` blocks -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _photos(folder: Path) -> list[Path]:
    folder.mkdir()
    made = []
    for i, name in enumerate(PHOTOS):
        target = folder / f"photo{i}.jpg"
        if (FLICKR8K / "images" / name).is_file():
            target.write_bytes((FLICKR8K / "images" / name).read_bytes())
        else:  # any photo will do for a command to work: a gradient
            Image.linear_gradient("L").convert("RGB").resize((320, 240 + 20 * i)).save(target)
        made.append(target)
    return made


@pytest.fixture(scope="module")
def export_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ONNX export cache for all blocks: the first that needs an export makes it (as a user's first run)."""
    return tmp_path_factory.mktemp("captioner-cache")


def _workspace(tmp_path: Path, block: Block) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    venv = Path(sys.executable).parents[1]  # the environment running these tests
    (work / ".venv").symlink_to(venv)
    for name in ("scripts", "deploy", "configs"):
        (work / name).symlink_to(ROOT / name)
    photos = _photos(work / "photos")
    (work / "photo.jpg").write_bytes(photos[0].read_bytes())
    if block.marks.get("needs") == "flickr8k":
        if not (FLICKR8K / "captions.txt").is_file() and not FLICKR8K.is_dir():
            pytest.skip(f"{block.name} needs Flickr8k at {FLICKR8K}")
        (work / "data").mkdir()
        (work / "data" / "flickr8k").symlink_to(FLICKR8K)
    elif "needs" in block.marks:
        raise AssertionError(f"{block.name}: unknown needs={block.marks['needs']}")
    return work


def _stop(process: subprocess.Popen) -> None:
    """Stop a block's shell and everything it started in the background (servers, torchrun's workers)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture
def server_for(export_cache: Path) -> Iterator:
    started: list[subprocess.Popen] = []

    def start(work: Path, port: int, env: dict[str, str]) -> None:
        log = open(work.parent / "server.log", "w")  # noqa: SIM115 - closed with the process
        started.append(
            subprocess.Popen(
                [str(work / ".venv" / "bin" / "captioner-serve"), "--port", str(port)],
                cwd=work,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    yield start
    for process in started:
        _stop(process)


@pytest.mark.slow
@pytest.mark.parametrize("block", RUN_BLOCKS, ids=lambda b: b.name)
def test_run_block(block: Block, tmp_path: Path, export_cache: Path, server_for) -> None:
    if "scripts/" in block.text and Path(sys.executable).parents[1] != ROOT / ".venv":
        pytest.skip("the scripts set up this clone's .venv; these tests run from another environment")
    work = _workspace(tmp_path, block)
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_")},
        "HOME": str(tmp_path / "home"),
        "CAPTIONER_CACHE_DIR": str(export_cache),
        "PYTHONUNBUFFERED": "1",
    }
    if "with-server" in block.marks:
        server_for(work, port, env)
    script = re.sub(rf"\b{DOCUMENTED_PORT}\b", str(port), block.text)
    started = time.monotonic()
    process = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        _stop(process)
        out, err = process.communicate()
        pytest.fail(f"{block.name} ran past 600 s\n{out[-2000:]}\n{err[-2000:]}")
    finally:
        _stop(process)
    took = time.monotonic() - started
    report = f"{block.name} exited {process.returncode} after {took:.0f} s\n--- stdout\n{out[-3000:]}"
    report += f"\n--- stderr\n{err[-3000:]}"
    assert process.returncode == 0, report
    assert "Traceback" not in out + err, report


# ---- the yaml blocks of docs/deploy.md -----------------------------------------------------------------------------


def _yaml_blocks(path: Path) -> list[dict]:
    return [yaml.safe_load(b.text) for b in fenced_blocks(path) if b.language == "yaml"]


def test_the_ingress_example_is_valid_and_names_the_service() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    (ingress,) = [doc for doc in _yaml_blocks(ROOT / "docs" / "deploy.md") if doc.get("kind") == "Ingress"]
    kubernetes_validate.validate(ingress, kubernetes_validate.latest_version(), strict=True)
    service = yaml.safe_load((ROOT / "deploy" / "k8s" / "base" / "service.yaml").read_text())
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == service["metadata"]["name"]
            assert backend["port"].get("name") in port_names or backend["port"].get("number") in {
                p["port"] for p in service["spec"]["ports"]
            }


def test_the_prometheus_job_reads_the_annotations_the_pods_carry() -> None:
    (config,) = [doc for doc in _yaml_blocks(ROOT / "docs" / "deploy.md") if "scrape_configs" in doc]
    deployment = yaml.safe_load((ROOT / "deploy" / "k8s" / "base" / "deployment.yaml").read_text())
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    # Prometheus exposes a pod annotation as __meta_kubernetes_pod_annotation_<name, non-alphanumerics as _>
    prefix = "__meta_kubernetes_pod_annotation_"
    exposed = {prefix + re.sub(r"[^a-zA-Z0-9_]", "_", k): v for k, v in annotations.items()}
    (job,) = config["scrape_configs"]
    read = {label for rule in job["relabel_configs"] for label in rule["source_labels"]}
    wanted = {label for label in read if label.startswith("__meta_kubernetes_pod_annotation_")}
    assert wanted and wanted <= exposed.keys(), sorted(wanted - exposed.keys())
    keep = next(rule for rule in job["relabel_configs"] if rule.get("action") == "keep")
    assert re.fullmatch(keep["regex"], exposed[keep["source_labels"][0]])


# ---- links between the docs --------------------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (but - and _), spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    tokens = MarkdownIt("commonmark").parse(path.read_text())
    return {_slug(tokens[i + 1].content) for i, t in enumerate(tokens) if t.type == "heading_open"}


def _links(path: Path) -> list[str]:
    tokens = MarkdownIt("commonmark").parse(path.read_text())
    found = []
    for token in tokens:
        for child in token.children or []:
            if child.type == "link_open":
                found.append(str(child.attrGet("href")))
            elif child.type == "image":
                found.append(str(child.attrGet("src")))
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_between_the_docs_lead_somewhere(doc: Path) -> None:
    broken = []
    for href in _links(doc):
        if re.match(r"^[a-z]+:", href):  # http:, https:, mailto: - outside this repository
            continue
        target, _, anchor = href.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        if not path.exists():
            broken.append(f"{href}: no file {path}")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{href}: no heading #{anchor} in {path.name}")
    assert not broken, broken
