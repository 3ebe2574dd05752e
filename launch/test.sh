#!/usr/bin/env bash
# Run the whole test suite on CPU. Sets up .venv on first use. Extra arguments go to pytest.
# Tests run on every core (pytest-xdist, -n auto; DDM_TEST_WORKERS=N to choose, 0 for one process).
set -uo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo_root/launch/setup_env.sh" || exit 1
cd "$repo_root"
python -m pytest -n "${DDM_TEST_WORKERS:-auto}" --dist worksteal "$@"
rc=$?
# pytest exits 5 when it collected no tests: that is a failure for us, not a pass.
if [ "$rc" -eq 5 ]; then echo "[test] no tests were collected" >&2; exit 1; fi
exit "$rc"
