#!/usr/bin/env bash
# Build and run flowsort's CPU image with podman, as root, on a Debian bookworm host that has no
# container registry and no Docker daemon (CI). All podman settings and the base-image stand-in live here.
#
#   deploy/podman/ci.sh build TAG        the base stand-in (made once), then deploy/Dockerfile.cpu as TAG
#   deploy/podman/ci.sh podman ARGS...   podman with these settings: run, logs, stop, rm, ...
#
# * Base image. No registry is reachable, so python:3.11-slim-bookworm is stood in for by Debian
#   bookworm itself (debootstrap minbase with python3 3.11, pip and venv), imported under the base's
#   name. pip's EXTERNALLY-MANAGED marker is removed and `python`/`pip` are linked, as in the real
#   image. The stand-in carries a label keyed by the text of base() below: it is made again only
#   when that changes. A real python:3.11-slim-bookworm already present (no label) is used as is.
# * Settings (containers.conf): runc, since crun refuses this kernel's cgroup setup; host networking;
#   ulimits within this shell's hard limits (podman's defaults exceed them), processes at most 32768.
# * Build: --pull=never, --isolation=chroot, the host's CA bundle lent to RUN steps so pip reaches
#   the package index, Docker's image format (OCI drops HEALTHCHECK), layers cached between builds,
#   and all of it at nice 19.
#
# Environment: FLOWSORT_PODMAN_STATE (default /var/tmp/flowsort-podman: containers.conf, lock),
# DEBIAN_MIRROR (default: the mirror apt uses here, else deb.debian.org).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
STAND_IN_LABEL=org.flowsort.base-stand-in
STATE=${FLOWSORT_PODMAN_STATE:-/var/tmp/flowsort-podman}
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

die() { echo "ci.sh: $*" >&2; exit 1; }

hard_limit() {  # ulimit -H "$1", at most "$2"
    local value
    value=$(ulimit -H "$1")
    [[ $value == unlimited || $value -gt $2 ]] && echo "$2" || echo "$value"
}

configure() {
    mkdir -p "$STATE"
    local nofile nproc
    nofile=$(hard_limit -n 1048576)
    # RUN steps under chroot isolation start at 32768 processes and may not raise it.
    nproc=$(hard_limit -u 32768)
    cat > "$STATE/containers.conf.$$" <<CONF
[containers]
netns = "host"
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
CONF
    mv "$STATE/containers.conf.$$" "$STATE/containers.conf"  # atomic: another run may be reading it
    export CONTAINERS_CONF="$STATE/containers.conf"
}

debian_mirror() {
    if [[ -n ${DEBIAN_MIRROR:-} ]]; then
        echo "$DEBIAN_MIRROR"
        return
    fi
    local uri
    uri=$(grep -hoE '^URIs: *[^ ]+/debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1 | awk '{print $2}')
    [[ -z $uri ]] && uri=$(grep -hoE '^deb +[^ ]+/debian/? +bookworm' /etc/apt/sources.list 2>/dev/null | head -1 | awk '{print $2}')
    echo "${uri:-http://deb.debian.org/debian}"
}

base() {
    local key label
    key=$({ declare -f base; echo "$BASE_IMAGE"; } | sha256sum | cut -c1-16)
    if podman image exists "$BASE_IMAGE"; then
        label=$(podman image inspect --format "{{index .Config.Labels \"$STAND_IN_LABEL\"}}" "$BASE_IMAGE")
        if [[ $label == "$key" ]]; then
            return
        elif [[ -z $label || $label == "<no value>" ]]; then
            echo "ci.sh: using the $BASE_IMAGE found here, not a stand-in"
            return
        fi
    fi
    command -v debootstrap > /dev/null || die "debootstrap is needed to make the base image stand-in"
    echo "ci.sh: making the $BASE_IMAGE stand-in from Debian bookworm ($(debian_mirror))"
    rootfs=$(mktemp -d "$STATE/rootfs.XXXXXX")
    trap 'rm -rf "$rootfs"' EXIT
    nice -n 19 debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
        bookworm "$rootfs" "$(debian_mirror)" > "$STATE/debootstrap.log" 2>&1 \
        || die "debootstrap failed: $(tail -5 "$STATE/debootstrap.log")"
    rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
    ln -sf python3 "$rootfs/usr/bin/python"
    ln -sf pip3 "$rootfs/usr/bin/pip"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import \
        --change "LABEL $STAND_IN_LABEL=$key" --change 'CMD ["python3"]' - "$BASE_IMAGE" > /dev/null
}

build() {
    local tag=${1:?usage: ci.sh build TAG}
    base
    nice -n 19 podman build --pull=never --isolation=chroot --layers --format docker \
        -v "$CA_BUNDLE:$CA_BUNDLE:ro" -f "$REPO/deploy/Dockerfile.cpu" -t "$tag" "$REPO"
}

[[ $(id -u) == 0 ]] || die "run as root (podman here builds and runs containers as root)"
command -v podman > /dev/null || die "podman is not installed (apt-get install podman runc)"
configure
case ${1:-} in
    build) shift; exec 9> "$STATE/lock"; flock 9; build "$@" ;;
    podman) shift; exec podman "$@" ;;
    *) die "usage: ci.sh build TAG | ci.sh podman ARGS..." ;;
esac
