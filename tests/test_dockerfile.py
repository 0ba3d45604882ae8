"""The Dockerfile, checked without Docker where it can be, and built for real where a daemon can be started.

The dependency layer installs ``pyproject.toml``'s dependencies with empty stand-ins for the project's packages, so
that code changes do not reinstall PyTorch. It broke once without any test noticing: the build came to read the
version from the package, and the stand-ins had none. Here that step is read out of the Dockerfile (not copied) and
run as written, in a temp folder laid out as the image's working directory, with ``pip`` standing for a shim that
builds the project from the stand-ins (what fails when the layer drifts from ``pyproject.toml``) instead of
downloading its dependencies.
"""

from __future__ import annotations

import email.parser
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement

import captioner

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")

# pip, as the RUN step calls it: `install` builds the named projects without dependencies or an index,
# `uninstall` succeeds only for a project that was built; every call is logged for the assertions.
_PIP_SHIM = textwrap.dedent(
    """\
    #!{python}
    import glob, json, os, subprocess, sys

    args = sys.argv[1:]
    with open(os.environ["PIP_SHIM_LOG"], "a") as log:
        log.write(json.dumps(args) + "\\n")
    wheels = os.environ["PIP_SHIM_WHEELS"]
    takes_value = {{"-i", "--index-url", "--extra-index-url", "-f", "--find-links", "--cert"}}
    names, skip = [], False
    for arg in args[1:]:
        if skip:
            skip = False
        elif arg in takes_value:
            skip = True
        elif not arg.startswith("-"):
            names.append(arg)
    if args[:1] == ["install"]:
        command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
        sys.exit(subprocess.call([*command, "-w", wheels, *names]))
    if args[:1] == ["uninstall"]:
        missing = [n for n in names if not glob.glob(os.path.join(wheels, n.replace("-", "_") + "-*.whl"))]
        sys.exit(f"pip shim: {{', '.join(missing)}} was never installed" if missing else 0)
    sys.exit(f"pip shim: the replayed step runs pip {{' '.join(args)}}, which the shim does not know")
    """
)


@dataclass(frozen=True)
class DependencyStep:
    """The Dockerfile's stand-in install: the files copied for it, the RUN command, and the build's defaults."""

    workdir: PurePosixPath
    copies: list[tuple[list[str], str]]  # (sources in the build context, destination) per COPY
    command: str
    build_args: dict[str, str]


def dependency_step(dockerfile_text: str) -> DependencyStep:
    """The first image's dependency step (:func:`dependency_steps`)."""
    return dependency_steps(dockerfile_text)[0]


def dependency_steps(dockerfile_text: str) -> list[DependencyStep]:
    """Each image's stand-in install: a ``COPY`` of pyproject.toml, the ``COPY`` lines right after it, and the ``RUN``
    that follows, in the order the Dockerfile's stages hold them."""
    parser = DockerfileParser(fileobj=io.BytesIO(dockerfile_text.encode()))
    instructions = [i for i in parser.structure if i["instruction"] != "COMMENT"]
    is_pyproject_copy = [
        i["instruction"] == "COPY" and "pyproject.toml" in i["value"].split()[:-1] for i in instructions
    ]
    assert any(is_pyproject_copy), "the Dockerfile never copies pyproject.toml"
    positions = [i for i, copy in enumerate(is_pyproject_copy) if copy]
    return [_dependency_step_at(instructions, position, dict(parser.args)) for position in positions]


def _dependency_step_at(instructions: list[dict], position: int, build_args: dict[str, str]) -> DependencyStep:
    workdir = PurePosixPath("/")
    for instruction in instructions[:position]:
        if instruction["instruction"] == "FROM":  # a new stage starts from its base's working directory
            workdir = PurePosixPath("/")
        elif instruction["instruction"] == "WORKDIR":
            workdir = workdir / instruction["value"]
    copies = []
    for instruction in instructions[position:]:
        if instruction["instruction"] != "COPY":
            break
        words = [w for w in shlex.split(instruction["value"]) if not w.startswith("--")]
        copies.append((words[:-1], words[-1]))
    run = instructions[position + len(copies)]
    assert run["instruction"] == "RUN", f"after the dependency COPY lines comes {run['instruction']}, not RUN"
    return DependencyStep(workdir, copies, run["value"], build_args)


@dataclass(frozen=True)
class Replay:
    result: subprocess.CompletedProcess[str]
    pip_calls: list[list[str]]
    wheels: list[Path]
    left_behind: set[str]  # what the step left in the working directory


