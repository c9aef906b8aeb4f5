#!/usr/bin/env python3
"""Checks the rendered manifests against the bundle they were made from:

    kubectl kustomize deploy/k8s/overlays/<name> | deploy/k8s/check.py [deploy/k8s/base/generated/bundle]

- every Secret and ConfigMap (and key) a pod references exists;
- every file a pod's environment, command or config names (a service's `{ file = ".." }`,
  nats.conf's certificates and include) lies in a mounted volume that has it, and every
  variable a config reads (`{ env = ".." }`, `$VAR`) is set;
- each identity Secret is mounted by one workload, running the service of the identity's role,
  with the worker id the identity was made for (builders, and each key of the mounters' Secret);
- every service identity of the bundle runs somewhere, over TLS;
- every service's config, with the container's environment, loads with the service's own loader
  (`imagemesh-<service> --print-config`; binaries from IMAGEMESH_BIN_DIR, default target/debug);
- no CA key and no tenant's client seed reaches the cluster.
"""

import base64
import json
import os
import pathlib
import posixpath
import re
import subprocess
import sys
import tempfile
import tomllib

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


def check_pod(workload, spec, keys):
    """Checks a pod's references; returns {secret name: [containers mounting it]}."""
    pod = spec["template"]["spec"]
    volumes = {v["name"]: source_of(v) for v in pod.get("volumes", [])}
    volumes.update({t["metadata"]["name"]: None for t in spec.get("volumeClaimTemplates", [])})
    for name, source in volumes.items():
        kind, ref, items = source or (None, None, None)
        if source and (kind, ref) not in keys:
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
                kind, ref, _ = mounts[m["mountPath"].rstrip("/")] = volumes[m["name"]]
                if kind == "Secret":
                    mounted.setdefault(ref, []).append(container)
        container["_env"] = check_env(where, container, keys)
        for path in files_of(where, container, mounts, keys):
            check_file(where, path, mounts, keys)
    return mounted


def check_env(where, container, keys):
    """Checks the environment's references; returns its plain values."""
    for e in container.get("env", []):
        ref = e.get("valueFrom", {})
        for kind, field in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
            if field in ref and not ref[field].get("optional"):
                name, key = ref[field]["name"], ref[field]["key"]
                if key not in keys.get((kind, name), {}):
                    fail(f"{where}: env {e['name']}: no key {key} in {kind} {name}")
    for e in container.get("envFrom", []):
        for kind, field in (("Secret", "secretRef"), ("ConfigMap", "configMapRef")):
            if field in e and (kind, e[field]["name"]) not in keys:
                fail(f"{where}: envFrom: no {kind} {e[field]['name']}")
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def files_of(where, container, mounts, keys):
    """The files a container reads: `*_FILE` variables, `--config`, `--bundle`'s mesh.json, and
    those its config names (whose variables must be set)."""
    files = [v for k, v in container["_env"].items() if k.endswith("_FILE")]
    # Also inside a shell script (the mounter's command is one).
    args = " ".join(container.get("command", []) + container.get("args", []))
    configs = re.findall(r"--config\s+(\S+)", args)
    files += configs + [b + "/mesh.json" for b in re.findall(r"--bundle\s+(\S+)", args)]
    names = {e["name"] for e in container.get("env", [])}
    for path in configs:
        text = config_text(path, mounts, keys)
        if path.endswith(".toml"):
            check_loads(where, container, text)
        refs = references(text) if path.endswith(".toml") else nats_references(path, text)
        for kind, value in refs:
            if kind == "file":
                files.append(value)
            elif value not in names:
                fail(f"{where}: {path} reads ${value}, which the container does not set")
    return files


def bin_dir():
    if "IMAGEMESH_BIN_DIR" in os.environ:
        return pathlib.Path(os.environ["IMAGEMESH_BIN_DIR"])
    root = pathlib.Path(__file__).resolve().parents[2]
    return pathlib.Path(os.environ.get("CARGO_TARGET_DIR", root / "target")) / "debug"


def check_loads(where, container, text):
    """The service's own loader takes the config with the container's environment."""
    service = role_of(container)
    if service in (None, "operator"):
        return
    binary = bin_dir() / f"imagemesh-{service}"
    if not binary.exists():
        fail(f"{where}: {binary} is missing (cargo build --workspace --bins)")
        return
    env = {k: v for k, v in container["_env"].items() if k.startswith(("IMAGEMESH_", "NATS_"))}
    env["PATH"] = os.environ.get("PATH", "")
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as config:
        config.write(text)
        config.flush()
        run = subprocess.run([binary, "--print-config", "--config", config.name], env=env,
                             capture_output=True, text=True, timeout=60)
    if run.returncode != 0:
        fail(f"{where}: imagemesh-{service} --print-config refuses its config: {run.stderr.strip()}")


