#!/usr/bin/env bash
# Builds the imagemesh image with buildah, without pulling anything from a container registry:
#
#  1. a base root filesystem made with mmdebstrap from a Debian mirror (bookworm, the Essential
#     packages plus what the services run: ca-certificates, buildah, runc, skopeo, fuse3),
#     cached as a tarball and imported as a local image (localhost/imagemesh-base:bookworm);
#     a second run with the same recipe reuses both;
#  2. deploy/Dockerfile on top of it (ARG BASE), copying in the service binaries cargo built on
#     this host (stripped of debug info). Nothing is compiled inside a container.
#
# Environment:
#   IMAGE          the image to make (localhost/imagemesh:latest)
#   BASE           a base image to use instead of building one (e.g. debian:bookworm-slim with
#                  the packages above installed; see docs/deploy.md, "The image")
#   BIN_DIR        where the binaries are (${CARGO_TARGET_DIR:-target}/release)
#   DEBIAN_MIRROR  the mirror mmdebstrap downloads from (http://deb.debian.org/debian)
#   IMAGE_CACHE    where the base tarball is kept (.stack/image)
#   CONTAINERS_STORAGE_CONF  as for buildah and podman: another image store (the tests use
#                  their own); the host's default store otherwise
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
image=${IMAGE:-localhost/imagemesh:latest}
bin=${BIN_DIR:-${CARGO_TARGET_DIR:-$root/target}/release}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache=${IMAGE_CACHE:-$root/.stack/image}
suite=bookworm
# What the services run besides their own binaries: buildah, runc and skopeo (builder),
# fuse3 (mounter: fusermount3 where it cannot mount itself, and to detach mounts by hand), CA
# certificates (registries over TLS).
packages=ca-certificates,buildah,runc,skopeo,fuse3
# usr-is-merged named, else apt satisfies init-system-helpers with usrmerge, which brings perl.
packages_also=usr-is-merged
# The services' user where they can do without root (credential, scheduler, indexer).
service_uid=65532

for b in credential scheduler builder indexer mounter mount-keeper; do
  [ -x "$bin/imagemesh-$b" ] || { echo "missing $bin/imagemesh-$b: build the workspace first" >&2; exit 1; }
done
[ -x "$bin/imagemesh" ] || { echo "missing $bin/imagemesh: build the workspace first" >&2; exit 1; }

mkdir -p "$cache"
if [ -z "${BASE:-}" ]; then
  # The cache key is the recipe: a change to any of these makes a new base.
  recipe="v2 $suite $mirror $packages,$packages_also $service_uid"
  key=$(printf '%s' "$recipe" | sha256sum | cut -c1-12)
  BASE=localhost/imagemesh-base:$suite-$key
  tarball="$cache/base-$suite-$key.tar"
  if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
    if [ ! -s "$tarball" ]; then
      echo "== base root filesystem: mmdebstrap $suite ($packages) from $mirror"
      start=$(date +%s)
      # No documentation, manual pages or translations; no apt (the image installs nothing).
      mmdebstrap --quiet --format=tar --variant=essential --include="$packages,$packages_also" \
        --aptopt='APT::Install-Recommends "false"' \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/lintian/*' \
        --customize-hook="echo 'imagemesh:x:$service_uid:$service_uid:imagemesh:/nonexistent:/usr/sbin/nologin' >> \"\$1/etc/passwd\"" \
        --customize-hook="echo 'imagemesh:x:$service_uid:' >> \"\$1/etc/group\"" \
        --customize-hook='rm -rf "$1"/var/cache/* "$1"/var/log/* "$1"/var/lib/apt/lists/*' \
        "$suite" "$tarball.partial" "$mirror"
      mv "$tarball.partial" "$tarball"
      echo "== base root filesystem: $(du -h "$tarball" | cut -f1) in $(( $(date +%s) - start ))s"
    fi
    echo "== importing $tarball as $BASE"
    ctr=$(buildah from scratch)
    trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
    buildah add --quiet "$ctr" "$tarball" / >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      --label org.imagemesh.base-recipe="$recipe" "$ctr"
    buildah commit --quiet --rm "$ctr" "$BASE" >/dev/null
    trap - EXIT
    buildah tag "$BASE" "localhost/imagemesh-base:$suite"
  fi
fi

# The build context: the binaries only, without debug info.
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
mkdir "$context/bin"
for b in "$bin"/imagemesh "$bin"/imagemesh-{credential,scheduler,builder,indexer,mounter,mount-keeper}; do
  objcopy --strip-debug "$b" "$context/bin/$(basename "$b")"
done
echo "== $image from $BASE"
previous=$(buildah inspect --type image --format '{{.FromImageID}}' "$image" 2>/dev/null || true)
buildah bud --quiet --layers=false --build-arg BASE="$BASE" -f "$root/deploy/Dockerfile" \
  -t "$image" "$context" >/dev/null
# The image this one replaces (now untagged) goes, unless a container still uses it.
current=$(buildah inspect --type image --format '{{.FromImageID}}' "$image")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
  buildah rmi "$previous" >/dev/null 2>&1 || true
fi
echo "== $image: $(du -ch "$context"/bin/* | tail -1 | cut -f1) of binaries on the base"
if command -v podman >/dev/null; then
  podman image inspect --format '== {{.Size}} bytes in all' "$image"
fi
