#!/usr/bin/env bash
# Generates what deploy/k8s/base/kustomization.yaml turns into Secrets and ConfigMaps, into
# deploy/k8s/base/generated/ (gitignored: it holds every nkey seed and the JetStream key).
#
#   generated/bundle/     `imagemesh nats-config generate`: mesh.json, auth.conf, identities/*.nk,
#                         tls/{ca,server}.pem + keys, jetstream.key. identities/client-<tenant>.nk
#                         (with tls/ca.pem) is for that tenant's users; it and tls/ca-key.pem
#                         reach no pod.
#   generated/routes/     route CA and certificate for the NATS cluster routes
#   generated/mounters.env  <worker id>=<seed> of every mounter (one Secret for the DaemonSet)
#   generated/config/     copies of deploy/config/*.toml (kustomize reads only below deploy/k8s/base)
#
# An existing bundle is kept (its JetStream key encrypts the servers' stores: keep a copy of
# generated/bundle/jetstream.key, without it they cannot be read). REGENERATE=1 makes new
# identities, CA and certificates and keeps jetstream.key; apply afterwards, and every pod rolls
# onto the new material (expect reconnects until the last NATS pod has rolled).
#
# Environment (lists comma- or space-separated):
#   TENANTS        tenants (default: default)
#   BUILDERS       builder worker ids (default: builder-0,builder-1); each must have its own
#                  Deployment in builder.yaml and Secret in kustomization.yaml (make k8s-check
#                  checks that they agree)
#   MOUNTER_NODES  nodes the mounters run on (as kubectl get nodes names them); the pod on
#                  a node not listed exits with a message
#   NAMESPACE      namespace the certificates name (default: imagemesh, as kustomization.yaml)
#   NATS_REPLICAS  NATS StatefulSet size the certificates name (default: 3, as nats.yaml)
#   IMAGEMESH      the imagemesh CLI (default: target/debug/imagemesh)
#   OUT            output directory (default: deploy/k8s/base/generated)
set -euo pipefail
umask 077

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${OUT:-$here/base/generated}
cli=${IMAGEMESH:-${CARGO_TARGET_DIR:-$root/target}/debug/imagemesh}
ns=${NAMESPACE:-imagemesh}
replicas=${NATS_REPLICAS:-3}
read -r -a tenants <<<"$(tr ',' ' ' <<<"${TENANTS:-default}")"
read -r -a builders <<<"$(tr ',' ' ' <<<"${BUILDERS:-builder-0 builder-1}")"
read -r -a nodes <<<"$(tr ',' ' ' <<<"${MOUNTER_NODES:-}")"
if [ ${#nodes[@]} -eq 0 ]; then
  echo "bundle.sh: MOUNTER_NODES is unset: making a mounter identity for a node 'node-1' only;" \
    "list your nodes to deploy" >&2
  nodes=(node-1)
fi
if [ ! -x "$cli" ]; then
  echo "bundle.sh: no imagemesh CLI at $cli: cargo build -p imagemesh-cli" >&2
  exit 1
fi

# A node name as a worker id: dots separate subject tokens (mounter.yaml maps it the same way).
worker_of_node() { tr . _ <<<"$1"; }
mounters=()
for node in "${nodes[@]}"; do mounters+=("$(worker_of_node "$node")"); done

# What clients dial (the Service; localhost for kubectl port-forward) and each server pod.
server_names=(nats "nats.$ns.svc" "nats.$ns.svc.cluster.local" localhost 127.0.0.1)
route_names=()
for ((i = 0; i < replicas; i++)); do
  for host in "nats-$i.nats-headless" "nats-$i.nats-headless.$ns.svc" \
    "nats-$i.nats-headless.$ns.svc.cluster.local"; do
    server_names+=("$host")
    route_names+=("$host")
  done
done

bundle=$out/bundle
regenerated=0
if [ -f "$bundle/mesh.json" ] && [ "${REGENERATE:-0}" != 1 ]; then
  # Refuse to silently keep a bundle made for other tenants, workers or names.
  if ! python3 - "$bundle/mesh.json" "${tenants[*]}" "${builders[*]}" "${mounters[*]}" \
    "${server_names[*]}" <<'PY'; then
import json, sys
spec = json.load(open(sys.argv[1]))["spec"]
want = dict(zip(["tenants", "builders", "mounters", "server_names"],
                (sorted(a.split()) for a in sys.argv[2:])))
diff = [k for k, v in want.items() if sorted(spec[k]) != v]
for k in diff:
    print(f"  {k}: bundle has {sorted(spec[k])}, asked for {want[k]}", file=sys.stderr)
sys.exit(1 if diff else 0)
PY
    echo "bundle.sh: $bundle was made for another mesh; REGENERATE=1 replaces it" \
      "(keeping jetstream.key)" >&2
    exit 1
  fi
  echo "keeping the bundle in $bundle (REGENERATE=1 replaces it)" >&2
else
  key=""
  [ -f "$bundle/jetstream.key" ] && key=$(cat "$bundle/jetstream.key")
  rm -rf "$bundle"
  args=(--tenants "$(IFS=,; echo "${tenants[*]}")" --credentials 1 --schedulers 1 --indexers 1)
  for id in "${builders[@]}"; do args+=(--builder "$id"); done
  for id in "${mounters[@]}"; do args+=(--mounter "$id"); done
  for name in "${server_names[@]}"; do args+=(--server-name "$name"); done
  "$cli" nats-config generate "$bundle" "${args[@]}" >/dev/null
  # The servers' stores stay readable: a new bundle keeps the old encryption key.
  [ -n "$key" ] && printf '%s' "$key" >"$bundle/jetstream.key"
  regenerated=1
fi

# Route TLS: nats-server makes it mutual, and the bundle's server certificate is for server
# auth only. A CA of the routes' own, whose key is discarded, means nothing but these servers
# can ever join the cluster (not even an identity's client certificate).
routes=$out/routes
if [ "$regenerated" = 1 ] || [ ! -f "$routes/route.pem" ]; then
  rm -rf "$routes" && mkdir -p "$routes"
  ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
  openssl req -x509 "${ec[@]}" -keyout "$routes/ca-key.pem" -out "$routes/route-ca.pem" \
    -days 3650 -subj "/CN=imagemesh NATS route CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" 2>/dev/null
  openssl req "${ec[@]}" -keyout "$routes/route-key.pem" -out "$routes/route.csr" \
    -subj "/CN=imagemesh NATS route" 2>/dev/null
  sans=$(printf 'DNS:%s,' "${route_names[@]}")
  openssl x509 -req -in "$routes/route.csr" -CA "$routes/route-ca.pem" -CAkey "$routes/ca-key.pem" \
    -set_serial "0x$(openssl rand -hex 16)" -days 3650 -out "$routes/route.pem" -extfile <(
      printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n'
      printf 'extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=%s\n' "${sans%,}"
    ) 2>/dev/null
  rm -f "$routes/ca-key.pem" "$routes/route.csr"
fi

# Every mounter's seed under its worker id (the identity name rule of `nats-config`).
: >"$out/mounters.env"
for id in "${mounters[@]}"; do
  case $id in mounter*) name=$id ;; *) name=mounter-$id ;; esac
  printf '%s=%s\n' "$id" "$(cat "$bundle/identities/$name.nk")" >>"$out/mounters.env"
done

mkdir -p "$out/config"
cp "$root"/deploy/config/*.toml "$out/config/"

echo "bundle in $out: tenants ${tenants[*]}; builders ${builders[*]}; mounters on ${nodes[*]}" >&2
echo "tenant users get $out/bundle/identities/client-<tenant>.nk and $out/bundle/tls/ca.pem" >&2
