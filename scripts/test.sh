#!/usr/bin/env bash
# The test suite: install the test extras, check the formatting, then run pytest (fast tests and the
# notebooks in smoke mode) on 2 workers (pytest-xdist; GSM_TEST_WORKERS=N to change, 0 for one
# process). Slow tests: scripts/test.sh -m slow
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" test
# One style for the whole repository (configured in pyproject.toml).
ruff format --check --quiet .
ruff check --quiet .
# --dist loadfile: a test file goes to one worker, so each module fixture (a trained run, an
# 8-device subprocess) is built once, not once per worker.
python -m pytest -n "${GSM_TEST_WORKERS:-2}" --dist loadfile "$@"
