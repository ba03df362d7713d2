#!/usr/bin/env bash
# Run one federation through deploy/compose.yaml with podman-compose on this machine, keep it
# running to the end (containers that go down are started again), print the results table and
# tear everything down to nothing. Build the images first: deploy/build-local.sh.
#
#   deploy/run-local.sh                                   # mTLS (deploy/compose.tls.yaml), client-0 and client-1
#   FEDSEQ_DATASET='synthetic:users=60,items=80' FEDSEQ_EPOCHS=2 FEDSEQ_CLIENTS_PER_ROUND=16 \
#     FEDSEQ_NUM_NEGATIVES=50 FEDSEQ_CLIENTS=3 deploy/run-local.sh
#   FEDSEQ_ATTACK=dv-fsr FEDSEQ_MALICIOUS_RATIO=0.05 FEDSEQ_DEFENSE=mixed-rfa deploy/run-local.sh
#   FEDSEQ_TLS=0 deploy/run-local.sh                      # plaintext, compose.yaml alone
#
# Any FEDSEQ_* variable of deploy/compose.yaml passes through (see deploy/README.md).
# FEDSEQ_CLIENTS (default 2) and FEDSEQ_ATTACKERS (default 1, with FEDSEQ_ATTACK set) pick the worker
# services client-0.. and attacker-0..; past compose.yaml's own, deploy/compose_workers.py writes
# them into $FEDSEQ_DEPLOY_CACHE/compose.workers.yaml. With mTLS each worker has its own certificate
# and the orchestrator a roster (deploy/tls/roster.json) naming each: made here when missing.
# COMPOSE_EXTRA="file ..." adds compose files after the base and the TLS overlay.
# KEEP_UP=1 leaves the stack running (tear down later: deploy/down-local.sh).
# RUN_TIMEOUT (seconds, default 1800) bounds the run. RESTART_AFTER (default 5) is how many seconds
# a container may stay down before the script starts it again (podman restarts a crashed one at
# once, but neither podman nor Docker restarts one that was stopped by hand or exited 0).
set -Eeuo pipefail

