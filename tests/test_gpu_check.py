"""The GPU validation script's CPU smoke mode runs every section's code path and passes."""
from __future__ import annotations

import pytest

from tests.benchmarks import gpu_check


@pytest.mark.slow  # ~35-45 s on the shared 2-core machine, most of it section e's two gloo processes
def test_gpu_check_smoke_runs_every_section(capsys: pytest.CaptureFixture) -> None:
    assert gpu_check.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    for section in "abcde":
        assert f"| {section} |" in out, out
    assert "launch/gpu_check.sh --smoke --sections a" in out
    assert "all checks passed" in out


def test_gpu_check_refuses_unknown_sections(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        gpu_check.main(["--smoke", "--sections", "az"])
    assert "unknown sections ['z']" in capsys.readouterr().err


def test_memory_check_fails_over_25_percent() -> None:
    report = gpu_check.Report("launch/gpu_check.sh")
    figures = gpu_check.check_memory(report, "b", measured=130, predicted=100)
    assert figures["ratio"] == "1.30" and report.failed
    ok = gpu_check.Report("launch/gpu_check.sh")
    gpu_check.check_memory(ok, "b", measured=124, predicted=100)
    assert not ok.failed
