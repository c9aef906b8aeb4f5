#!/usr/bin/env python3
"""Checks the rendered manifests against the bundle they were made from:

    kubectl kustomize deploy/k8s | deploy/k8s/check.py [deploy/k8s/generated/bundle]

- every Secret and ConfigMap (and key) a pod references exists;
- every file a pod's environment or command names lies in a mounted volume that has it;
- each identity Secret is mounted by one workload, running the service of the identity's role,
  with the worker id the identity was made for (builders, and each key of the mounters' Secret);
- every service identity of the bundle runs somewhere, over TLS;
- no CA key and no tenant's client seed reaches the cluster.
"""

import base64
import json
import pathlib
import sys

import yaml

WORKLOADS = {"Deployment", "DaemonSet", "StatefulSet", "Job"}
errors = []


def fail(message):
    errors.append(message)


def load(stream):
    objects = [o for o in yaml.safe_load_all(stream) if o]
    keys = {}  # (kind, name) -> {key: text}
    for o in objects:
        if o["kind"] == "Secret":
            data = {k: base64.b64decode(v).decode() for k, v in (o.get("data") or {}).items()}
            data.update(o.get("stringData") or {})
        elif o["kind"] == "ConfigMap":
            data = dict(o.get("data") or {})
        else:
            continue
        keys[(o["kind"], o["metadata"]["name"])] = data
    return objects, keys


def source_of(volume):
    """(kind, name, items) of a Secret or ConfigMap volume, else None."""
    if "secret" in volume:
        return "Secret", volume["secret"]["secretName"], volume["secret"].get("items")
    if "configMap" in volume:
        return "ConfigMap", volume["configMap"]["name"], volume["configMap"].get("items")
    return None


def check_pod(workload, pod, keys):
    """Checks a pod's references; returns {secret name: [(container, mount path)]}."""
    volumes = {v["name"]: source_of(v) for v in pod.get("volumes", [])}
    for name, source in volumes.items():
        if not source:
            continue
        kind, ref, items = source
        if (kind, ref) not in keys:
            fail(f"{workload}: volume {name}: no {kind} {ref}")
        for item in items or []:
            if item["key"] not in keys.get((kind, ref), {}):
                fail(f"{workload}: volume {name}: {kind} {ref} has no key {item['key']}")
    mounted = {}
    for container in pod.get("initContainers", []) + pod["containers"]:
        where = f"{workload}/{container['name']}"
        mounts = {}
        for m in container.get("volumeMounts", []):
            if m["name"] not in volumes:
                fail(f"{where}: mounts undefined volume {m['name']}")
            elif volumes[m["name"]]:
                mounts[m["mountPath"].rstrip("/")] = volumes[m["name"]]
                if volumes[m["name"]][0] == "Secret":
                    mounted.setdefault(volumes[m["name"]][1], []).append((container, m["mountPath"]))
        env = {}
        for e in container.get("env", []):
            ref = e.get("valueFrom", {})
            for kind, field in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                if field in ref and not ref[field].get("optional"):
                    if ref[field]["key"] not in keys.get((kind, ref[field]["name"]), {}):
                        fail(f"{where}: env {e['name']}: no key {ref[field]['key']} in {kind} {ref[field]['name']}")
            if "value" in e:
                env[e["name"]] = e["value"]
        for e in container.get("envFrom", []):
            for kind, field in (("Secret", "secretRef"), ("ConfigMap", "configMapRef")):
                if field in e and (kind, e[field]["name"]) not in keys:
                    fail(f"{where}: envFrom: no {kind} {e[field]['name']}")
        files = [v for k, v in env.items() if k.endswith("_FILE")]
        args = container.get("command", []) + container.get("args", [])
        files += [b for a, b in zip(args, args[1:]) if a == "--config"]
        files += [b + "/mesh.json" for a, b in zip(args, args[1:]) if a == "--bundle"]
        for path in files:
            check_file(where, path, mounts, keys)
        container["_env"] = env
    return mounted


def check_file(where, path, mounts, keys):
    for mount, (kind, name, items) in mounts.items():
        if path.startswith(mount + "/"):
            key = path[len(mount) + 1:]
            present = [i["path"] for i in items] if items else keys.get((kind, name), {})
            if key not in present:
                fail(f"{where}: {path}: {kind} {name} has no {key}")
            return
    fail(f"{where}: {path} is in no mounted Secret or ConfigMap")


