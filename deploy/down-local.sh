#!/usr/bin/env bash
# Tear the compose project `fedseq` down to nothing: every container of the project (replicas
# added with `--scale` included, which `podman-compose down` does not know about), its pod, its
# volumes (the Redis data and the TLS volumes) and its network. Then check that nothing is left.
#
#   deploy/down-local.sh          # after KEEP_UP=1, a scaled `up`, or an interrupted run
#
# Exit 0 only when no container, pod, volume or network of the project remains.
set -Eeuo pipefail

die() { echo "down-local: ERROR: $*" >&2; exit 1; }
say() { echo "down-local: $*" >&2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${FEDSEQ_DEPLOY_CACHE:-/var/tmp/fedseq-deploy}"
PROJECT="${COMPOSE_PROJECT_NAME:-fedseq}"
if [ -f "$CACHE/env.sh" ]; then
    # shellcheck disable=SC1091
    source "$CACHE/env.sh"
fi
command -v podman >/dev/null || die "podman not found"

label="label=io.podman.compose.project=$PROJECT"
if command -v podman-compose >/dev/null; then
    # the files' own teardown first (stop order, pod); it misses containers of `--scale`
    podman-compose -p "$PROJECT" -f "$ROOT/deploy/compose.yaml" --profile attack down -v -t "${STOP_TIMEOUT:-10}" \
        >/dev/null 2>&1 || true
fi
# --depend: compose's depends_on became podman --requires links, and podman refuses to remove a
# container that others still require; a few passes catch any order
for pass in 1 2 3; do
    ids="$(podman ps -a -q --filter "$label")"
    [ -n "$ids" ] || break
    say "removing $(echo "$ids" | wc -l) container(s) that 'down' left"
    # shellcheck disable=SC2086
    podman rm -f --depend -t "${STOP_TIMEOUT:-10}" $ids >/dev/null 2>&1 || true
done
for pod in $(podman pod ls -q --filter "name=^pod_${PROJECT}\$" 2>/dev/null); do podman pod rm -f "$pod" >/dev/null; done
for v in $(podman volume ls -q --filter "$label"); do podman volume rm -f "$v" >/dev/null; done
for n in $(podman network ls -q --filter "$label"); do podman network rm -f "$n" >/dev/null; done

left_c="$(podman ps -a -q --filter "$label" | wc -l)"
left_p="$(podman pod ls -q --filter "name=^pod_${PROJECT}\$" 2>/dev/null | wc -l)"
left_v="$(podman volume ls -q --filter "$label" | wc -l)"
left_n="$(podman network ls -q --filter "$label" | wc -l)"
[ "$left_c$left_p$left_v$left_n" = 0000 ] \
    || die "left behind: $left_c container(s), $left_p pod(s), $left_v volume(s), $left_n network(s) of project $PROJECT"
say "project $PROJECT: no container, pod, volume or network left"
