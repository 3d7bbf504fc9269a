"""Fuzzed configs: any override of any key with a value of any type, and unknown keys, either load or raise
a ConfigError naming the offending key; nothing else escapes (no TypeError, no traceback from deep inside)."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rvpo_async.config import Config, ConfigError, load_config


def _leaf_keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out += _leaf_keys(tp, key + ".")
        else:
            out.append(key)
    return out


KEYS = _leaf_keys(Config)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _override(key: str, value: object) -> str:
    return f"{key}={yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix('...').strip()}"


def test_the_fuzzed_tree_covers_every_section() -> None:
    sections = {k.split(".")[0] for k in KEYS}
    assert sections == {f.name for f in dataclasses.fields(Config)}
    assert len(KEYS) > 60


@SETTINGS
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_any_value_for_any_key_loads_or_names_the_key(key: str, value: object) -> None:
    try:
        load_config(None, [_override(key, value)])
    except ConfigError as e:
        # the message names the key, or (cross-section rules) the section of the key that broke a rule
        assert key in str(e) or key.split(".")[0] in str(e), (key, value, str(e))


@SETTINGS
@given(key=st.sampled_from(KEYS), suffix=st.from_regex(r"[a-z_]{1,8}", fullmatch=True), value=SCALARS)
def test_unknown_keys_are_refused_by_name(key: str, suffix: str, value: object) -> None:
    bad = f"{key}_{suffix}"
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(None, [_override(bad, value)])


@SETTINGS
@given(section=st.sampled_from([f.name for f in dataclasses.fields(Config)]), value=SCALARS)
def test_a_section_replaced_by_a_scalar_is_refused_by_name(section: str, value: object) -> None:
    with pytest.raises(ConfigError, match=section):
        load_config(None, [_override(section, value)])
