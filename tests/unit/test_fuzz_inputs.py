"""Fuzzed bad input that is not a config: whatever a judge returns or raises, and whatever happens to the bytes of
a checkpoint, the result is a masked entry or a CheckpointError that names the judge or the file."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.judges.factory import evaluate, run_judge
from learner import checkpoint as ck
from rvpo_async.types import Prompt

PROMPT = Prompt("p0", "prompt", (1, 2, 3), {})
ANYTHING = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                     st.text(max_size=8), st.binary(max_size=8), st.lists(st.floats(), max_size=3),
                     st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.builds(object),
                     st.complex_numbers(), st.decimals(allow_nan=True, allow_infinity=True),
                     st.fractions())
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclasses.dataclass(frozen=True)
class Returns:
    value: Any
    name: str = "fuzzed"
    low: float = 0.0
    high: float = 1.0

    def score(self, prompt: Prompt, sample_text: str) -> Any:
        return self.value


@dataclasses.dataclass(frozen=True)
class Raises:
    exc: BaseException
    name: str = "fuzzed"
    low: float = 0.0
    high: float = 1.0

    def score(self, prompt: Prompt, sample_text: str) -> float:
        raise self.exc


@SETTINGS
@given(value=ANYTHING)
def test_any_judge_output_is_a_score_in_range_or_masked_naming_the_judge(value: Any) -> None:
    res = evaluate(Returns(value), PROMPT, "text")
    if res.status == "ok":
        assert isinstance(res.value, float) and math.isfinite(res.value) and 0.0 <= res.value <= 1.0
    else:
        assert res.status == "invalid" and "'fuzzed'" in res.reason, res


@SETTINGS
@given(exc=st.sampled_from([ValueError("x"), KeyError("k"), ZeroDivisionError(), RecursionError(), TimeoutError(),
                            OSError(5, "io"), UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), MemoryError()]))
def test_any_exception_in_a_judge_masks_its_entry_naming_it(exc: BaseException) -> None:
    res = run_judge(Raises(exc), PROMPT, "text", timeout_s=5.0)
    assert res.status == "error" and "'fuzzed'" in res.reason and type(exc).__name__ in res.reason


def _checkpoint(root: Path) -> Path:
    import torch

    tmp = ck.begin(root, 1)
    (tmp / "model.safetensors").write_bytes(b"w" * 256)
    torch.save({"master": [torch.arange(8.0)]}, tmp / "optimizer_rank0.pt")
    ck.write_json(tmp / "learner_state.json", {"version": 1, "world_size": 1, "zero_stage": 2})
    ck.write_json(tmp / "extra.json", {"next_group_id": 8})
    return ck.finalize(root, tmp, 1, 2)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "root")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["model.safetensors", "optimizer_rank0.pt", "learner_state.json", "extra.json",
                             "manifest.json"]),
       how=st.sampled_from(["flip", "truncate", "append", "empty"]), where=st.floats(0, 1, exclude_max=True),
       data=st.data())
def test_any_damage_to_a_checkpoint_file_is_an_error_naming_it_or_harmless(pristine: Path, tmp_path_factory, name: str, how: str,
                                                               where: float, data: st.DataObject) -> None:
    root = tmp_path_factory.mktemp("damaged") / "root"
    shutil.copytree(pristine.parent, root)
    target = root / pristine.name / name
    raw = target.read_bytes()
    i = int(where * len(raw))
    if how == "flip":
        raw = raw[:i] + bytes([raw[i] ^ data.draw(st.integers(1, 255))]) + raw[i + 1:]
    elif how == "truncate":
        raw = raw[:i]
    elif how == "append":
        raw = raw + data.draw(st.binary(min_size=1, max_size=16))
    else:
        raw = b""
    target.write_bytes(raw)
    try:
        loaded = ck.load(root)
    except ck.CheckpointError as e:
        assert str(target.parent) in str(e)
        return
    # only the manifest itself is not hashed: a change that leaves its JSON meaning intact is harmless
    assert name == "manifest.json", f"damage ({how}) to {name} went unnoticed"
    good = ck.load(pristine.parent)
    assert (loaded.step, loaded.state, loaded.extra) == (good.step, good.state, good.extra)


@pytest.mark.parametrize("edit", [("\"bytes\"", "\"bytez\""), ("\"sha256\"", "\"sha257\""), ("\"files\"", "\"filez\""),
                                  ("\"step\"", "\"stop\"")])
def test_a_manifest_that_is_valid_json_but_not_a_manifest_is_an_error_naming_it(pristine: Path, tmp_path_factory,
                                                                                edit: tuple[str, str]) -> None:
    """A flipped byte that renames a key keeps the manifest valid JSON (found by the fuzz test above)."""
    root = tmp_path_factory.mktemp("renamed") / "root"
    shutil.copytree(pristine.parent, root)
    manifest = root / pristine.name / "manifest.json"
    text = manifest.read_text()
    assert edit[0] in text
    manifest.write_text(text.replace(edit[0], edit[1]))
    with pytest.raises(ck.CheckpointError, match="manifest.json is not a checkpoint manifest"):
        ck.load(root)
