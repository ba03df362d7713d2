#!/usr/bin/env bash
# Run one federation through deploy/compose.yaml with podman-compose on this machine, wait for
# the orchestrator to finish, print the results table and tear everything down.
# Build the images first: deploy/build-local.sh.
#
#   deploy/run-local.sh
#   FEDSEQ_DATASET='synthetic:users=60,items=80' FEDSEQ_EPOCHS=2 FEDSEQ_CLIENTS_PER_ROUND=16 \
#     FEDSEQ_NUM_NEGATIVES=50 FEDSEQ_CLIENTS=2 deploy/run-local.sh
#   FEDSEQ_ATTACK=<name> FEDSEQ_MALICIOUS_RATIO=0.05 deploy/run-local.sh   # adds the attack profile
#
# Any FEDSEQ_* variable of deploy/compose.yaml passes through (see deploy/README.md).
# KEEP_UP=1 leaves the stack running (tear down later: podman-compose -f deploy/compose.yaml down -v).
# RUN_TIMEOUT (seconds, default 1800) bounds the wait for the orchestrator.
set -Eeuo pipefail

die() { echo "run-local: ERROR: $*" >&2; exit 1; }
say() { echo "run-local: $*" >&2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${FEDSEQ_DEPLOY_CACHE:-/var/tmp/fedseq-deploy}"
COMPOSE_FILE="$ROOT/deploy/compose.yaml"
RUN_TIMEOUT="${RUN_TIMEOUT:-1800}"
KEEP_UP="${KEEP_UP:-0}"

[ -f "$CACHE/env.sh" ] || die "$CACHE/env.sh not found: run deploy/build-local.sh first"
# shellcheck disable=SC1091
source "$CACHE/env.sh"   # CONTAINERS_CONF, PATH (podman-compose), REDIS_IMAGE, FEDSEQ_IMAGE
command -v podman-compose >/dev/null || die "podman-compose not found: run deploy/build-local.sh"
for img in "$FEDSEQ_IMAGE" "$REDIS_IMAGE"; do
    podman image exists "$img" || die "image $img is missing: run deploy/build-local.sh"
done

export FEDSEQ_CLIENTS="${FEDSEQ_CLIENTS:-2}"
export FEDSEQ_ATTACK="${FEDSEQ_ATTACK:-none}"
export FEDSEQ_ATTACKERS="${FEDSEQ_ATTACKERS:-1}"
profile_args=()
workers="$FEDSEQ_CLIENTS"
if [ "$FEDSEQ_ATTACK" != none ]; then
    profile_args=(--profile attack)
    workers=$((FEDSEQ_CLIENTS + FEDSEQ_ATTACKERS))
fi
export FEDSEQ_MIN_WORKERS="${FEDSEQ_MIN_WORKERS:-$workers}"
# A fresh run id per invocation, so a Redis volume left behind never resumes an old run.
export FEDSEQ_RUN_ID="${FEDSEQ_RUN_ID:-local-$(date +%Y%m%d-%H%M%S)}"
export FEDSEQ_RESULTS_DIR="${FEDSEQ_RESULTS_DIR:-$ROOT/deploy/results}"
if [ -z "${FEDSEQ_DATA_DIR:-}" ]; then
    FEDSEQ_DATA_DIR="$(cd "$ROOT/.." && pwd)/shared/data"
    [ -d "$FEDSEQ_DATA_DIR" ] || { FEDSEQ_DATA_DIR="$CACHE/empty-data"; mkdir -p "$FEDSEQ_DATA_DIR"; }
fi
export FEDSEQ_DATA_DIR
[ -d "$FEDSEQ_DATA_DIR" ] || die "FEDSEQ_DATA_DIR=$FEDSEQ_DATA_DIR is not a folder"

# The orchestrator runs as uid 10001 (or $FEDSEQ_USER) and writes $FEDSEQ_RESULTS_DIR/<run id>.
mkdir -p "$FEDSEQ_RESULTS_DIR"
out="$FEDSEQ_RESULTS_DIR/$FEDSEQ_RUN_ID"
rm -rf "$out"; mkdir -p "$out"
if [ -z "${FEDSEQ_USER:-}" ] && [ "$(id -u)" = 0 ]; then
    chown 10001:10001 "$FEDSEQ_RESULTS_DIR" "$out"
else
    chmod a+rwx "$FEDSEQ_RESULTS_DIR" "$out" 2>/dev/null || true
fi

pc() { podman-compose -f "$COMPOSE_FILE" "${profile_args[@]}" "$@"; }
teardown() {
    local rc=$?
    if [ "$KEEP_UP" = 1 ]; then
        say "KEEP_UP=1: the stack keeps running (podman-compose -f $COMPOSE_FILE ${profile_args[*]} down -v)"
        return
    fi
    if [ -d "$out" ]; then
        pc logs --no-color >"$out/compose.log" 2>&1 || pc logs >"$out/compose.log" 2>&1 || true
        say "service logs: $out/compose.log"
    fi
    say "tearing down"
    pc down -v -t 10 >/dev/null 2>&1 || say "warning: 'podman-compose down' failed; check 'podman ps -a'"
    exit "$rc"
}

say "clearing leftovers of an earlier run (if any)"
podman-compose -f "$COMPOSE_FILE" --profile attack down -v -t 5 >/dev/null 2>&1 || true

say "run $FEDSEQ_RUN_ID: $FEDSEQ_CLIENTS client worker(s)$([ "$FEDSEQ_ATTACK" != none ] && echo ", $FEDSEQ_ATTACKERS attacker(s) ($FEDSEQ_ATTACK)"), dataset ${FEDSEQ_DATASET:-synthetic}, ${FEDSEQ_EPOCHS:-8} epoch(s)"
trap teardown EXIT
trap 'exit 130' INT TERM
t0=$SECONDS
pc up -d >"$CACHE/compose-up.log" 2>&1 || die "podman-compose up failed; last lines of $CACHE/compose-up.log:
$(tail -20 "$CACHE/compose-up.log")"
say "stack up in $((SECONDS - t0)) s; waiting for the orchestrator (timeout ${RUN_TIMEOUT}s)"

orch="$(podman ps -a --filter label=com.docker.compose.service=orchestrator \
        --filter "label=com.docker.compose.project=fedseq" --format '{{.ID}}' | head -1)"
[ -n "$orch" ] || die "no orchestrator container found after 'up'"
last_epochs=-1
down_since=
while :; do
    read -r status code restarts < <(podman inspect -f '{{.State.Status}} {{.State.ExitCode}} {{.RestartCount}}' "$orch")
    epochs=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["epochs"]))' \
             "$out/results.json" 2>/dev/null || echo 0)
    if [ "$epochs" != "$last_epochs" ]; then
        say "t=$((SECONDS - t0))s orchestrator $status, epochs recorded: $epochs"
        last_epochs=$epochs
    fi
    if [ "$status" = exited ] && [ "$code" = 0 ]; then break; fi
    if [ "$status" = exited ]; then
        # a crash restarts it (restart: on-failure) and the run resumes from Redis; give up when
        # it keeps failing, or when it stays down (stopped by hand: podman does not restart those)
        down_since="${down_since:-$SECONDS}"
        if [ "${restarts:-0}" -ge 3 ] || [ $((SECONDS - down_since)) -gt 60 ]; then
            podman logs --tail 30 "$orch" >&2 || true
            die "the orchestrator exited with code $code (restarted ${restarts:-0} times) and is not coming back"
        fi
    else
        down_since=
    fi
    if [ $((SECONDS - t0)) -gt "$RUN_TIMEOUT" ]; then
        podman logs --tail 30 "$orch" >&2 || true
        die "the orchestrator did not finish within ${RUN_TIMEOUT}s (RUN_TIMEOUT)"
    fi
    sleep 3
done
say "orchestrator finished after $((SECONDS - t0)) s (restarts: $restarts)"
[ -f "$out/results.json" ] || die "the orchestrator exited 0 but wrote no $out/results.json"

# Print the table with the image's own fedseq (format_table), so the host needs no packages.
podman run --rm --network none -v "$out:/r:ro" --entrypoint python "$FEDSEQ_IMAGE" -c '
import json
from fedseq.results import format_table
r = json.load(open("/r/results.json"))
ep = r["epochs"]
print(format_table(ep, extra=("bytes_up", "bytes_down")))
s = r.get("summary", {})
print("epochs: %d  rounds: %s  run: %s" % (len(ep), s.get("rounds"), s.get("run_id")))
' || die "could not read $out/results.json"
say "results: $out/results.json"
