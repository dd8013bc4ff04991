"""Out-of-range numbers on the command line: one line, exit 2, nothing written (trust boundary, point 6)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_hostile_store import run
from tests.unit.test_signing import listing

CASES = [
    (["rollout", "R1", "--gate-timeout", "99999999999999999999"], "--gate-timeout"),
    (["rollout", "R1", "--gate-timeout", "0"], "--gate-timeout"),
    (["rollout", "R1", "--batch-size", "0"], "--batch-size"),
    (["rollout", "R1", "--batch-size", "100000000"], "--batch-size"),
    (["rollout", "R1", "--hook-timeout", "nan"], "--hook-timeout"),
    (["rollout", "R1", "--hook-timeout", "1e308"], "--hook-timeout"),
    (["rollout", "R1", "--probe-interval", "inf"], "--probe-interval"),
    (["rollout", "R1", "--probe-interval", "-1"], "--probe-interval"),
    (["rollback", "--gate-timeout", "-5"], "--gate-timeout"),
    (["site", "rebuild", "node0", "R1", "--wait-lock", "nan"], "--wait-lock"),
    (["site", "rebuild", "node0", "R1", "--wait-lock", "1e300"], "--wait-lock"),
    (["site", "up", "--nodes", "100000", "--release", "R1"], "--nodes"),
    (["site", "up", "--nodes", "-3", "--release", "R1"], "--nodes"),
    (["cloud", "up", "--cloud", "x", "--nodes", "100000", "--release", "R1", "--flavor", "f", "--ssh-key", "/dev/null"],
     "--nodes"),
    (["cloud", "up", "--cloud", "x", "--nodes", "1", "--prefix", "a b", "--release", "R1", "--flavor", "f",
      "--ssh-key", "/dev/null"], "--prefix"),
]


@pytest.mark.parametrize("argv,named", CASES, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in CASES])
def test_an_out_of_range_number_is_one_line_and_writes_nothing(argv: list[str], named: str, tmp_path: Path,
                                                               publish: Any, store: Any,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    publish("R1")
    before = listing(tmp_path)
    rc, out, err = run(capsys, *argv, "--site", str(tmp_path / "site"), "--store", str(store.root))
    said = err.strip().splitlines()
    assert rc == 2 and len(said) == 1 and "Traceback" not in err, err
    if named != "--wait-lock" or "root" not in err:  # as non-root, rebuild says it needs root first
        assert named in said[0], err
    assert listing(tmp_path) == before
