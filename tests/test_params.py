"""serialize_params / deserialize_params keep the original layer's semantics."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vmctl import Param, deserialize_params, serialize_params


def test_serialize_rules() -> None:
    params = [Param("", ""), Param("", "quiet"), Param("ro", ""), Param("console", "ttyS0")]
    assert serialize_params(params, "=") == ["quiet", "ro", "console=ttyS0"]
    assert serialize_params([Param("-rtc", "base=utc")], "") == ["-rtc", "base=utc"]


def test_deserialize_rules() -> None:
    assert deserialize_params(["a=b", "", "flag", "k=v=w", "e="]) == [
        Param("a", "b"), Param("flag", ""), Param("k", "v=w"), Param("e", ""),
    ]  # fmt: skip


keys = st.text(st.characters(blacklist_characters="=\x00", blacklist_categories=("Cs",)), min_size=1)


@given(st.lists(st.tuples(keys, st.text(min_size=1))))
def test_round_trip(pairs: list[tuple[str, str]]) -> None:
    params = [Param(k, v) for k, v in pairs]
    assert deserialize_params(serialize_params(params, "=")) == params
