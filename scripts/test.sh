#!/usr/bin/env bash
# Run every check of the project: lint, formatting, types, then the tests.
#
#   scripts/test.sh [PYTEST_ARGUMENTS...]
#
# Expects the virtual environment .venv with the test extras (`pip install -e '.[test]'`),
# which .ci/run creates. The tests need root, GNU tar and e2fsprogs, and the layer corpus
# ($LCOW_CORPUS, default /var/cache/lcow-corpus); see docs/corpus.md.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin=.venv/bin

# An editable install keeps lcow's extensions beside their sources, and Python imports the
# extensions first: rebuild them when a source is newer, so the tests run the code as edited.
stale=$("$bin/python" -c 'from lcow import compiled; print(*compiled.stale_modules())')
if [ -n "$stale" ]; then
  # LCOW_MYPYC=0 rebuilds the C extensions but none of mypyc's, so those must go by hand.
  if [ "${LCOW_MYPYC:-1}" = 0 ]; then
    stale_mypyc=$("$bin/python" -c '
from lcow import compiled
print(*(name for name in compiled.stale_modules() if name in compiled.COMPILED_MODULES))')
    if [ -n "$stale_mypyc" ]; then
      echo "scripts/test.sh: the extensions of $stale_mypyc are older than their sources and" \
        "LCOW_MYPYC=0 builds none of mypyc's. Delete them:" \
        "find src/lcow -name '*.so' ! -name '_*' -delete" >&2
      exit 1
    fi
  fi
  echo "scripts/test.sh: rebuilding lcow's extension modules, whose sources changed" >&2
  LCOW_C_WERROR=1 "$bin/pip" install --quiet --disable-pip-version-check --no-deps -e .
fi

"$bin/ruff" check .
"$bin/ruff" format --check .
"$bin/mypy"

status=0
"$bin/pytest" "$@" || status=$?

# pytest exits with 5 when it collected no tests; a run that tested nothing is a failure.
if [ "$status" -eq 5 ]; then
  echo "scripts/test.sh: pytest collected no tests" >&2
fi
exit "$status"