def replay(step: DependencyStep, context: Path, tmp_path: Path) -> Replay:
    """Run ``step`` as the build would: its files copied into a working directory, its command under ``sh -c``."""
    workdir = tmp_path / "image" / step.workdir.relative_to("/")
    workdir.mkdir(parents=True)
    for sources, destination in step.copies:
        target = workdir / destination
        for source in sources:
            path = context / source
            if path.is_dir():
                shutil.copytree(path, target, dirs_exist_ok=True)
            else:
                into = target / path.name if destination.endswith("/") else target
                into.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, into)
    shim_dir, wheels, log = tmp_path / "shim", tmp_path / "wheels", tmp_path / "pip-calls.jsonl"
    shim_dir.mkdir()
    wheels.mkdir()
    (shim_dir / "pip").write_text(_PIP_SHIM.format(python=sys.executable))
    (shim_dir / "pip").chmod(0o755)
    env = {
        **step.build_args,
        "PATH": f"{shim_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "PIP_SHIM_LOG": str(log),
        "PIP_SHIM_WHEELS": str(wheels),
    }
    result = subprocess.run(
        ["/bin/sh", "-c", step.command], cwd=workdir, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return Replay(result, calls, sorted(wheels.glob("*.whl")), {p.name for p in workdir.iterdir()})


def _requires(wheel: Path) -> tuple[dict[str, str], list[Requirement]]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(archive.read(name).decode())
    return dict(metadata.items()), [Requirement(r) for r in metadata.get_all("Requires-Dist") or []]


@pytest.mark.parametrize("stage", [0, 1], ids=["full", "slim"])
def test_the_dependency_step_builds_the_project_from_its_stand_ins(tmp_path: Path, stage: int) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    build_requires = [Requirement(r) for r in project["build-system"]["requires"]]
    import setuptools

    assert all(r.specifier.contains(setuptools.__version__) for r in build_requires if r.name == "setuptools"), (
        f"the replay builds with this environment's setuptools {setuptools.__version__}, which {build_requires} refuse"
    )
    steps = dependency_steps((ROOT / "Dockerfile").read_text())
    assert len(steps) == 2, "the full and the slim image each install their dependencies"
    done = replay(steps[stage], ROOT, tmp_path)
    assert done.result.returncode == 0, f"the Dockerfile's dependency step fails:\n{done.result.stderr[-3000:]}"

    installs = [call for call in done.pip_calls if call[0] == "install"]
    assert len(installs) == 1 and installs[0][-1].startswith(".["), done.pip_calls
    assert done.pip_calls[-1] == ["uninstall", "-y", project["project"]["name"]], "the stand-in project is removed"
    assert len(done.wheels) == 1, done.wheels
    metadata, requires = _requires(done.wheels[0])
    assert metadata["Name"] == project["project"]["name"]
    assert metadata["Version"] == captioner.__version__

    # every dependency of the extras the image installs (and the base) reaches pip through this layer
    extras = installs[0][-1].removeprefix(".[").removesuffix("]").split(",")
    declared = {str(Requirement(r)) for r in project["project"]["dependencies"]}
    for extra in extras:
        declared |= {str(Requirement(r)) for r in project["project"]["optional-dependencies"][extra]}
    in_wheel = {str(Requirement(str(r).split(";")[0].strip())) for r in requires}
    assert declared <= in_wheel, sorted(declared - in_wheel)

    # the stand-ins and the build's leftovers are gone before the real code is copied over them
    assert done.left_behind == {"pyproject.toml", "README.md"}, sorted(done.left_behind)


def test_the_replay_fails_when_the_build_cannot_read_the_version(tmp_path: Path) -> None:
    """The check itself: with a version file that holds no version (as the stand-ins were before the fix), the
    replayed step fails as ``docker build`` did."""
    context = tmp_path / "context"
    for sources, _ in dependency_step((ROOT / "Dockerfile").read_text()).copies:
        for source in sources:
            (context / source).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / source, context / source)
    (context / "captioner" / "_version.py").write_text('"""No version here."""\n')
    done = replay(dependency_step((ROOT / "Dockerfile").read_text()), context, tmp_path)
    assert done.result.returncode != 0
    assert "__version__" in done.result.stderr, done.result.stderr[-2000:]


@pytest.mark.slow
def test_the_image_builds_and_serves_a_caption() -> None:
    """scripts/docker-smoke.sh end to end (build, run, caption, health, drain) where a Docker daemon can be had."""
    daemon = subprocess.run(
        ["bash", str(ROOT / "scripts" / "docker-daemon.sh")], capture_output=True, text=True, timeout=600, check=False
    )
    if daemon.returncode != 0:
        pytest.skip(f"no Docker daemon here: {daemon.stderr.strip()}")
    if not (ROOT.parent / "shared" / "data" / "flickr8k" / "images").is_dir():
        pytest.skip("docker-smoke's photo (../shared/data/flickr8k) is absent")
    before = _image_id("captioner")
    smoke = subprocess.run(
        ["bash", str(ROOT / "scripts" / "docker-smoke.sh")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=2400,
        check=False,
    )
    tail = smoke.stdout[-4000:] + smoke.stderr[-2000:]
    assert smoke.returncode == 0, tail
    assert "docker-smoke: passed" in smoke.stdout, tail
    assert "image: captioner, " in smoke.stdout and " GB" in smoke.stdout, tail
    # the slim image: no torch, within its size and memory limits (docker-smoke fails beyond them), the same caption
    assert "no torch in the slim image" in smoke.stdout and "slim image: captioner:slim, " in smoke.stdout, tail
    assert "the same caption as the full image" in smoke.stdout, tail
    caption = next(line for line in smoke.stdout.splitlines() if line.startswith("caption of "))
    assert "dog" in caption, caption
    # a rebuild leaves no 6 GB untagged copy of the image it replaced behind (it filled CI's disk)
    after = _image_id("captioner")
    if before and after != before:
        assert _image_id(before) == "", f"the replaced image {before[:19]} is still there"
    # nor the export stage's image, which would keep the replaced full image's layers alive
    left = subprocess.run(
        ["docker", "images", "-q", "--filter", "label=captioner.stage=export"], capture_output=True, text=True
    )
    assert left.returncode == 0 and left.stdout.strip() == "", left.stdout


def _image_id(reference: str) -> str:
    """The image ID a tag or ID names, or "" when there is none."""
    found = subprocess.run(
        ["docker", "image", "inspect", "-f", "{{.Id}}", reference], capture_output=True, text=True, check=False
    )
    return found.stdout.strip() if found.returncode == 0 else ""
