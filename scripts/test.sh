#!/usr/bin/env bash
# make test (what CI runs): the tools, lint and types, then every test in one pytest run; at the
# end, the wall time of each part (tools, lint+types, and pytest's: deploy, faults, integration,
# observability, unit) and the slowest ten tests. Exits non-zero on the first failed part.
set -uo pipefail
cd "$(dirname "$0")/.." || exit
MAKE=${MAKE:-make}
BIN=${BIN:-.venv/bin}
read -r -a pytest_args <<<"${PYTEST_ARGS:---durations=15}"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
timings=$work/timings.tsv

part() {
    local name=$1 start
    shift
    start=$(date +%s.%N)
    "$@"
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$start" "$(date +%s.%N)" >>"$timings"
    return "$rc"
}

report() {
    "$BIN/python" -m tests.support.parts "$timings" "$work/pytest.json"
}

rc=0
part "tools" "$MAKE" --no-print-directory deps || rc=$?
if [ "$rc" -eq 0 ]; then
    part "lint+types" "$MAKE" --no-print-directory lint typecheck || rc=$?
fi
if [ "$rc" -eq 0 ]; then
    TEST_PART_TIMES=$work/pytest.json part "pytest" "$BIN/pytest" "${pytest_args[@]}" || rc=$?
fi
report
exit "$rc"
