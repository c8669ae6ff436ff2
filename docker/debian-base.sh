#!/usr/bin/env bash
# A local stand-in for the Dockerfile's base image, for machines that reach Debian's package
# mirror but no image registry: a Debian 12 (bookworm) root filesystem made with debootstrap,
# with python3 and python3-venv (what python:3.11-slim-bookworm provides), imported into
# podman's local image storage.
#
#   docker/debian-base.sh [IMAGE]     # prints IMAGE (default localhost/tmbatch-base:bookworm)
#   podman build --network host --build-arg BASE="$(docker/debian-base.sh)" -t tmbatch:latest .
#
# Cached: when IMAGE already exists and was made from the same recipe (script, mirror, CA
# files), nothing is done. Needs root, debootstrap and podman.
#   DEBIAN_MIRROR        default http://deb.debian.org/debian
#   TMBATCH_BASE_CACHE   working directory for the root filesystem (default /var/tmp/tmbatch-base)
# Extra CA certificates of this host (/usr/local/share/ca-certificates/*.crt, e.g. a TLS-
# inspecting egress proxy's) are trusted inside the image too, so apt and pip work there as
# they do on the host; python:3.11-slim needs nothing of the kind on an open network.
set -euo pipefail

image=${1:-localhost/tmbatch-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache=${TMBATCH_BASE_CACHE:-/var/tmp/tmbatch-base}
packages=python3,python3-venv,ca-certificates
cas=()
for f in /usr/local/share/ca-certificates/*.crt; do [[ -f $f ]] && cas+=("$f"); done

for tool in debootstrap podman; do
    command -v "$tool" >/dev/null || { echo "debian-base: $tool not found (apt-get install $tool)" >&2; exit 2; }
done
[[ $(id -u) == 0 ]] || { echo "debian-base: debootstrap needs root" >&2; exit 2; }

key=$( { cat "$0"; echo "$mirror $packages"; cat ${cas[@]+"${cas[@]}"}; } | sha256sum | cut -c1-16)
mkdir -p "$cache"
exec 9>"$cache/lock"
flock 9    # two builds at once make it once

have=$(podman image inspect --format '{{index .Config.Labels "tmbatch.base.key"}}' "$image" \
       2>/dev/null || true)
if [[ $have == "$key" ]]; then
    echo "debian-base: $image is up to date (recipe $key)" >&2
    echo "$image"
    exit 0
fi

rootfs=$(mktemp -d "$cache/rootfs.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT
echo "debian-base: debootstrap bookworm ($packages) from $mirror ..." >&2
debootstrap --variant=minbase --include="$packages" bookworm "$rootfs" "$mirror" >&2
if ((${#cas[@]})); then
    cp "${cas[@]}" "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates >&2
fi
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
tar -C "$rootfs" --numeric-owner -cf - . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change "LABEL tmbatch.base.key=$key" \
    --change 'CMD ["/bin/bash"]' \
    - "$image" >&2
echo "$image"
