#!/usr/bin/env bash
# make test (what CI runs): the tools, lint and types, the tests in two pytest runs; at the end,
# the wall time of each part (kafka, apt tools, go tools, lint+types, and each run's: integration,
# faults, unit, then deploy, observability) and the slowest ten tests. Exits non-zero if any part
# failed.
#
# Only the deploy and observability tests need helm and docker-compose, built with Go (minutes
# on a fresh machine): they build in the background at the lowest CPU priority (and the lowest
# best-effort I/O priority, never the idle class, which a busy disk could starve) while
# lint, types and the first run (integration, faults, unit: every other test) go on, so the
# builds overlap the integration tests (which spend most of their time waiting on the broker and
# the simulator) instead of coming before everything. The second run (deploy, observability)
# waits for them. Debian's packages (promtool and prometheus, which an integration test also
# starts, and shellcheck) install first, in the foreground: seconds when they are there, and
# apt never runs twice at once. The table says which parts overlapped.
set -uo pipefail
cd "$(dirname "$0")/.." || exit
MAKE=${MAKE:-make}
BIN=${BIN:-.venv/bin}
read -r -a pytest_args <<<"${PYTEST_ARGS:---durations=15}"

# The tests that need the tools, run once they are there; every other test directory runs
# first, in this order (unit last, as in a single alphabetical run; a new directory is appended).
after_tools=(tests/deploy tests/observability)
first=(tests/integration tests/faults tests/unit)
for dir in tests/*/; do
    dir=${dir%/}
    case " ${first[*]} ${after_tools[*]} " in *" $dir "*) continue ;; esac
    [ -n "$(find "$dir" -name 'test_*.py' -print -quit)" ] && first+=("$dir")
done

work=$(mktemp -d)
tools_pid=
# shellcheck disable=SC2317 # called by the trap
cleanup() {
    # The background tools, if the run ends before them (their own process group).
    [ -n "$tools_pid" ] && kill -- "-$tools_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
timings=$work/timings.tsv

# part NAME [RESULTS] -- COMMAND...: runs COMMAND, appends "NAME<TAB>start<TAB>end<TAB>RESULTS"
# (RESULTS: the JSON file of a pytest run's own parts, tests/support/parts.py).
part() {
    local name=$1 results="" start
    shift
    if [ "$1" != "--" ]; then
        results=$1
        shift
    fi
    shift
    start=$(date +%s.%N)
    "$@"
    local rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$start" "$(date +%s.%N)" "$results" >>"$timings"
    return "$rc"
}

report() {
    "$BIN/python" -m tests.support.parts "$timings"
}

# shellcheck disable=SC2317 # called through part()
pytest_run() {
    local results=$1
    shift
    TEST_PART_TIMES=$results "$BIN/pytest" "${pytest_args[@]}" "$@"
}

rc=0
part "kafka" -- "$MAKE" --no-print-directory kafka || rc=$?
if [ "$rc" -eq 0 ]; then
    part "apt tools" -- "$MAKE" --no-print-directory tools-apt || rc=$?
fi

lowest=(nice -n 19)
command -v ionice >/dev/null 2>&1 && lowest+=(ionice -c 2 -n 7)
tools_log=$work/tools.log
if [ "$rc" -eq 0 ]; then
    echo "==> go tools: building in the background (output below once they are done)"
    set -m # the background job in its own process group: cleanup() can stop all of it
    part "go tools" -- "${lowest[@]}" "$MAKE" --no-print-directory tools-go >"$tools_log" 2>&1 &
    tools_pid=$!
    set +m
fi

if [ "$rc" -eq 0 ]; then
    part "lint+types" -- "$MAKE" --no-print-directory lint typecheck || rc=$?
fi
if [ "$rc" -eq 0 ]; then
    part "pytest" "$work/first.json" -- pytest_run "$work/first.json" "${first[@]}" || rc=$?
fi
if [ -n "$tools_pid" ] && [ "$rc" -eq 0 ]; then
    tools_rc=0
    wait "$tools_pid" || tools_rc=$?
    tools_pid=
    echo "==> go tools (built in the background, exit $tools_rc):"
    cat "$tools_log"
    [ "$tools_rc" -eq 0 ] || rc=$tools_rc
fi
if [ "$rc" -eq 0 ]; then
    part "pytest (tools)" "$work/after_tools.json" -- \
        pytest_run "$work/after_tools.json" "${after_tools[@]}" || rc=$?
fi
report
exit "$rc"
