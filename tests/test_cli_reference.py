"""The reference CLI commands: ``tq-deploy bounds`` (the quantizer against the paper's bounds) and
``tq-deploy bench quantizer``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tq_deploy.cli import main
from tq_deploy.ops import SUPPORTED_BITS

REPO = Path(__file__).resolve().parents[1]


def check_rows(rows: list[dict], head_dim: int, bits: list[int]) -> None:
    assert [r["bits"] for r in rows] == bits
    for r in rows:
        b = r["bits"]
        lower, upper = 4.0**-b, math.sqrt(3) * math.pi / 2 * 4.0**-b  # the paper's bounds, recomputed
        assert r["head_dim"] == head_dim
        assert r["lower_bound"] == pytest.approx(lower) and r["upper_bound"] == pytest.approx(upper)
        assert lower <= r["mse"] <= upper, r
        assert r["within_bounds"] is True
        assert abs(r["mse"] - r["theory"]) < 6 * r["mse_stderr"] + 1e-3 * r["theory"]


def test_bounds_json_in_process(capsys):
    rc = main(["bounds", "--head-dim", "128", "--bits", "1", "2", "3", "4", "--json"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    check_rows(rows, 128, [1, 2, 3, 4])


def test_bounds_json_as_a_module_subprocess():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(
        [sys.executable, "-m", "tq_deploy.cli", "bounds", "--head-dim", "128", "--bits", "1", "2", "3", "4",
         "--json", "--num-vectors", "5000"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    check_rows(json.loads(done.stdout), 128, [1, 2, 3, 4])


def test_bounds_table_hadamard(capsys):
    rc = main(["bounds", "--head-dim", "64", "--bits", "2", "3", "--rotation", "hadamard", "--seed", "7",
               "--num-vectors", "3000"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert out[0].split()[:3] == ["bits", "D", "measured"]
    rows = [line.split() for line in out[1:]]
    assert [r[0] for r in rows] == ["2", "3"] and all(r[1] == "64" and r[-1] == "yes" for r in rows)


def test_bench_prints_the_table(capsys):
    rc = main(["bench", "quantizer", "--head-dim", "64", "--bits", "2", "3", "--num-vectors", "256", "--repeat", "1"])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert "vectors=256" in lines[0] and "D=64" in lines[0]
    assert "encode Mvec/s" in lines[1] and "decode Mvec/s" in lines[1] and "ratio vs fp16" in lines[1]
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == ["2", "3"]
    for r in rows:
        bits = int(r[0])
        encode_rate, decode_rate, mse, theory, ratio = map(float, r[1:])
        assert encode_rate > 0 and decode_rate > 0
        assert 4.0**-bits <= mse <= math.sqrt(3) * math.pi / 2 * 4.0**-bits
        assert abs(mse - theory) < 0.05 * theory
        assert ratio == pytest.approx(64 * 2 / (math.ceil(64 * bits / 8) + 4), abs=0.01)


def test_bad_bits_is_one_error_line_and_exit_code_2(capsys):
    with pytest.raises(SystemExit) as done:  # refused while the options are parsed
        main(["bounds", "--bits", "9", "--num-vectors", "10"])
    captured = capsys.readouterr()
    assert done.value.code == 2
    assert "--bits: 9" in captured.err and f"expected an int in [{SUPPORTED_BITS[0]}, {SUPPORTED_BITS[-1]}]" in captured.err
    assert len(captured.err.strip().splitlines()) == 1
