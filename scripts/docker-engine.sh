#!/usr/bin/env bash
# Make a Docker engine answer on this machine, for the container tests (tests/docker/) and CI.
#
# Idempotent, so CI calls it before every `make test`:
#   1. installs Debian's docker.io, docker-compose and debootstrap when they are missing (needs root);
#   2. starts dockerd in the background when no engine answers, and waits for it;
#   3. builds the test base image (Debian bookworm, minbase) with debootstrap when that tag is missing.
# Step 3 exists because no container registry is reachable here, so `FROM debian:bookworm` cannot be
# pulled; `make image-cpu` builds on this local image instead (BASE_IMAGE=finetune-test-base:bookworm).
#
# Usage: scripts/docker-engine.sh            engine + base image
#        scripts/docker-engine.sh --no-base  engine only
set -euo pipefail

# Debian's client has BuildKit built in; another `docker` earlier on PATH may lack it.
DOCKER=${DOCKER:-/usr/bin/docker}
BASE_IMAGE=${BASE_IMAGE:-finetune-test-base:bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DOCKERD_LOG=${DOCKERD_LOG:-/tmp/dockerd.log}

say() { echo "docker-engine: $*"; }

install_missing() {
    local missing=()
    [[ -x /usr/bin/docker && -x /usr/sbin/dockerd ]] || missing+=(docker.io)
    command -v docker-compose >/dev/null || missing+=(docker-compose)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    ((${#missing[@]})) || return 0
    if ((EUID != 0)); then
        say "missing ${missing[*]}; rerun as root or install them (apt-get install ${missing[*]})" >&2
        exit 1
    fi
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

start_engine() {
    if "$DOCKER" info >/dev/null 2>&1; then
        say "engine already answering"
        return 0
    fi
    say "starting dockerd (log: $DOCKERD_LOG)"
    # setsid: the daemon outlives this script and the shell that ran it.
    setsid dockerd >"$DOCKERD_LOG" 2>&1 < /dev/null &
    local waited=0
    until "$DOCKER" info >/dev/null 2>&1; do
        if ((waited >= 60)); then
            say "dockerd did not answer within 60 s; last lines of $DOCKERD_LOG:" >&2
            tail -n 20 "$DOCKERD_LOG" >&2
            exit 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    say "engine up after ${waited} s"
}

build_base_image() {
    if "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        say "base image $BASE_IMAGE already present"
        return 0
    fi
    local root
    root=$(mktemp -d /tmp/finetune-base.XXXXXX)
    say "building $BASE_IMAGE with debootstrap (about 30 s)"
    # The Dockerfile installs python3, python3-venv, tini and ca-certificates itself (it must, on the CUDA
    # base); having them here already saves that step a download on every cold build.
    debootstrap --variant=minbase --include=python3,python3-venv,tini,ca-certificates \
        bookworm "$root" "$DEBIAN_MIRROR" >/dev/null
    rm -rf "$root"/var/cache/apt/archives/*.deb
    tar -C "$root" -c . | "$DOCKER" import - "$BASE_IMAGE" >/dev/null
    rm -rf "$root"
    say "built $BASE_IMAGE"
}

install_missing
start_engine
[[ ${1:-} == --no-base ]] || build_base_image
