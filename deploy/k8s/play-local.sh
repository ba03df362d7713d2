#!/usr/bin/env bash
# Run the Kubernetes manifests (deploy/k8s/base, or an overlay: FEDSEQ_K8S_DIR) for real on this
# machine with `podman kube play`, on the images of deploy/build-local.sh, to a finished
# federation; print the results and tear everything down. podman 4.3 plays Pods, Deployments and
# PersistentVolumeClaims only: podman_kube.py renders the kustomization and lowers the rest (the
# Job, startup probes, NetworkPolicy, PodDisruptionBudgets...: see its docstring).
#
#   deploy/k8s/play-local.sh
#   FEDSEQ_DATASET='synthetic:users=60,items=80' FEDSEQ_EPOCHS=2 FEDSEQ_CLIENTS_PER_ROUND=16 \
#     FEDSEQ_NUM_NEGATIVES=50 FEDSEQ_CLIENTS=3 FEDSEQ_ATTACK=dv-fsr FEDSEQ_MALICIOUS_RATIO=0.05 \
#     FEDSEQ_DEFENSE=mixed-rfa deploy/k8s/play-local.sh
#
# FEDSEQ_<KEY> variables that are keys of base/configmap.yaml override it; FEDSEQ_CLIENTS and
# FEDSEQ_ATTACKERS set the worker Deployments client-0.. and attacker-0.. (attackers only with
# FEDSEQ_ATTACK set), each with its own certificate; the orchestrator's Secret carries the roster. KEEP_UP=1
# leaves the pods running (tear down: podman kube down $FEDSEQ_DEPLOY_CACHE/k8s-play.yaml).
set -Eeuo pipefail

