"""The test suite's fork server (tests/fixtures/forked_cli.py) against the reference it replaces: the same
command in a fresh interpreter. Same output, exit status, working directory, environment and signals."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.fixtures import forked_cli

PROBE = "tests.fixtures.cli_probe"


def _both(monkeypatch, args, env):
    monkeypatch.setenv("DDM_TEST_FORK_CLI", "1")
    forked = forked_cli.run(PROBE, args, env, 120)
    monkeypatch.setenv("DDM_TEST_FORK_CLI", "0")
    fresh = forked_cli.run(PROBE, args, env, 120)
    return forked, fresh


@pytest.mark.parametrize("args, status", [(["ok"], 0), (["exit", "3"], 3), (["message"], 1), (["raise"], 1)])
def test_a_forked_run_ends_as_the_same_command_in_a_fresh_interpreter(monkeypatch, repo_root, args, status):
    env = {**os.environ, "PROBE_VALUE": "42", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo_root)}
    forked, fresh = _both(monkeypatch, args, env)
    assert fresh.returncode == status and forked.returncode == status
    assert forked.stdout == fresh.stdout  # __main__, argv, cwd, sys.path[0], env, and the atexit handler ran
    assert f"argv {args} cli_probe.py" in forked.stdout and "name __main__" in forked.stdout
    assert f"cwd {os.getcwd()} path0 {os.getcwd()}" in forked.stdout and "env 42 OMP 1" in forked.stdout
    assert forked.stdout.rstrip().endswith("atexit ran")
    # stderr: the same last line (the tracebacks' frames differ: runpy is entered from different callers)
    assert forked.stderr.splitlines()[-1] == fresh.stderr.splitlines()[-1]
    assert "to stderr" in forked.stderr
    if args == ["raise"]:
        assert "Traceback" in forked.stderr and forked.stderr.rstrip().endswith("RuntimeError: probe failure")


def test_a_forked_run_is_its_own_process_and_takes_signals_like_one(tmp_path, monkeypatch, repo_root):
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    results = {}
    for fork in ("1", "0"):
        monkeypatch.setenv("DDM_TEST_FORK_CLI", fork)
        log = tmp_path / f"fork{fork}.log"
        proc = forked_cli.start_logged(PROBE, ["sleep"], env, log)
        deadline = time.time() + 60
        while "to stderr" not in log.read_text() and time.time() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None and proc.pid != os.getpid()
        proc.send_signal(signal.SIGTERM)
        results[fork] = proc.wait(60)
        assert "name __main__" in log.read_text() and "to stderr" in log.read_text()  # both streams in one log
    assert results["1"] == results["0"] == -signal.SIGTERM


def test_a_run_past_its_timeout_is_killed_and_reported(monkeypatch, repo_root):
    monkeypatch.setenv("DDM_TEST_FORK_CLI", "1")
    start = time.time()
    with pytest.raises(subprocess.TimeoutExpired) as info:
        forked_cli.run(PROBE, ["sleep"], {**os.environ, "PYTHONPATH": str(repo_root)}, 3)
    assert time.time() - start < 60 and "name __main__" in info.value.output