die() { echo "run-local: ERROR: $*" >&2; exit 1; }
say() { echo "run-local: $*" >&2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${FEDSEQ_DEPLOY_CACHE:-/var/tmp/fedseq-deploy}"
PROJECT=fedseq
RUN_TIMEOUT="${RUN_TIMEOUT:-1800}"
RESTART_AFTER="${RESTART_AFTER:-5}"
KEEP_UP="${KEEP_UP:-0}"
FEDSEQ_TLS="${FEDSEQ_TLS:-1}"

[ -f "$CACHE/env.sh" ] || die "$CACHE/env.sh not found: run deploy/build-local.sh first"
# shellcheck disable=SC1091
source "$ROOT/deploy/certs-local.sh"  # ensure_worker_certs
source "$CACHE/env.sh"   # CONTAINERS_CONF, PATH (podman-compose), REDIS_IMAGE, FEDSEQ_IMAGE (fedseq:<version>)
command -v podman-compose >/dev/null || die "podman-compose not found: run deploy/build-local.sh"
for img in "$FEDSEQ_IMAGE" "$REDIS_IMAGE"; do
    podman image exists "$img" || die "image $img is missing: run deploy/build-local.sh"
done
# the image's OCI labels (deploy/Dockerfile): say when it was built from another commit
image_rev="$(podman image inspect -f '{{index .Config.Labels "org.opencontainers.image.revision"}}' "$FEDSEQ_IMAGE" 2>/dev/null || true)"
head_rev="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || true)"
if [ -n "$head_rev" ] && [ "$image_rev" != "$head_rev" ]; then
    say "note: $FEDSEQ_IMAGE was built from revision ${image_rev:-unknown}, the checkout is at $head_rev (deploy/build-local.sh rebuilds it)"
fi

export FEDSEQ_CLIENTS="${FEDSEQ_CLIENTS:-2}"
export FEDSEQ_ATTACK="${FEDSEQ_ATTACK:-none}"
export FEDSEQ_ATTACKERS="${FEDSEQ_ATTACKERS:-1}"
[ "$FEDSEQ_CLIENTS" -ge 1 ] 2>/dev/null || die "FEDSEQ_CLIENTS=$FEDSEQ_CLIENTS: need 1 or more client workers"
[ "$FEDSEQ_ATTACKERS" -ge 0 ] 2>/dev/null || die "FEDSEQ_ATTACKERS=$FEDSEQ_ATTACKERS is not a number"
profile_args=()
workers="$FEDSEQ_CLIENTS"
# one named service per worker identity: client-0.., attacker-0.. (compose.yaml has client-0,
# client-1 and attacker-0; compose_workers.py writes the others into an extra compose file)
worker_services=()
for ((i = 0; i < FEDSEQ_CLIENTS; i++)); do worker_services+=("client-$i"); done
if [ "$FEDSEQ_ATTACK" != none ]; then
    profile_args=(--profile attack)
    workers=$((FEDSEQ_CLIENTS + FEDSEQ_ATTACKERS))
    for ((i = 0; i < FEDSEQ_ATTACKERS; i++)); do worker_services+=("attacker-$i"); done
fi
# certificates for every worker identity the files name (attacker-0 at least: prepare fills its volume)
cert_clients=$((FEDSEQ_CLIENTS > 2 ? FEDSEQ_CLIENTS : 2))
cert_attackers=$((FEDSEQ_ATTACKERS > 1 ? FEDSEQ_ATTACKERS : 1))

files=(-f "$ROOT/deploy/compose.yaml")
if [ "$FEDSEQ_TLS" = 1 ]; then
    files+=(-f "$ROOT/deploy/compose.tls.yaml")
    export FEDSEQ_CERTS="${FEDSEQ_CERTS:-$ROOT/deploy/tls}"
    # one certificate per worker and the orchestrator's roster naming each (deploy/certs-local.sh)
    ensure_worker_certs "$FEDSEQ_CERTS" "$cert_clients" "$cert_attackers"
fi
if [ "$FEDSEQ_CLIENTS" -gt 2 ] || [ "$FEDSEQ_ATTACKERS" -gt 1 ]; then
    PY="$CACHE/tools/bin/python"   # the podman-compose venv: it has PyYAML
    extra_file="$CACHE/compose.workers.yaml"
    tls_flag=()
    if [ "$FEDSEQ_TLS" = 1 ]; then tls_flag=(--tls); fi
    "$PY" "$ROOT/deploy/compose_workers.py" "$extra_file" --clients "$cert_clients" --attackers "$cert_attackers" \
        "${tls_flag[@]}" >/dev/null || die "deploy/compose_workers.py failed"
    files+=(-f "$extra_file")
fi

for extra in ${COMPOSE_EXTRA:-}; do   # more compose files (for example one that publishes ports)
    [ -f "$extra" ] || die "COMPOSE_EXTRA: $extra not found"
    files+=(-f "$extra")
done

export FEDSEQ_MIN_WORKERS="${FEDSEQ_MIN_WORKERS:-$workers}"
# A fresh run id per invocation, so a Redis volume left behind never resumes an old run.
export FEDSEQ_RUN_ID="${FEDSEQ_RUN_ID:-local-$(date +%Y%m%d-%H%M%S)}"
export FEDSEQ_RESULTS_DIR="${FEDSEQ_RESULTS_DIR:-$ROOT/deploy/results}"
export FEDSEQ_DATA_DIR="${FEDSEQ_DATA_DIR:-$ROOT/deploy/data}"
[ -d "$FEDSEQ_DATA_DIR" ] || die "FEDSEQ_DATA_DIR=$FEDSEQ_DATA_DIR is not a folder (the data sets live there: steam/, ml-1m/)"
mkdir -p "$FEDSEQ_RESULTS_DIR"
out="$FEDSEQ_RESULTS_DIR/$FEDSEQ_RUN_ID"
rm -rf "$out"   # the compose `prepare` service makes it, owned by the orchestrator's user

pc() { podman-compose -p "$PROJECT" "${files[@]}" "${profile_args[@]}" "$@"; }
project=(--filter "label=io.podman.compose.project=$PROJECT")
save_logs() {   # every container of the project
    local c
    for c in $(podman ps -a "${project[@]}" --format '{{.Names}}' | sort); do
        echo "===== $c"
        podman logs "$c" 2>&1 || true
    done
}
teardown() {
    local rc=$?
    trap - EXIT
    if [ "$KEEP_UP" = 1 ]; then
        say "KEEP_UP=1: the stack keeps running (tear down: deploy/down-local.sh)"
        exit "$rc"
    fi
    if [ -d "$out" ]; then
        save_logs >"$out/compose.log" 2>&1 || true
        say "service logs: $out/compose.log"
    fi
    local t=$SECONDS
    "$ROOT/deploy/down-local.sh" || rc=1
    say "teardown took $((SECONDS - t)) s"
    exit "$rc"
}

say "clearing leftovers of an earlier run (if any)"
"$ROOT/deploy/down-local.sh" >/dev/null 2>&1 || true

say "run $FEDSEQ_RUN_ID: $FEDSEQ_CLIENTS client worker(s)$([ "$FEDSEQ_ATTACK" != none ] && echo ", $FEDSEQ_ATTACKERS attacker(s) ($FEDSEQ_ATTACK)"), defense ${FEDSEQ_DEFENSE:-fedavg}, dataset ${FEDSEQ_DATASET:-synthetic}, ${FEDSEQ_EPOCHS:-8} epoch(s), $([ "$FEDSEQ_TLS" = 1 ] && echo mTLS || echo 'plaintext (FEDSEQ_TLS=0)')"
trap teardown EXIT
trap 'exit 130' INT TERM
t0=$SECONDS
# Two steps with --no-deps. podman-compose turns depends_on into `podman --requires`, and podman's
# restart policy cannot restart a container that requires an exited one (the one-shot `prepare`):
# a crashed orchestrator stayed down ("stopped", restart count 0). Without --requires the policy
# works (on-failure:5 measured: 5 restarts, then down). The start order and the wait for `prepare`
# are done here instead (podman 4.3 ignores the service_healthy conditions anyway).
services=(server orchestrator "${worker_services[@]}")
pc up -d --no-deps prepare redis >"$CACHE/compose-up.log" 2>&1 || die "podman-compose up failed; last lines of $CACHE/compose-up.log:
$(tail -20 "$CACHE/compose-up.log")"
prep="$(podman ps -a "${project[@]}" --filter label=com.docker.compose.service=prepare --format '{{.Names}}' | sed -n 1p)"
if [ -z "$prep" ] || [ "$(podman wait "$prep")" != 0 ]; then
    [ -n "$prep" ] && podman logs "$prep" >&2
    die "the prepare service failed"
fi
pc up -d --no-deps "${services[@]}" >>"$CACHE/compose-up.log" 2>&1 || die "podman-compose up failed; last lines of $CACHE/compose-up.log:
$(tail -20 "$CACHE/compose-up.log")"
say "stack up in $((SECONDS - t0)) s; waiting for the orchestrator (timeout ${RUN_TIMEOUT}s)"
orch="$(podman ps -a "${project[@]}" --filter label=com.docker.compose.service=orchestrator --format '{{.Names}}' | sed -n 1p)"
[ -n "$orch" ] || die "no orchestrator container found after 'up'"

# Podman here has no systemd to run health checks on a timer, so run them: report when every
# service passes its health check (the server and the orchestrator: gRPC health, over mTLS with the
# overlay; a worker, which listens on no port: its fresh health file).
healthy_at=
check_health() {
    local c bad=0
    for c in $(podman ps "${project[@]}" --format '{{.Names}}'); do
        case "$c" in *prepare*) continue ;; esac
        podman healthcheck run "$c" >/dev/null 2>&1 || bad=$((bad + 1))
    done
    [ "$bad" = 0 ]
}