def role_of(container):
    """The role whose identity a container should hold, from what it runs."""
    args = container.get("command", []) + container.get("args", [])
    text = " ".join(args)
    if "imagemesh provision" in text:
        return "operator"
    for service in ("credential", "scheduler", "builder", "indexer", "mounter"):
        if f"imagemesh-{service}" in text:
            return service
    return None


def check_identities(objects, keys, bundle):
    mesh = json.loads((bundle / "mesh.json").read_text())
    identities = {i["name"]: i for i in mesh["identities"]}
    seeds = {(bundle / "identities" / f"{n}.nk").read_text().strip(): n for n in identities}
    forbidden = [(bundle / "tls/ca-key.pem").read_text().strip()]
    forbidden += [s for s, n in seeds.items() if identities[n]["role"] == "client"]
    for (kind, name), data in keys.items():
        if any(f in v for v in data.values() for f in forbidden):
            fail(f"{kind} {name} holds the CA key or a tenant's client seed")
    running = set()
    users = {}  # secret -> workloads
    for o in objects:
        if o["kind"] not in WORKLOADS:
            continue
        workload = f"{o['kind']} {o['metadata']['name']}"
        mounted = check_pod(workload, o["spec"]["template"]["spec"], keys)
        for secret, uses in mounted.items():
            held = {k: seeds[v.strip()] for k, v in keys.get(("Secret", secret), {}).items()
                    if v.strip() in seeds}
            if not held:
                continue
            users.setdefault(secret, set()).add(workload)
            for container, _ in uses:
                role = role_of(container)
                for key, name in held.items():
                    identity = identities[name]
                    running.add(name)
                    if identity["role"] != role:
                        fail(f"{workload}: runs {role} with {identity['role']} identity {name}")
                    check_worker(workload, container, key, identity, len(held) > 1)
                check_tls(workload, container, role)
    for secret, workloads in users.items():
        if len(workloads) > 1:
            fail(f"Secret {secret} is mounted by {sorted(workloads)}; an identity is one workload's")
    for name, identity in identities.items():
        if identity["role"] != "client" and name not in running:
            fail(f"identity {name} ({identity['role']}) runs nowhere (or its Secret is missing)")


def check_worker(workload, container, key, identity, keyed_by_worker):
    role = identity["role"]
    if role not in ("builder", "mounter"):
        return
    if keyed_by_worker:  # the mounters' Secret: each pod picks its worker id's key
        if key != identity["worker_id"]:
            fail(f"{workload}: key {key} holds the identity of worker {identity['worker_id']}")
        return
    variable = f"IMAGEMESH_{role.upper()}__PLACEMENT__WORKER_ID"
    if container["_env"].get(variable) != identity["worker_id"]:
        fail(f"{workload}: {variable} is {container['_env'].get(variable)!r}, "
             f"its identity {identity['name']} is worker {identity['worker_id']!r}")


def check_tls(workload, container, role):
    env = container["_env"]
    if not env.get("NATS_URL", "").startswith("tls://"):
        fail(f"{workload}: NATS_URL {env.get('NATS_URL')!r} is not tls://")
    if role == "operator":
        return
    if env.get("IMAGEMESH_NATS__TLS_REQUIRED") != "true":
        fail(f"{workload}: IMAGEMESH_NATS__TLS_REQUIRED is not true")
    if role != "credential" and env.get("IMAGEMESH_STREAMS__PROVISION") != "false":
        fail(f"{workload}: IMAGEMESH_STREAMS__PROVISION is not false (only the operator provisions)")


def main():
    here = pathlib.Path(__file__).resolve().parent
    bundle = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else here / "generated/bundle"
    objects, keys = load(sys.stdin)
    check_identities(objects, keys, bundle)
    for message in errors:
        print(f"check.py: {message}", file=sys.stderr)
    workloads = sum(o["kind"] in WORKLOADS for o in objects)
    print(f"check.py: {len(objects)} objects, {workloads} workloads, {len(errors)} problems")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
