"""Test-wide guarantees: every test runs offline, on the CPU, in its own temporary directory.

The environment variables are set at import time so that subprocesses started by tests
(real CLI runs through Hydra and Lightning) inherit them too.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

# --- offline and CPU-only, for this process and every subprocess it starts -------------------------
os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "WANDB_SILENT": "true",
        "CUDA_VISIBLE_DEVICES": "",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONHASHSEED": "0",
        "HYDRA_FULL_ERROR": "1",
        # Tiny models on a 2-core machine: one thread per process is several times faster than two
        # fighting over the cores (and subprocess runs of the CLIs inherit this).
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
)

import torch  # noqa: E402  (after OMP_NUM_THREADS is set)

torch.set_num_threads(1)

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.text",
    "tests.fixtures.data",
    "tests.fixtures.train",
]

REPO_ROOT = Path(__file__).resolve().parents[1]

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _is_local(address) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    host = address[0] if isinstance(address, tuple) and address else ""
    return host in {"localhost", "127.0.0.1", "::1", "0.0.0.0", ""} or str(host).startswith("127.")


def _guarded_connect(self, address):
    if not _is_local(address):
        raise RuntimeError(f"network access is not allowed in tests (tried to connect to {address!r})")
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    if not _is_local(address):
        raise RuntimeError(f"network access is not allowed in tests (tried to connect to {address!r})")
    return _real_connect_ex(self, address)


socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
socket.socket.connect_ex = _guarded_connect_ex  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run each test from its own temporary directory so no test writes into the checkout."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout's root folder."""
    return REPO_ROOT
