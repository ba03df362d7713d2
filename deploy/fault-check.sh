#!/usr/bin/env bash
# Fault check: run deploy/run-local.sh and `podman stop` one container of the stack in the middle
# of the run (once the first epoch is recorded). The run must still finish (run-local.sh starts
# the stopped container again; the orchestrator resumes from Redis) and tear down to nothing.
#
#   FAULT=server deploy/fault-check.sh        # or redis, orchestrator, client-0, client-1, attacker-0, ...
#   FAULT=client-1 FEDSEQ_CLIENTS=3 FEDSEQ_ATTACK=dv-fsr FEDSEQ_MALICIOUS_RATIO=0.05 deploy/fault-check.sh
#
# FAULT=client and FAULT=attacker (the names before each worker had its own service) mean client-0
# and attacker-0.
#
# Every other variable goes to run-local.sh. Exit 0 when the run finished with state done.
set -Eeuo pipefail

die() { echo "fault-check: ERROR: $*" >&2; exit 1; }
say() { echo "fault-check: $*" >&2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${FEDSEQ_DEPLOY_CACHE:-/var/tmp/fedseq-deploy}"
FAULT="${FAULT:-server}"
case "$FAULT" in client | attacker) FAULT="$FAULT-0" ;; esac   # one service per worker identity
# a run long enough to stop something in the middle of it
export FEDSEQ_DATASET="${FEDSEQ_DATASET:-synthetic:users=400,items=200}"
export FEDSEQ_EPOCHS="${FEDSEQ_EPOCHS:-4}"
export FEDSEQ_CLIENTS_PER_ROUND="${FEDSEQ_CLIENTS_PER_ROUND:-16}"
export FEDSEQ_NUM_NEGATIVES="${FEDSEQ_NUM_NEGATIVES:-50}"
export FEDSEQ_RUN_ID="${FEDSEQ_RUN_ID:-fault-$FAULT-$(date +%Y%m%d-%H%M%S)}"
export FEDSEQ_RESULTS_DIR="${FEDSEQ_RESULTS_DIR:-$ROOT/deploy/results}"
# shellcheck disable=SC1091
source "$CACHE/env.sh"
results="$FEDSEQ_RESULTS_DIR/$FEDSEQ_RUN_ID/results.json"
log="$CACHE/fault-check-$FAULT.log"

t0=$SECONDS
"$ROOT/deploy/run-local.sh" >"$log" 2>&1 &
run=$!
stopped=
while kill -0 "$run" 2>/dev/null; do
    if [ -z "$stopped" ] && [ -f "$results" ] \
        && python3 -c 'import json,sys; sys.exit(0 if len(json.load(open(sys.argv[1]))["epochs"]) >= 1 else 1)' "$results" 2>/dev/null; then
        c="$(podman ps --filter label=io.podman.compose.project=fedseq \
               --filter "label=com.docker.compose.service=$FAULT" --format '{{.Names}}' | sed -n 1p)"
        [ -n "$c" ] || { kill "$run"; die "no running container of service $FAULT"; }
        t=$SECONDS
        podman stop -t 20 "$c" >/dev/null
        stopped="$c"
        say "t=$((SECONDS - t0))s stopped $c (podman stop took $((SECONDS - t)) s, exit code $(podman inspect -f '{{.State.ExitCode}}' "$c"))"
    fi
    sleep 1
done
rc=0; wait "$run" || rc=$?
grep -E "starting it again|run done|state:|no container|teardown|ERROR" "$log" >&2 || true
[ -n "$stopped" ] || die "the run ended before anything was stopped (make it longer); log: $log"
[ "$rc" = 0 ] || die "run-local.sh failed (exit $rc) after $FAULT was stopped; log: $log"
grep -q "state: done" "$log" || die "the run did not end in state done; log: $log"
say "passed: $FAULT stopped mid-run, the run finished in $((SECONDS - t0)) s and the stack is gone (log: $log)"
