#!/usr/bin/env bash
# Builds the project's images (docs/images.md) and prints their tags, one a line:
#   scripts/build-images.sh [--nitro]
#     enclaveops/debian-base:bookworm   the local Debian base (scripts/build-base-image.sh), when BASE_IMAGE is it
#     enclaveops/runtime:<version>      the self-contained runtime (images/runtime)
#     enclaveops/sleeve-emulator:<version>  the sleeve base for nitro-emu (images/sleeve-emulator)
#     enclaveops/sleeve:<version>       with --nitro only: the sleeve base for Nitro hosts (images/sleeve-nitro)
# An image whose inputs (Dockerfile, build context, base and runtime image IDs) have the digest
# in its org.enclaveops.inputs label is not rebuilt. Environment: BASE_IMAGE (default the local
# Debian base), NITRO_BASE_IMAGE (default amazonlinux:2023), SOURCE_DATE_EPOCH (default 0),
# PYTHON (the interpreter with enclave-runtime installed; default .venv/bin/python).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
label=org.enclaveops.inputs
default_base=enclaveops/debian-base:bookworm
base=${BASE_IMAGE:-$default_base}
nitro_base=${NITRO_BASE_IMAGE:-amazonlinux:2023}
epoch=${SOURCE_DATE_EPOCH:-0}
python=${PYTHON:-}
if [ -z "$python" ]; then
    python=python3
    [ -x "$repo/.venv/bin/python" ] && python=$repo/.venv/bin/python
fi

nitro=
for arg in "$@"; do
    case $arg in
        --nitro) nitro=1 ;;
        -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-images: unknown argument $arg (usage: scripts/build-images.sh [--nitro])" >&2; exit 2 ;;
    esac
done

helper() { (cd "$repo" && "$python" -m enclave_runtime.build.project_images "$@"); }
image_id() { docker image inspect -f '{{.Id}}' "$1" 2>/dev/null || true; }
inputs_of() { docker image inspect -f "{{index .Config.Labels \"$label\"}}" "$1" 2>/dev/null || true; }

work=$(mktemp -d /var/tmp/enclaveops-images.XXXXXX)
trap 'rm -rf "$work"' EXIT

# build TAG DIGEST CONTEXT [docker build options...]: skip when TAG has DIGEST, else build it.
build() {
    local tag=$1 digest=$2 context=$3
    shift 3
    if [ "$(inputs_of "$tag")" = "$digest" ]; then
        echo "build-images: $tag is up to date" >&2
        return
    fi
    echo "build-images: building $tag" >&2
    if ! docker build --label "$label=$digest" -t "$tag" "$@" "$context" >"$work/build.log" 2>&1; then
        tail -30 "$work/build.log" >&2
        echo "build-images: building $tag failed" >&2
        exit 1
    fi
    rebuilt=1
}

# Untagged leftovers of earlier builds: replaced images (they carry the inputs label) and the
# runtime's build stage of earlier runs (this run's stays: it is the build cache).
prune() {
    docker image prune -f --filter "label=$label" >/dev/null
    docker image prune -f --filter "label=org.enclaveops.purpose=runtime-build" \
        --filter "until=$started" >/dev/null
}
started=$(date +%s)
rebuilt=

docker info >/dev/null 2>&1 || {
    echo "build-images: the Docker engine does not answer (as root: scripts/ensure-docker.sh)" >&2
    exit 1
}
if [ "$base" = "$default_base" ]; then
    "$repo/scripts/build-base-image.sh" "$base"
fi
base_id=$(image_id "$base")
if [ -z "$base_id" ]; then
    echo "build-images: base image $base not found locally; pull it or build it first" >&2
    exit 1
fi

runtime=$(helper tag runtime)
helper runtime-context "$work/runtime"
digest=$(helper digest "$work/runtime" --extra "base=$base_id" --extra "epoch=$epoch")
build "$runtime" "$digest" "$work/runtime" \
    --build-arg "BASE_IMAGE=$base" --build-arg "SOURCE_DATE_EPOCH=$epoch"
runtime_id=$(image_id "$runtime")

emulator=$(helper tag sleeve-emulator)
digest=$(helper digest "$repo/images/sleeve-emulator" --extra "base=$base_id" --extra "runtime=$runtime_id")
build "$emulator" "$digest" "$repo/images/sleeve-emulator" \
    --build-arg "BASE_IMAGE=$base" --build-arg "RUNTIME_IMAGE=$runtime"

tags=("$runtime" "$emulator")
if [ -n "$nitro" ]; then
    nitro_tag=$(helper tag sleeve-nitro)
    # The Amazon Linux base comes from a registry: its name (and ID when present) is the input.
    digest=$(helper digest "$repo/images/sleeve-nitro" --extra "base=$nitro_base $(image_id "$nitro_base")" \
        --extra "runtime=$runtime_id")
    build "$nitro_tag" "$digest" "$repo/images/sleeve-nitro" \
        --build-arg "BASE_IMAGE=$nitro_base" --build-arg "RUNTIME_IMAGE=$runtime"
    tags+=("$nitro_tag")
fi
[ -z "$rebuilt" ] || prune
printf '%s\n' "${tags[@]}"