die() { echo "play-local: ERROR: $*" >&2; exit 1; }
say() { echo "play-local: $*" >&2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BASE="$ROOT/deploy/k8s/base"
# what to render: the base (default) or an overlay folder (deploy/k8s/overlays/attack: then set
# FEDSEQ_ATTACK too, which decides how many attacker workers play)
K8S_DIR="${FEDSEQ_K8S_DIR:-$BASE}"
[ -f "$K8S_DIR/kustomization.yaml" ] || die "FEDSEQ_K8S_DIR=$K8S_DIR: no kustomization.yaml there"
CACHE="${FEDSEQ_DEPLOY_CACHE:-/var/tmp/fedseq-deploy}"
RUN_TIMEOUT="${RUN_TIMEOUT:-1800}"
KEEP_UP="${KEEP_UP:-0}"
PLAY="$CACHE/k8s-play.yaml"

[ -f "$CACHE/env.sh" ] || die "$CACHE/env.sh not found: run deploy/build-local.sh first"
# shellcheck disable=SC1091
source "$CACHE/env.sh"
source "$ROOT/deploy/certs-local.sh"  # ensure_worker_certs
PY="$CACHE/tools/bin/python"   # the podman-compose venv: it has PyYAML
[ -x "$PY" ] && "$PY" -c 'import yaml' 2>/dev/null || die "$PY with PyYAML not found: run deploy/build-local.sh"
for img in "$FEDSEQ_IMAGE" "$REDIS_IMAGE"; do
    podman image exists "$img" || die "image $img is missing: run deploy/build-local.sh"
done

# ---------------------------------------------------------------- certificates -> the Secrets' files
clients="${FEDSEQ_CLIENTS:-2}"
attackers=0
[ "${FEDSEQ_ATTACK:-none}" != none ] && attackers="${FEDSEQ_ATTACKERS:-1}"
[ "$clients" -ge 1 ] 2>/dev/null || die "FEDSEQ_CLIENTS=$clients: need 1 or more client workers"
# one certificate per worker (the base's client-0, client-1, attacker-0 at least) and the roster
cert_clients=$((clients > 2 ? clients : 2))
cert_attackers=$((attackers > 1 ? attackers : 1))
names=(server orchestrator)
for ((i = 0; i < cert_clients; i++)); do names+=("client-$i"); done
for ((i = 0; i < cert_attackers; i++)); do names+=("attacker-$i"); done
CERTS="${FEDSEQ_CERTS:-$BASE/tls}"
ensure_worker_certs "$CERTS" "$cert_clients" "$cert_attackers"  # deploy/certs-local.sh
secrets="$CACHE/k8s-secrets"
rm -rf "$secrets"
for n in "${names[@]}"; do   # what kubelet mounts from each Secret (fsGroup 10001)
    d="$secrets/fedseq-tls-$n"; mkdir -p "$d"
    cp "$CERTS/ca.pem" "$CERTS/$n.pem" "$CERTS/$n.key" "$d/" || die "$CERTS lacks $n's certificate"
    # the roster: in the orchestrator's Secret only (kustomization.yaml), never the server's
    if [ "$n" = orchestrator ]; then cp "$CERTS/roster.json" "$d/" || die "$CERTS lacks roster.json"; fi
    chown -R 10001:10001 "$d"; chmod 0444 "$d"/*.pem; chmod 0400 "$d/$n.key"
    if [ -f "$d/roster.json" ]; then chmod 0444 "$d/roster.json"; fi
done

# ---------------------------------------------------------------- render
sets=()
for key in $("$PY" -c 'import sys,yaml; print(" ".join(yaml.safe_load(open(sys.argv[1]))["data"]))' "$BASE/configmap.yaml"); do
    [ -n "${!key+x}" ] && sets+=(--set "$key=${!key}")
done
[ -n "${FEDSEQ_MIN_WORKERS:-}" ] || sets+=(--set "FEDSEQ_MIN_WORKERS=$((clients + attackers))")
run_id="${FEDSEQ_RUN_ID:-k8s-$(date +%Y%m%d-%H%M%S)}"
sets+=(--set "FEDSEQ_RUN_ID=$run_id")
"$PY" "$ROOT/deploy/k8s/podman_kube.py" "$K8S_DIR" "$secrets" "$PLAY" \
    --image "fedseq=$FEDSEQ_IMAGE" --image "redis=$REDIS_IMAGE" \
    --workers "client=$clients" --workers "attacker=$attackers" "${sets[@]}" 2>"$CACHE/k8s-render.log" \
    || die "rendering failed: $(cat "$CACHE/k8s-render.log")"
pods=$("$PY" -c 'import sys,yaml; print(" ".join(d["metadata"]["name"] for d in yaml.safe_load_all(open(sys.argv[1])) if d["kind"]=="Pod"))' "$PLAY")
claims=$("$PY" -c 'import sys,yaml; print(" ".join(d["metadata"]["name"] for d in yaml.safe_load_all(open(sys.argv[1])) if d["kind"]=="PersistentVolumeClaim"))' "$PLAY")

down() {
    podman kube down "$PLAY" >/dev/null 2>&1 || true
    local p v
    for p in $pods; do podman pod rm -f "$p" >/dev/null 2>&1 || true; done
    for v in $claims; do podman volume rm -f "$v" >/dev/null 2>&1 || true; done
    if [ -z "$(podman ps -a -q --filter network=podman-default-kube-network)" ]; then
        podman network rm -f podman-default-kube-network >/dev/null 2>&1 || true
    fi
}
left() {
    local n=0 p v
    for p in $pods; do podman pod exists "$p" && n=$((n + 1)); done
    for v in $claims; do podman volume exists "$v" && n=$((n + 1)); done
    podman network exists podman-default-kube-network && n=$((n + 1))
    echo "$n"
}
out="$ROOT/deploy/results/$run_id"
teardown() {
    local rc=$?
    trap - EXIT
    if [ "$KEEP_UP" = 1 ]; then say "KEEP_UP=1: pods keep running (podman kube down $PLAY)"; exit "$rc"; fi
    mkdir -p "$out"
    for p in $pods; do
        for c in $(podman pod inspect "$p" -f '{{range .Containers}}{{.Name}} {{end}}' 2>/dev/null); do
            case "$c" in *-infra) continue ;; esac
            echo "===== $c"; podman logs "$c" 2>&1 || true
        done
    done >"$out/pods.log" 2>&1
    say "pod logs: $out/pods.log"
    local t=$SECONDS
    down
    [ "$(left)" = 0 ] || { say "ERROR: left behind: $(left) pod(s)/volume(s)/network"; rc=1; }
    say "teardown took $((SECONDS - t)) s; pods, volumes and the kube network gone: $([ "$(left)" = 0 ] && echo yes || echo NO)"
    exit "$rc"
}

say "clearing leftovers of an earlier play (if any)"
down
say "run $run_id: pods $pods"
trap teardown EXIT
trap 'exit 130' INT TERM
t0=$SECONDS
podman kube play "$PLAY" >"$CACHE/k8s-play.log" 2>&1 || die "podman kube play failed; last lines of $CACHE/k8s-play.log:
$(grep -v systemd "$CACHE/k8s-play.log" | tail -20)"
say "pods up in $((SECONDS - t0)) s; waiting for the orchestrator (timeout ${RUN_TIMEOUT}s)"
orch=orchestrator-orchestrator
results="$(podman volume inspect fedseq-results -f '{{.Mountpoint}}')/results.json"
last=-1
while :; do
    read -r status code < <(podman inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$orch")
    epochs="$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["epochs"]))' "$results" 2>/dev/null || echo 0)"
    [ "$epochs" = "$last" ] || { say "t=$((SECONDS - t0))s orchestrator $status, epochs recorded: $epochs"; last=$epochs; }
    if [ "$status" = exited ] && [ "$code" = 0 ]; then break; fi
    if [ $((SECONDS - t0)) -gt "$RUN_TIMEOUT" ]; then
        podman logs --tail 30 "$orch" >&2 || true
        die "the run did not finish within ${RUN_TIMEOUT}s"
    fi
    sleep 3
done
state="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["summary"]["state"])' "$results" 2>/dev/null || echo none)"
say "orchestrator finished after $((SECONDS - t0)) s, state $state"
mkdir -p "$out"; cp "$results" "$out/results.json"
podman run --rm --no-healthcheck --network none -v "$out:/r:ro" --entrypoint python "$FEDSEQ_IMAGE" -c '
import json
from fedseq.results import format_table
r = json.load(open("/r/results.json"))
print(format_table(r["epochs"], extra=("bytes_up", "bytes_down")))
s = r.get("summary", {})
print("epochs: %d  rounds: %s  run: %s  state: %s" % (len(r["epochs"]), s.get("rounds"), s.get("run_id"), s.get("state")))
'
[ "$state" = done ] || die "the run ended in state $state"
say "results: $out/results.json"
