# Sourced by deploy/run-local.sh and deploy/k8s/play-local.sh (which define say, die and
# FEDSEQ_IMAGE): the certificates of a local run.
#
#   ensure_worker_certs DIR CLIENTS ATTACKERS
#
# DIR ends up with the CA, the service certificates, one `worker` certificate per identity
# (client-0 .. client-<CLIENTS-1>, attacker-0 .. attacker-<ATTACKERS-1>) and the orchestrator's
# roster naming each with its kind. They are made (again, the CA kept) with `fedseq certs`, in the
# image, when the CA, the roster, an identity's certificate or its roster entry is missing.
ensure_worker_certs() {
    local dir="$1" clients="$2" attackers="$3" have=1 n i
    local need=()
    for ((i = 0; i < clients; i++)); do need+=("client-$i"); done
    for ((i = 0; i < attackers; i++)); do need+=("attacker-$i"); done
    [ -f "$dir/ca.pem" ] && [ -f "$dir/roster.json" ] || have=0
    for n in server orchestrator "${need[@]}"; do [ -f "$dir/$n.pem" ] || have=0; done
    if [ "$have" = 1 ] && ! python3 -c 'import json,sys; w={e["name"]: e["kind"] for e in json.load(open(sys.argv[1]))["workers"]}; sys.exit(0 if all(w.get(n) == n.split("-")[0] for n in sys.argv[2:]) else 1)' \
            "$dir/roster.json" "${need[@]}" 2>/dev/null; then
        have=0
    fi
    if [ "$have" = 0 ]; then
        say "making certificates and the roster in $dir ($clients client(s), $attackers attacker(s); fedseq certs, in the image)"
        mkdir -p "$dir"
        podman run --rm --no-healthcheck --network none --user 0 -v "$dir:/tls" "$FEDSEQ_IMAGE" certs /tls \
            --clients "$clients" --attackers "$attackers" --unsharded >/dev/null || die "fedseq certs failed"
        chmod 0700 "$dir"
    fi
}