def check_file(where, path, mounts, keys):
    for mount, (kind, name, items) in mounts.items():
        if path.startswith(mount + "/"):
            key = path[len(mount) + 1:]
            present = [i["path"] for i in items] if items else keys.get((kind, name), {})
            if key not in present:
                fail(f"{where}: {path}: {kind} {name} has no {key}")
            return
    fail(f"{where}: {path} is in no mounted Secret or ConfigMap")


def config_text(path, mounts, keys):
    for mount, (kind, name, _) in mounts.items():
        if path.startswith(mount + "/"):
            return keys.get((kind, name), {}).get(path[len(mount) + 1:], "")
    return ""


def references(text):
    """The secret references of a service config: `{ file = ".." }` and `{ env = ".." }`."""
    def walk(node):
        if isinstance(node, dict):
            if len(node) == 1 and next(iter(node)) in ("file", "env"):
                yield next(iter(node.items()))
            nodes = node.values()
        else:
            nodes = node if isinstance(node, list) else []
        for value in nodes:
            yield from walk(value)
    return walk(tomllib.loads(text))


def nats_references(path, text):
    """The files and variables a nats-server config names (include paths are relative to it)."""
    text = re.sub(r"(?m)^\s*#.*$", "", text)
    for name in re.findall(r'(?:cert|key|ca)_file:\s*"([^"]+)"', text):
        yield "file", name
    for name in re.findall(r'include\s+"([^"]+)"', text):
        yield "file", posixpath.normpath(posixpath.join(posixpath.dirname(path), name))
    for name in re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", text):
        yield "env", name


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
    seeds = {s: n for s, n in seeds.items() if s not in forbidden}
    for (kind, name), data in keys.items():
        if any(f in v for v in data.values() for f in forbidden):
            fail(f"{kind} {name} holds the CA key or a tenant's client seed")
    running = set()
    users = {}  # secret -> workloads
    for o in objects:
        if o["kind"] not in WORKLOADS:
            continue
        workload = f"{o['kind']} {o['metadata']['name']}"
        mounted = check_pod(workload, o["spec"], keys)
        for secret, containers in mounted.items():
            held = {k: seeds[v.strip()] for k, v in keys.get(("Secret", secret), {}).items()
                    if v.strip() in seeds}
            if not held:
                continue
            users.setdefault(secret, set()).add(workload)
            for container in containers:
                role = role_of(container)
                for key, name in held.items():
                    identity = identities[name]
                    running.add(name)
                    if identity["role"] != role:
                        fail(f"{workload}: runs {role} with {identity['role']} identity {name}")
                    check_worker(workload, container, key, identity)
                check_tls(workload, container, role)
    for secret, workloads in users.items():
        if len(workloads) > 1:
            fail(f"Secret {secret} is mounted by {sorted(workloads)}: an identity is one's own")
    for name, identity in identities.items():
        if identity["role"] != "client" and name not in running:
            fail(f"identity {name} ({identity['role']}) runs nowhere (or its Secret is missing)")


def check_worker(workload, container, key, identity):
    """A builder or mounter runs as the worker its identity was made for: the worker id its
    environment names, or else (the mounters' Secret) the one its Secret key names."""
    role = identity["role"]
    if role not in ("builder", "mounter"):
        return
    variable = f"IMAGEMESH_{role.upper()}__PLACEMENT__WORKER_ID"
    worker = container["_env"].get(variable, key)
    if worker != identity["worker_id"]:
        fail(f"{workload}: runs as worker {worker!r} with identity {identity['name']} "
             f"of worker {identity['worker_id']!r}")


def check_tls(workload, container, role):
    env = container["_env"]
    if not env.get("NATS_URL", "").startswith("tls://"):
        fail(f"{workload}: NATS_URL {env.get('NATS_URL')!r} is not tls://")
    if role == "operator":
        return
    if env.get("IMAGEMESH_NATS__TLS_REQUIRED") != "true":
        fail(f"{workload}: IMAGEMESH_NATS__TLS_REQUIRED is not true")
    if role != "credential" and env.get("IMAGEMESH_STREAMS__PROVISION") != "false":
        fail(f"{workload}: IMAGEMESH_STREAMS__PROVISION is not false (the operator provisions)")


def main():
    here = pathlib.Path(__file__).resolve().parent
    bundle = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else here / "base/generated/bundle"
    objects, keys = load(sys.stdin)
    check_identities(objects, keys, bundle)
    for message in errors:
        print(f"check.py: {message}", file=sys.stderr)
    workloads = sum(o["kind"] in WORKLOADS for o in objects)
    print(f"check.py: {len(objects)} objects, {workloads} workloads, {len(errors)} problems")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
