"""The fuzz target in fuzz/ (every parser of outside input: the peer's answers, the stored
chain state, the link addresses, a quPSKd config): a derandomized hypothesis pass and a short
run of its own mutation loop. Any input is refused with the parser's typed error or parsed."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


def _fuzz_target() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_qupskd_wire.py"
    spec = importlib.util.spec_from_file_location("fuzz_qupskd_wire", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FUZZ = _fuzz_target()


@settings(derandomize=True, max_examples=600, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_target_only_refuses_with_typed_errors(data: bytes) -> None:
    FUZZ.target(data)


@settings(derandomize=True, max_examples=200, deadline=None)
@given(st.sampled_from(range(len(FUZZ.PARSERS))), st.sampled_from(["[", "{a=", '{"a":']))
def test_deep_nesting_is_a_typed_refusal(which: int, opening: str) -> None:
    FUZZ.target(bytes([which]) + opening.encode() * 6000)


def test_the_seeds_parse() -> None:
    """The seeds are accepted (so mutations of them explore past the first check)."""
    for seed in FUZZ.SEEDS:
        FUZZ.PARSERS[seed[0]](seed[1:])


@pytest.mark.parametrize("port", ["²", "٣", "-1", "0", "65536", "", "9" * 5000, "0" * 6 + "80"])
def test_a_listen_port_that_is_not_ascii_digits_in_range_is_refused(port: str) -> None:
    from qkdagent_qupskd import settings as link_settings

    assert isinstance(link_settings.split_listen(f"127.0.0.1:{port}"), str)


def test_the_mutation_loop_runs(capsys: pytest.CaptureFixture[str]) -> None:
    FUZZ.main(1.0)
    assert "no crash" in capsys.readouterr().out
