#!/usr/bin/env bash
# Run the README's two set-up commands, exactly as written, on a fresh Debian 12 system: a
# container of the image docker/debian-base.sh makes (debootstrap bookworm with python3 and
# python3-venv and nothing else of tmbatch's), as root, with the committed tree (git archive
# HEAD) copied in as a fresh clone would be. Prints each command, its output and exit code.
#
#   docker/readme-setup-check.sh        # needs root, podman, debootstrap and git
#
# PODMAN overrides the podman command, e.g. PODMAN="podman --runtime runc".
set -euo pipefail
cd "$(dirname "$0")/.."
read -r -a podman <<<"${PODMAN:-podman}"
mapfile -t commands < <(grep -E '^    python3 -m venv ' README.md | sed 's/^    //')
((${#commands[@]} == 2)) || { echo "expected 2 set-up commands in README.md" >&2; exit 2; }
base=$(docker/debian-base.sh)

# The container gets this shell's own limits: rootful podman asks for more open files than a
# host with a lower hard limit allows.
nofile=$(ulimit -Hn) nproc=$(ulimit -Hu) pid_max=$(cat /proc/sys/kernel/pid_max)
if [[ $nproc == unlimited ]] || ((nproc > pid_max)); then nproc=$pid_max; fi
limits=(--ulimit "nproc=$nproc:$nproc")
if [[ $nofile != unlimited ]]; then limits+=(--ulimit "nofile=$nofile:$nofile"); fi

# shellcheck disable=SC2016  # expanded in the container, not here
script='set -u; cd /root/tmbatch
. /etc/os-release; echo "== $PRETTY_NAME, $(python3 --version), as $(id -un)"
for cmd in "$@"; do
    echo "== \$ $cmd"
    bash -c "$cmd"; rc=$?
    echo "== exit $rc"
    [ $rc = 0 ] || exit $rc
done'
# shellcheck disable=SC2016
git archive --format=tar --prefix=tmbatch/ HEAD | "${podman[@]}" run --rm -i --network host \
    "${limits[@]}" "$base" bash -c 'tar -x -C /root && exec bash -c "$1" check "${@:2}"' \
    untar "$script" "${commands[@]}"
