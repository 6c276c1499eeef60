"""bench.py's flags, checked in-process (parsing only: nothing is timed or measured here)."""
from __future__ import annotations

import pytest

import bench
from utils.base.cpus import physical_cores


def test_thread_counts_parse_lists_and_all() -> None:
    assert bench.thread_counts(None) == [None]
    assert bench.thread_counts("1") == [1]
    assert bench.thread_counts("2, 1") == [2, 1]
    assert bench.thread_counts("all") == [physical_cores()]
    assert bench.column("int8", 2, True) == "int8 (2 threads)" and bench.column("int8", 1, True) == "int8 (1 thread)"
    assert bench.column("int8", 2, False) == "int8"


@pytest.mark.parametrize(("value", "message"), [("0", "'0' is not a positive integer"), ("1,,2", "'' is not"),
                                                ("-1", "'-1' is not"), ("two", "'two' is not"),
                                                ("1,1", "1 given twice")])
def test_bad_threads_are_usage_errors(value: str, message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--threads", value])
    assert exc.value.code == 2
    assert f"--threads: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--models", "--dtypes"])
def test_unknown_models_and_dtypes_are_usage_errors(flag: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main([flag, "huge"])
    assert exc.value.code == 2
    assert f"{flag}: use a subset of" in capsys.readouterr().err
