#!/usr/bin/env bash
# Brings the whole imagemesh mesh up on loopback: NATS with JetStream, the build registry in
# token mode with the credential service as its token issuer (no registry password exists), and
# the five services; pushes a base image, then submits one build request and one runtime request
# and prints their status flow. Ctrl-C stops everything it started.
#
# The mesh is secured as deployed (docs/security.md): a fresh bundle of identities (one nkey per
# service instance, the operator, a client of the default tenant), a local CA and the
# nats-server authorization config rendered from the permission table; TLS on the client port,
# JetStream encrypted at rest; the operator provisions the streams, every service and the CLI
# connect with their own identity. IMAGEMESH_OPEN_BUS=1 runs an open server instead.
#
# Environment: IMAGEMESH_NATS_PORT (4222), IMAGEMESH_REGISTRY_PORT (5000),
# IMAGEMESH_TOKEN_PORT (5001: the credential service's HTTP token endpoint, the registry's realm),
# IMAGEMESH_STACK_DIR (.stack/run), IMAGEMESH_BIN_DIR (target/debug),
# IMAGEMESH_RUN_ONCE=1 to stop after the demo requests (used by `make smoke`).
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
nats_port=${IMAGEMESH_NATS_PORT:-4222}
registry_port=${IMAGEMESH_REGISTRY_PORT:-5000}
stack=${IMAGEMESH_STACK_DIR:-$root/.stack/run}
bin=${IMAGEMESH_BIN_DIR:-${CARGO_TARGET_DIR:-$root/target}/debug}
token_port=${IMAGEMESH_TOKEN_PORT:-5001}
registry="127.0.0.1:$registry_port"
nats_url="nats://127.0.0.1:$nats_port"