declare -A down_since=() restarted=()
last_epochs=-1
while :; do
    now=$SECONDS
    if [ -z "$healthy_at" ] && check_health; then
        healthy_at=$((now - t0))
        say "t=${healthy_at}s every service passes its health check"
        # the store network: the server reaches Redis, a worker must not
        w="$(podman ps "${project[@]}" --filter label=com.docker.compose.service=client-0 --format '{{.Names}}' | sed -n 1p)"
        srv="$(podman ps "${project[@]}" --filter label=com.docker.compose.service=server --format '{{.Names}}' | sed -n 1p)"
        probe='import socket; socket.create_connection(("redis", 6379), 3)'
        if [ -n "$w" ] && [ -n "$srv" ]; then
            podman exec "$srv" python -c "$probe" >/dev/null 2>&1 \
                || die "the isolation probe cannot reach redis:6379 from the server either"
            if podman exec "$w" python -c "$probe" >/dev/null 2>&1; then
                die "worker $w can reach redis:6379: the store network is not isolated"
            fi
            say "store isolation: $srv reaches redis:6379, worker $w cannot"
        fi
    fi
    state="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["summary"]["state"])' \
             "$out/results.json" 2>/dev/null || echo none)"
    epochs="$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["epochs"]))' \
             "$out/results.json" 2>/dev/null || echo 0)"
    if [ "$epochs" != "$last_epochs" ]; then
        say "t=$((now - t0))s epochs recorded: $epochs"
        last_epochs=$epochs
    fi
    read -r ostatus ocode orestarts < <(podman inspect -f '{{.State.Status}} {{.State.ExitCode}} {{.RestartCount}}' "$orch")
    if [ "$ostatus" = exited ] && [ "$ocode" = 0 ] && [ "$state" = done ]; then break; fi
    if [ "$ostatus" = exited ] && [ "$ocode" != 0 ] && [ "${orestarts:-0}" -ge 5 ]; then
        podman logs --tail 30 "$orch" >&2 || true
        die "the orchestrator exited with code $ocode after ${orestarts} restarts (the limit)"
    fi
    # Supervise: a container that stays down (stopped by hand, exited 0 before the run was done,
    # or out of restarts) is started again; each at most 3 times by this script.
    for c in $(podman ps -a "${project[@]}" --filter status=exited --format '{{.Names}}'); do
        case "$c" in *prepare*) continue ;; esac
        down_since[$c]="${down_since[$c]:-$now}"
        if [ $((now - down_since[$c])) -ge "$RESTART_AFTER" ]; then
            n="${restarted[$c]:-0}"
            [ "$n" -lt 3 ] || die "$c keeps going down (started again $n times by this script)"
            say "t=$((now - t0))s $c is down ($(podman inspect -f 'exit code {{.State.ExitCode}}' "$c")): starting it again"
            podman start "$c" >/dev/null || die "could not start $c again"
            restarted[$c]=$((n + 1))
            unset "down_since[$c]"
        fi
    done
    for c in "${!down_since[@]}"; do   # came back by itself (podman's restart policy)
        [ "$(podman inspect -f '{{.State.Status}}' "$c" 2>/dev/null)" = exited ] || unset "down_since[$c]"
    done
    if [ $((now - t0)) -gt "$RUN_TIMEOUT" ]; then
        podman logs --tail 30 "$orch" >&2 || true
        die "the run did not finish within ${RUN_TIMEOUT}s (RUN_TIMEOUT)"
    fi
    sleep 2
done
total_restarts=0
for c in $(podman ps -a "${project[@]}" --format '{{.Names}}'); do
    total_restarts=$((total_restarts + $(podman inspect -f '{{.RestartCount}}' "$c")))
done
script_restarts=0
for c in "${!restarted[@]}"; do script_restarts=$((script_restarts + restarted[$c])); done
say "run done after $((SECONDS - t0)) s (restarts by podman: $total_restarts, by this script: $script_restarts)"
[ -f "$out/results.json" ] || die "the orchestrator exited 0 but wrote no $out/results.json"

# Print the table with the image's own fedseq (format_table), so the host needs no packages.
podman run --rm --no-healthcheck --network none -v "$out:/r:ro" --entrypoint python "$FEDSEQ_IMAGE" -c '
import json
from fedseq.results import format_table
r = json.load(open("/r/results.json"))
ep = r["epochs"]
print(format_table(ep, extra=("bytes_up", "bytes_down")))
s = r.get("summary", {})
print("epochs: %d  rounds: %s  run: %s  state: %s" % (len(ep), s.get("rounds"), s.get("run_id"), s.get("state")))
' || die "could not read $out/results.json"
say "results: $out/results.json"
