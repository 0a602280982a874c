"""The pytest plugin's logging guard: no test leaves a handler on a closed stream behind.

Each case runs a small pytest session (pytester, in-process): a first test configures logging
the way a CLI entry point run in-process does (root handler on the test's captured stderr), and
a later test logs. Without the guard the later record hits the stream pytest closed after the
first test and prints "--- Logging error --- ... I/O operation on closed file" (hundreds of them
in a full run, before the guard).
"""

from __future__ import annotations

import pytest

GUARDED = 'pytest_plugins = ["qkdagent.testing.pytest_plugin"]\n'

LATER = """
def test_later_records_reach_no_closed_stream(capsys):
    logging.getLogger("qkdagent.later").warning("a record after the first test")
    err = capsys.readouterr().err
    assert "Logging error" not in err, err
    root = logging.getLogger()
    assert not [h for h in root.handlers if getattr(getattr(h, "stream", None), "closed", 0)]
"""

CLI_STYLE = """
def test_configures_logging_like_the_cli(capsys):
    # `qkdagent check` run in-process: setup_logging points the root logger at sys.stderr,
    # which is capsys's stream here; set explicitly too, whatever setup_logging does today
    setup_logging("text")
    logging.getLogger().handlers[:] = [logging.StreamHandler(sys.stderr)]
    logging.getLogger("httpx").setLevel(logging.CRITICAL)
    logging.getLogger("qkdagent.first").warning("while captured")
    assert "while captured" in capsys.readouterr().err
"""


def run(pytester: pytest.Pytester, conftest: str, tests: str) -> pytest.RunResult:
    pytester.makeconftest(conftest)
    header = "import logging\nimport sys\n\nfrom qkdagent.logsetup import setup_logging\n"
    pytester.makepyfile(test_order=header + tests + LATER)
    return pytester.runpytest("-p", "no:cacheprovider")


def test_cli_style_logging_setup_is_undone_after_the_test(pytester: pytest.Pytester) -> None:
    levels = """
def test_levels_are_back():
    assert logging.getLogger("httpx").level == logging.NOTSET
    assert logging.getLogger().level == logging.WARNING
"""
    result = run(pytester, GUARDED, CLI_STYLE + levels)
    result.assert_outcomes(passed=3)


def test_without_the_guard_the_later_test_hits_the_closed_stream(pytester: pytest.Pytester) -> None:
    """The scenario above does reproduce the defect: the guard is what fixes it."""
    result = run(pytester, "", CLI_STYLE)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*Logging error*", "*I/O operation on closed file*"])


def test_a_handler_left_on_a_new_logger_fails_the_test_that_left_it(
    pytester: pytest.Pytester,
) -> None:
    """A logger created during the test is not restored (its module may own it), so a handler
    on a closed stream left there is detached and reported instead of flooding later tests."""
    tests = """
def test_leaves_a_handler_on_a_new_logger(capsys):
    logging.getLogger("made.here").addHandler(logging.StreamHandler(sys.stderr))

def test_new_logger_was_cleaned(capsys):
    logging.getLogger("made.here").warning("after")
    err = capsys.readouterr().err
    assert "Logging error" not in err, err
"""
    result = run(pytester, GUARDED, tests)
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaves_a_handler_on_a_new_logger*",
            "*logging handler left on a closed stream (now detached)*made.here*",
        ]
    )