pids=()
stop_all() {
  trap - EXIT INT TERM
  echo "stopping the mesh"
  for ((i=${#pids[@]}-1; i>=0; i--)); do kill "${pids[$i]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # A stopped mounter leaves its mounts to the mount keeper (stopped too): detach them, the
  # bundles' overlays first.
  awk -v dir="$stack/bundles/" 'index($2, dir) == 1 {print $2}' /proc/mounts | xargs -r -n1 umount -l 2>/dev/null || true
  awk -v dir="$stack/" 'index($2, dir) == 1 {print $2}' /proc/mounts | xargs -r -n1 fusermount3 -uz 2>/dev/null || true
}
trap stop_all EXIT
trap 'exit 130' INT TERM

for b in credential scheduler builder indexer mounter mount-keeper; do
  [ -x "$bin/imagemesh-$b" ] || { echo "missing $bin/imagemesh-$b: run 'make build'" >&2; exit 1; }
done
# A previous run killed hard may have left FUSE mounts under the stack: detach them first.
awk -v dir="$stack/bundles/" 'index($2, dir) == 1 {print $2}' /proc/mounts | xargs -r -n1 umount -l 2>/dev/null || true
awk -v dir="$stack/" 'index($2, dir) == 1 {print $2}' /proc/mounts | xargs -r -n1 fusermount3 -uz 2>/dev/null || true
rm -rf "$stack" && mkdir -p "$stack"/{nats,registry,config,logs,base,builder,mounts,access,issuer}
# Private to root, but for the way to builder/: RUN steps run as unprivileged mapped users, which
# must reach their root filesystems there by path (docs/builder.md, The sandbox).
chmod 711 "$stack"
chmod 700 "$stack"/{nats,registry,config,logs,base,mounts,access,issuer}

wait_port() { # host port what
  for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0; sleep 0.05; done
  echo "$3 did not start; see $stack/logs" >&2; exit 1
}

# --- NATS with JetStream: identities, TLS and permissions from the table
access="$stack/access"
service_env() { :; }
if [ "${IMAGEMESH_OPEN_BUS:-0}" = 1 ]; then
  nats-server -a 127.0.0.1 -p "$nats_port" -js -sd "$stack/nats" >"$stack/logs/nats.log" 2>&1 &
  pids+=($!)
else
  "$bin/imagemesh" nats-config generate "$access" --tenants default \
    --builder builder-1 --mounter mounter-1 >/dev/null
  "$bin/imagemesh" nats-config server "$access" --listen "127.0.0.1:$nats_port" \
    --store "$stack/nats" >"$stack/nats.conf"
  nats-server -c "$stack/nats.conf" >"$stack/logs/nats.log" 2>&1 &
  pids+=($!)
  # The environment that makes a service connect as identity $1.
  service_env() { "$bin/imagemesh" nats-config env "$access" "$1"; }
fi
wait_port 127.0.0.1 "$nats_port" nats-server
if [ "${IMAGEMESH_OPEN_BUS:-0}" != 1 ]; then
  # The operator provisions every stream and bucket; no service may.
  (eval "$("$bin/imagemesh" nats-config env "$access" operator --cli)"; \
   NATS_URL="$nats_url" "$bin/imagemesh" provision --bundle "$access")
fi

# --- the build registry in token mode: it trusts tokens signed by the credential service's key
# and sends tools that do the challenge themselves to the credential service's token endpoint
"$bin/imagemesh" registry issuer-key "$stack/issuer" >/dev/null
cat >"$stack/registry/config.yml" <<YAML
version: 0.1
log: { level: warn, accesslog: { disabled: true } }
storage: { filesystem: { rootdirectory: $stack/registry/data }, delete: { enabled: true } }
http: { addr: $registry }
auth:
  token:
    realm: http://127.0.0.1:$token_port/token
    service: imagemesh-build-registry
    issuer: imagemesh-credential
    rootcertbundle: $stack/issuer/issuer.crt.pem
YAML
docker-registry serve "$stack/registry/config.yml" >"$stack/logs/registry.log" 2>&1 &
pids+=($!)
wait_port 127.0.0.1 "$registry_port" docker-registry

# --- service configs: deploy/config/*.toml with this stack's addresses
cat >"$stack/config/credential.toml" <<TOML
[nats]
url = "$nats_url"
[credential.token_endpoint]
listen = "127.0.0.1:$token_port"
[[credential.registries]]
provider = "issuer"
host = "$registry"
service = "imagemesh-build-registry"
issuer = "imagemesh-credential"
signing_key = { file = "$stack/issuer/issuer.key.pem" }
certificate = "$stack/issuer/issuer.crt.pem"
TOML
cat >"$stack/config/scheduler.toml" <<TOML
[nats]
url = "$nats_url"
[scheduler]
build_registry = "$registry"
build_repository = "imagemesh/builds"
# The demo's base image: every tenant may build FROM it.
shared_repositories = ["imagemesh/base"]
TOML
cat >"$stack/config/builder.toml" <<TOML
[nats]
url = "$nats_url"
[builder]
storage_dir = "$stack/builder"
TOML
cat >"$stack/config/indexer.toml" <<TOML
[nats]
url = "$nats_url"
TOML
cat >"$stack/config/mounter.toml" <<TOML
[nats]
url = "$nats_url"
[mounter]
mount_root = "$stack/mounts"
bundle_root = "$stack/bundles"
keeper_socket = "$stack/keeper/keeper.sock"
[mounter.cache]
disk_dir = "$stack/cache"
TOML

# The mount keeper first: it holds the mounter's FUSE connections, so mounts outlive a mounter
# restart (docs/mounter.md, "Mounts survive the mounter"). It needs no NATS identity.
"$bin/imagemesh-mount-keeper" --socket "$stack/keeper/keeper.sock" >"$stack/logs/mount-keeper.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 200); do [ -S "$stack/keeper/keeper.sock" ] && break; sleep 0.05; done

# Each instance with its own identity (builder and mounter: bound to their worker ids).
declare -A identity=([credential]=credential-1 [scheduler]=scheduler-1 [indexer]=indexer-1
  [builder]=builder-1 [mounter]=mounter-1)
for service in credential scheduler builder indexer mounter; do
  (
    eval "$(service_env "${identity[$service]}")"
    case $service in
      builder) export IMAGEMESH_BUILDER__PLACEMENT__WORKER_ID=builder-1 ;;
      mounter) export IMAGEMESH_MOUNTER__PLACEMENT__WORKER_ID=mounter-1 ;;
    esac
    exec "$bin/imagemesh-$service" --config "$stack/config/$service.toml" >"$stack/logs/$service.log" 2>&1
  ) &
  pids+=($!)
done
echo "mesh up: NATS $nats_url, registry $registry, logs in $stack/logs"

# --- a base image for the demo build: busybox-static in a scratch image
layout="$stack/base/layout"
umoci init --layout "$layout" >/dev/null
umoci new --image "$layout:busybox" >/dev/null
mkdir -p "$stack/base/rootfs/bin"
cp /bin/busybox "$stack/base/rootfs/bin/busybox"
for tool in sh cat ls mkdir echo; do ln -sf busybox "$stack/base/rootfs/bin/$tool"; done
umoci insert --image "$layout:busybox" "$stack/base/rootfs/bin" /bin >/dev/null
umoci config --image "$layout:busybox" --config.entrypoint /bin/sh >/dev/null
# The operator's one-time login: skopeo exchanges it at the token endpoint for one push token.
operator() { # runs the CLI as the operator
  if [ "${IMAGEMESH_OPEN_BUS:-0}" = 1 ]; then NATS_URL="$nats_url" "$bin/imagemesh" "$@"; return; fi
  (eval "$("$bin/imagemesh" nats-config env "$access" operator --cli)"; NATS_URL="$nats_url" "$bin/imagemesh" "$@")
}
wait_port 127.0.0.1 "$token_port" "the credential service's token endpoint"
operator registry login "$registry/imagemesh/base" --push --authfile "$stack/base/auth.json" 2>/dev/null
skopeo copy -q --dest-tls-verify=false --dest-authfile "$stack/base/auth.json" \
  "oci:$layout:busybox" "docker://$registry/imagemesh/base:busybox"
rm -f "$stack/base/auth.json"
echo "pushed base image $registry/imagemesh/base:busybox (with a one-time login)"

# --- the demo: one build request, one runtime request, as the default tenant's client
export NATS_URL="$nats_url"
if [ "${IMAGEMESH_OPEN_BUS:-0}" != 1 ]; then
  eval "$("$bin/imagemesh" nats-config env "$access" client-default --cli)"
fi
image_id="demo-$(date +%s)"
context="$stack/demo"
mkdir -p "$context"
sed "s|BASE_IMAGE|$registry/imagemesh/base:busybox|" "$root/deploy/local/demo/Dockerfile" >"$context/Dockerfile"
cp "$root/deploy/local/demo/hello.txt" "$context/"

echo; echo "== build request (image id $image_id): context uploaded, built with buildah, pushed, indexed"
"$bin/imagemesh" build --image-id "$image_id" --timeout 5m "$context"
echo; echo "== runtime request (mounts $image_id lazily)"
"$bin/imagemesh" submit --kind runtime --image-id "$image_id" --container-id "demo" --watch --timeout 2m
echo; echo "== a file read through the lazy mount (only the byte ranges read are fetched)"
cat "$stack/mounts/demo/srv/hello.txt"
echo; echo "== the same image from the command line, one range request per file"
operator registry login "$registry/imagemesh/builds/default" | "$bin/imagemesh" index cat \
  "$registry/imagemesh/builds/default:$image_id" /srv/data/greeting \
  --username imagemesh-login --password-stdin --stats

if [ "${IMAGEMESH_RUN_ONCE:-0}" = 1 ]; then
  exit 0
fi
echo; echo "the mesh keeps running; as the default tenant's client:"
echo "  eval \"\$($bin/imagemesh nats-config env $access client-default --cli)\"; NATS_URL=$nats_url $bin/imagemesh submit --help"
echo "press Ctrl-C to stop"
wait
