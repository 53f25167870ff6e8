#!/usr/bin/env bash
# The full fuzzing profile, beyond what CI runs: 10,000 generated and mutated CSV files per
# property against the reader, and 10,000 generated requests (2,500 per endpoint) against a
# live API server. Minutes, not seconds: run it before a release, on an idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
HYPOTHESIS_PROFILE=full PREFIXLAB_FUZZ_EXAMPLES=10000 python -m pytest -q tests/test_fuzz_csv.py
HYPOTHESIS_PROFILE=full PREFIXLAB_FUZZ_EXAMPLES=2500 python -m pytest -q tests/test_fuzz_api.py
