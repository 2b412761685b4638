#!/usr/bin/env python3
"""Chart CI: lint and render charts/flashcopy-csi with real Helm (helm-python-sdk bundles Helm's Go
SDK), validate every rendered object and every example against the Kubernetes schemas
(kubernetes-validate) or, for custom resources, against their CRD's openAPI schema, cross-check
what the schemas cannot see (names that must agree between objects), compare our CRDs with what
`flashcopy-csi crd` prints, and fail when manifests/ differs from a fresh render.

    ci/chart.py                     # every check; the binary is target/debug/flashcopy-csi
    ci/chart.py --binary PATH       # the binary whose `crd` output must equal the chart's CRDs
    ci/chart.py --write             # regenerate manifests/ (and the chart's CRDs from the binary)
    ci/chart.py --no-crd-check      # skip the binary comparison (say so in the output)
"""

from __future__ import annotations

import argparse
import copy
import difflib
import hashlib
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import helm_python
import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "flashcopy-csi"
OUR_CRDS = CHART / "crds" / "flashcopy.csi.io_crds.yaml"
UPSTREAM_CRDS = CHART / "charts" / "snapshot-crds" / "crds"
# The SnapshotMetadataService CRD, exactly as kubernetes-csi/external-snapshot-metadata ships it.
SMS_CRDS = CHART / "charts" / "snapshot-metadata-crd" / "crds"
MANIFESTS = ROOT / "manifests"
EXAMPLES = ROOT / "examples"
RELEASE = "flashcopy-csi"
NAMESPACE = "flashcopy-csi"
DRIVER = "flashcopy.csi.io"
# The chart's minimum (Chart.yaml kubeVersion) and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ["1.30.0", kubernetes_validate.utils.latest_version()]

# Value variants rendered and validated besides the defaults.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "sidecar-mode": {"snapshotController": {"mode": "sidecar"}},
    "no-upstream-crds": {"snapshotCRDs": {"install": False}, "snapshotMetadata": {"installCRD": False}},
    "plaintext-no-cbt": {
        "node": {"agent": {"insecurePlaintext": True}},
        "snapshotMetadata": {"enabled": False},
    },
    "tls-no-cbt": {"snapshotMetadata": {"enabled": False}},
    "plaintext-cbt": {"node": {"agent": {"insecurePlaintext": True}}},
    "custom": {
        "controller": {"replicas": 2, "agentTemplate": "https://{node}.agents.example:7000"},
        "node": {
            "hostNetwork": False,
            "kubeletDir": "/var/snap/microk8s/common/var/lib/kubelet/",
            "dataDir": "/srv/flashcopy",
            "agent": {"port": 7000, "metricsPort": 7001, "devices": ["/dev/sdb", "/dev/sdc"]},
            "kubeSync": {"enabled": False},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
        },
        "storageClass": {"isDefault": True, "volumeBindingMode": "Immediate"},
        "volumeGroupSnapshotClass": {"apiVersion": "groupsnapshot.storage.k8s.io/v1beta2"},
        "volumeSnapshotClass": {"create": False},
        "imagePullSecrets": [{"name": "regcred"}],
        "image": {"repository": "registry.example/flashcopy-csi", "tag": "dev"},
        "snapshotMetadata": {"servicePort": 443, "grpcPort": 7443, "httpPort": 7080, "audience": "backup"},
        "tls": {"caDays": 365, "leafDays": 90, "renewDays": 10},
    },
}

# Values the schema must refuse (each is a mistake a user could make).
BAD_VALUES: dict[str, dict[str, Any]] = {
    "unknown top-level key": {"snapshotcontroller": {"mode": "full"}},
    "unknown mode": {"snapshotController": {"mode": "central"}},
    "agent template without {node}": {"controller": {"agentTemplate": "http://agent:9810"}},
    "port out of range": {"node": {"agent": {"port": 70000}}},
    "relative data dir": {"node": {"dataDir": "var/lib/flashcopy-csi"}},
    "device outside /dev": {"node": {"agent": {"devices": ["/tmp/disk.img"]}}},
    "unknown update strategy": {"node": {"updateStrategy": {"type": "Recreate"}}},
    "bad deletion policy": {"volumeSnapshotClass": {"deletionPolicy": "Keep"}},
    "image reference with a space": {"sidecars": {"provisioner": {"image": "csi provisioner"}}},
    "unknown snapshotMetadata key": {"snapshotMetadata": {"enable": True}},
    "empty audience": {"snapshotMetadata": {"audience": ""}},
    "leaf certificates of zero days": {"tls": {"leafDays": 0}},
}


class Failures:
    """Collects failures so one run reports all of them."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")
        print(f"FAIL {where}: {message}")

    def check(self, ok: bool, where: str, message: str) -> None:
        if not ok:
            self.add(where, message)


def load_docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# ---------------------------------------------------------------------------------------------
# CRD schemas -> JSON Schema


def structural_to_jsonschema(s: Any) -> Any:
    """A CRD's structural openAPI v3 schema as a JSON Schema with the API server's strict field
    validation: unknown fields are errors (kubectl's default), null only where nullable,
    int-or-string and preserve-unknown-fields honoured. CEL rules (x-kubernetes-validations)
    cannot be evaluated here and are dropped."""
    if not isinstance(s, dict):
        return s
    out: dict[str, Any] = {}
    for k, v in s.items():
        if k.startswith("x-kubernetes-") or k == "nullable":
            continue
        if k == "properties":
            out[k] = {name: structural_to_jsonschema(sub) for name, sub in v.items()}
        elif k in ("items", "additionalProperties", "not"):
            out[k] = structural_to_jsonschema(v)
        elif k in ("allOf", "anyOf", "oneOf"):
            out[k] = [structural_to_jsonschema(x) for x in v]
        else:
            out[k] = v
    if s.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = out.get("anyOf", []) + [{"type": "integer"}, {"type": "string"}]
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not s.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if s.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


class CrdIndex:
    """Custom resource kinds by (group, kind) with their versions' schemas."""

    def __init__(self, crds: Iterable[dict[str, Any]]) -> None:
        self.by_kind: dict[tuple[str, str], dict[str, Any]] = {}
        for crd in crds:
            spec = crd["spec"]
            self.by_kind[(spec["group"], spec["names"]["kind"])] = crd

    def validate(self, obj: dict[str, Any]) -> str | None:
        """None when obj is valid; else the reason. KeyError when the kind is not a CRD here."""
        group, _, version = obj["apiVersion"].rpartition("/")
        crd = self.by_kind[(group, obj["kind"])]
        versions = {v["name"]: v for v in crd["spec"]["versions"]}
        if version not in versions:
            return f"{obj['apiVersion']} is not a version of {crd['metadata']['name']}"
        v = versions[version]
        if not v.get("served"):
            return f"{obj['apiVersion']} {obj['kind']} is not served"
        schema = structural_to_jsonschema(v["schema"]["openAPIV3Schema"])
        errors = sorted(
            jsonschema.Draft7Validator(schema).iter_errors(obj), key=lambda e: list(e.path)
        )
        if errors:
            e = errors[0]
            return f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}"
        scoped = crd["spec"]["scope"] == "Namespaced"
        if not scoped and "namespace" in obj.get("metadata", {}):
            return "cluster-scoped object with a namespace"
        return None


DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def validate_object(obj: dict[str, Any], crds: CrdIndex, where: str, fail: Failures) -> None:
    kn = f"{where} {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    name = obj.get("metadata", {}).get("name", "")
    fail.check(
        bool(DNS_SUBDOMAIN.match(name)) and len(name) <= 253, kn, f"bad name {name!r}"
    )
    group = obj["apiVersion"].rpartition("/")[0]
    if (group, obj["kind"]) in crds.by_kind:
        reason = crds.validate(obj)
        fail.check(reason is None, kn, f"does not match its CRD: {reason}")
        return
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            fail.add(kn, f"Kubernetes {version} schema: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            fail.add(kn, f"no schema: {e.message}")


# ---------------------------------------------------------------------------------------------
# Checks of what schemas cannot see


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] == "Pod":
        return obj["spec"]
    if obj["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
        return obj["spec"]["template"]["spec"]
    return None


def check_pods(objs: list[dict[str, Any]], where: str, fail: Failures) -> None:
    """Mounts name declared volumes, $(VAR) in args is defined, ports do not clash, selectors
    match the template, the ServiceAccount exists."""
    sas = {o["metadata"]["name"] for o in objs if o["kind"] == "ServiceAccount"}
    for o in objs:
        spec = pod_spec(o)
        if spec is None:
            continue
        kn = f"{where} {o['kind']}/{o['metadata']['name']}"
        if o["kind"] != "Pod":
            labels = o["spec"]["template"]["metadata"].get("labels", {})
            sel = o["spec"]["selector"]["matchLabels"]
            fail.check(
                all(labels.get(k) == v for k, v in sel.items()),
                kn,
                "selector does not match the pod template's labels",
            )
            sa = spec.get("serviceAccountName")
            fail.check(sa in sas, kn, f"ServiceAccount {sa!r} is not rendered")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        ports: dict[int, str] = {}
        for c in spec["containers"]:
            for m in c.get("volumeMounts", []):
                fail.check(
                    m["name"] in volumes, kn, f"{c['name']} mounts undeclared {m['name']}"
                )
                if m.get("mountPropagation") == "Bidirectional":
                    fail.check(
                        c.get("securityContext", {}).get("privileged") is True,
                        kn,
                        f"{c['name']}: Bidirectional propagation needs a privileged container",
                    )
            env = {e["name"] for e in c.get("env", [])}
            for a in c.get("args", []) + c.get("command", []):
                for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", a):
                    fail.check(var in env, kn, f"{c['name']} uses $({var}) without env {var}")
            for p in c.get("ports", []):
                n = p["containerPort"]
                fail.check(n not in ports, kn, f"port {n} of {c['name']} also in {ports.get(n)}")
                ports[n] = c["name"]
        # Health endpoints must be declared ports (probes and hostNetwork clashes see them).
        for c in spec["containers"]:
            for arg in c.get("args", []):
                m = re.match(r"--http-endpoint=:(\d+)$", arg)
                if m:
                    fail.check(
                        int(m.group(1)) in ports,
                        kn,
                        f"{c['name']} serves on :{m.group(1)} but no container declares the port",
                    )
        if o["kind"] != "Pod" and spec.get("automountServiceAccountToken") is False:
            for c in spec["containers"]:
                privileged = c.get("securityContext", {}).get("privileged")
                has_token = any(m["name"] == "api-token" for m in c.get("volumeMounts", []))
                fail.check(
                    not (privileged and has_token),
                    kn,
                    f"privileged container {c['name']} gets the API token",
                )


def check_our_args(
    objs: list[dict[str, Any]], values: dict[str, Any], binary: Path | None, where: str, fail: Failures
) -> None:
    """Every container of our image starts: its args (the image's ENTRYPOINT is the binary) must
    parse with the binary's own CLI. `ARGS --help` parses every flag and value given, then prints
    help instead of running; $(VAR)s become a placeholder, as the kubelet would substitute them."""
    if binary is None:
        return
    repo = values["image"]["repository"]
    for o in objs:
        spec = pod_spec(o)
        if spec is None:
            continue
        for c in spec.get("initContainers", []) + spec["containers"]:
            if c["image"].rsplit(":", 1)[0] != repo:
                continue
            kn = f"{where} {o['kind']}/{o['metadata']['name']} {c['name']}"
            fail.check("command" not in c, kn, "sets command: the image's ENTRYPOINT is the binary")
            args = [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", "placeholder", a) for a in c.get("args", [])]
            run = subprocess.run([str(binary), *args, "--help"], capture_output=True, text=True)
            if run.returncode != 0:
                first = (run.stderr.strip().splitlines() or ["(no output)"])[0]
                fail.add(kn, f"args {c.get('args', [])} do not parse: {first}")


def check_rbac(objs: list[dict[str, Any]], where: str, fail: Failures) -> None:
    roles = {(o["kind"], o["metadata"]["name"]) for o in objs if o["kind"] in ("Role", "ClusterRole")}
    sas = {(o["metadata"]["namespace"], o["metadata"]["name"]) for o in objs if o["kind"] == "ServiceAccount"}
    for o in objs:
        if o["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        kn = f"{where} {o['kind']}/{o['metadata']['name']}"
        ref = (o["roleRef"]["kind"], o["roleRef"]["name"])
        fail.check(ref in roles, kn, f"roleRef {ref} is not rendered")
        for s in o["subjects"]:
            fail.check(
                (s.get("namespace"), s["name"]) in sas,
                kn,
                f"subject ServiceAccount {s.get('namespace')}/{s['name']} is not rendered",
            )


def rules_of(objs: list[dict[str, Any]], role: str) -> set[tuple[str, str, str]]:
    for o in objs:
        if o["kind"] == "ClusterRole" and o["metadata"]["name"] == role:
            return {
                (g, r, v)
                for rule in o["rules"]
                for g in rule["apiGroups"]
                for r in rule["resources"]
                for v in rule["verbs"]
            }
    return set()


def container(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    for o in objs:
        if o["kind"] == kind:
            for c in pod_spec(o)["containers"]:
                if c["name"] == name:
                    return c
    return None


def arg_after(c: dict[str, Any], flag: str) -> str | None:
    args = c.get("args", [])
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def check_driver(objs: list[dict[str, Any]], values: dict[str, Any], where: str, fail: Failures) -> None:
    """The names that must agree for the driver to work at all."""
    drivers = [o["metadata"]["name"] for o in objs if o["kind"] == "CSIDriver"]
    fail.check(drivers == [DRIVER], where, f"CSIDriver objects {drivers}, want [{DRIVER}]")
    for o in objs:
        if o["kind"] == "StorageClass":
            fail.check(o["provisioner"] == DRIVER, where, "StorageClass provisioner")
        if o["kind"] in ("VolumeSnapshotClass", "VolumeGroupSnapshotClass"):
            fail.check(o["driver"] == DRIVER, where, f"{o['kind']} driver")

    node = next(o for o in objs if o["kind"] == "DaemonSet")
    spec = pod_spec(node)
    vols = {v["name"]: v for v in spec["volumes"]}
    reg = container(objs, "DaemonSet", "node-driver-registrar")
    path = arg_after(reg, "--kubelet-registration-path")
    fail.check(
        path == vols["plugin-dir"]["hostPath"]["path"] + "/csi.sock",
        where,
        f"registrar registers {path}, the plugin dir is {vols['plugin-dir']['hostPath']['path']}",
    )
    kubelet_dir = values["node"]["kubeletDir"].rstrip("/")
    fail.check(
        path == f"{kubelet_dir}/plugins/{DRIVER}/csi.sock",
        where,
        f"registration path {path} is not under the kubelet dir {kubelet_dir}",
    )

    agent = container(objs, "DaemonSet", "agent")
    listen = arg_after(agent, "--listen")
    agent_port = int(listen.rsplit(":", 1)[1])
    # The agent API on the network: mutual TLS, or plaintext only when a value says so.
    plaintext = "--insecure-plaintext-tcp" in agent["args"]
    fail.check(
        plaintext == bool(values["node"]["agent"].get("insecurePlaintext")),
        where,
        "agent --insecure-plaintext-tcp without node.agent.insecurePlaintext (or the reverse)",
    )
    fail.check(
        plaintext or all(f in agent["args"] for f in ("--tls-cert", "--tls-key", "--tls-client-ca")),
        where,
        f"agent --listen {listen} is neither TLS nor explicitly plaintext",
    )
    ctl = container(objs, "Deployment", "csi-controller")
    template = arg_after(ctl, "--agent-template")
    fail.check("{node}" in template, where, f"agent template {template!r} lacks {{node}}")
    fail.check(
        plaintext or not template.startswith("http://"),
        where,
        f"controller reaches TLS agents in plaintext ({template})",
    )
    if values["node"]["hostNetwork"] and not values["controller"]["agentTemplate"]:
        fail.check(
            template == f"{'http' if plaintext else 'https'}://{{node}}:{agent_port}",
            where,
            f"controller reaches agents at {template}, agents listen on {listen}",
        )
    data_dir = values["node"]["dataDir"].rstrip("/")
    fail.check(arg_after(agent, "--data-dir") == data_dir, where, "agent --data-dir")
    for name in ("csi-node", "kube-sync"):
        c = container(objs, "DaemonSet", name)
        if c is None:
            fail.check(
                name == "kube-sync" and not values["node"]["kubeSync"]["enabled"],
                where,
                f"no {name} container",
            )
            continue
        fail.check(
            arg_after(c, "--agent") == f"unix://{data_dir}/agent.sock",
            where,
            f"{name} --agent {arg_after(c, '--agent')} is not the agent's socket in {data_dir}",
        )
    sc = container(objs, "Deployment", "snapshot-controller")
    mode = values["snapshotController"]["mode"]
    fail.check(arg_after(sc, "--mode") == mode, where, "snapshot-controller --mode")
    fail.check(
        arg_after(sc, "--csi-endpoint") == arg_after(ctl, "--endpoint"),
        where,
        "snapshot-controller and csi-controller use different sockets",
    )

    # Least privilege of the snapshot controller: the sidecar mode never touches snapshots or
    # PVCs; the full mode creates contents and member snapshots.
    rules = rules_of(objs, f"{RELEASE}-snapshot-controller")
    full_only = {
        ("snapshot.storage.k8s.io", "volumesnapshots", "update"),
        ("snapshot.storage.k8s.io", "volumesnapshotcontents", "create"),
        ("groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents", "create"),
        ("", "persistentvolumeclaims", "update"),
    }
    both = {
        ("snapshot.storage.k8s.io", "volumesnapshotcontents/status", "patch"),
        ("groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents/status", "patch"),
    }
    fail.check(both <= rules, where, f"snapshot controller lacks {sorted(both - rules)}")
    if mode == "full":
        fail.check(full_only <= rules, where, f"full mode lacks {sorted(full_only - rules)}")
    else:
        fail.check(
            not any(r[1] in ("volumesnapshots", "persistentvolumeclaims") for r in rules),
            where,
            "sidecar mode must not have rights on VolumeSnapshots or PVCs",
        )


# ---------------------------------------------------------------------------------------------
# TLS: every listener, every key


def carried_secrets(volume: dict[str, Any]) -> set[str]:
    """Secrets whose private key (tls.key) a volume puts into a container: a secret volume
    (all keys, or items naming tls.key) or a projected secret source likewise."""
    def with_key(src: dict[str, Any]) -> bool:
        items = src.get("items")
        return items is None or any(i["key"] == "tls.key" for i in items)

    out = set()
    if "secret" in volume and with_key(volume["secret"]):
        out.add(volume["secret"]["secretName"])
    for src in volume.get("projected", {}).get("sources", []):
        if "secret" in src and with_key(src["secret"]):
            out.add(src["secret"]["name"])
    return out


def check_tls(objs: list[dict[str, Any]], values: dict[str, Any], where: str, fail: Failures) -> None:
    """Every listener of the rendered chart is TLS, or a health/metrics endpoint, or the agent
    API explicitly plaintext; every Secret with a key of `certs ensure` is mounted into the
    containers that use it and nowhere else (the CA nowhere); files named in args are there."""
    agent_tls = not values["node"]["agent"]["insecurePlaintext"]
    sm = values["snapshotMetadata"]
    ctl_pod = next(o for o in objs if o["kind"] == "Deployment")
    init = {c["name"]: c for c in pod_spec(ctl_pod).get("initContainers", [])}.get("certs")
    if not agent_tls and not sm["enabled"]:
        fail.check(init is None, where, "certs init container without any TLS to make")
        return
    if init is None:
        fail.add(where, "TLS is on but the controller pod has no certs init container")
        return
    fail.check(init["args"][:2] == ["certs", "ensure"], where, "certs init container args")
    names = {
        "ca": arg_after(init, "--ca-secret"),
        "agent": arg_after(init, "--agent-secret"),
        "controller": arg_after(init, "--controller-secret"),
        "snapshot-metadata": arg_after(init, "--snapshot-metadata-secret"),
    }
    fail.check(bool(names["ca"]), where, "certs ensure without --ca-secret")
    fail.check(
        bool(names["agent"]) == agent_tls and bool(names["controller"]) == agent_tls,
        where,
        "agent/controller Secrets made although the agent API is plaintext (or not made)",
    )
    fail.check(
        bool(names["snapshot-metadata"]) == sm["enabled"], where, "snapshot-metadata Secret"
    )
    # (secret, pod kind, container) that may hold the key; the CA is for nobody.
    intended = {
        (names["agent"], "DaemonSet", "agent"),
        (names["controller"], "Deployment", "csi-controller"),
        (names["snapshot-metadata"], "Deployment", "csi-snapshot-metadata"),
    }
    ours = {n for n in names.values() if n}
    mounted: dict[tuple[str, str, str], str] = {}  # -> mountPath
    for o in objs:
        spec = pod_spec(o)
        if spec is None:
            continue
        vols = {v["name"]: carried_secrets(v) for v in spec.get("volumes", [])}
        for c in spec.get("initContainers", []) + spec["containers"]:
            for m in c.get("volumeMounts", []):
                for secret in vols.get(m["name"], set()) & ours:
                    key = (secret, o["kind"], c["name"])
                    fail.check(
                        key in intended,
                        where,
                        f"{o['kind']}/{c['name']} mounts the keys of Secret {secret}",
                    )
                    mounted[key] = m["mountPath"]
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef", {}).get("name")
                fail.check(ref not in ours, where, f"{c['name']} takes Secret {ref} as env")
            for e in c.get("envFrom", []):
                ref = e.get("secretRef", {}).get("name")
                fail.check(ref not in ours, where, f"{c['name']} takes Secret {ref} as env")

    def files_in(kind: str, cname: str, secret: str | None, flags: list[str]) -> None:
        c = container(objs, kind, cname)
        base = mounted.get((secret, kind, cname)) if secret else None
        if c is None or base is None:
            fail.add(where, f"{kind}/{cname} does not mount its Secret {secret}")
            return
        for f in flags:
            path = arg_after(c, f)
            fail.check(
                path is not None and path.startswith(base.rstrip("/") + "/"),
                where,
                f"{cname} {f} {path} is not in its Secret's mount {base}",
            )

    if agent_tls:
        files_in("DaemonSet", "agent", names["agent"], ["--tls-cert", "--tls-key", "--tls-client-ca"])
        files_in(
            "Deployment", "csi-controller", names["controller"],
            ["--agent-tls-ca", "--agent-tls-cert", "--agent-tls-key"],
        )
    if sm["enabled"]:
        files_in("Deployment", "csi-snapshot-metadata", names["snapshot-metadata"], ["--tls-cert", "--tls-key"])
        side = container(objs, "Deployment", "csi-snapshot-metadata")
        ctl = container(objs, "Deployment", "csi-controller")
        fail.check(
            side is not None and ctl is not None
            and "unix://" + (arg_after(side, "--csi-address") or "") == arg_after(ctl, "--endpoint"),
            where,
            "csi-snapshot-metadata does not use the CSI controller's socket",
        )
        # What the sidecar does with the API (upstream snapshot-metadata-cluster-role.yaml).
        rules = rules_of(objs, f"{RELEASE}-snapshot-metadata")
        need = {
            ("authentication.k8s.io", "tokenreviews", "create"),
            ("authorization.k8s.io", "subjectaccessreviews", "create"),
            ("cbt.storage.k8s.io", "snapshotmetadataservices", "get"),
            ("snapshot.storage.k8s.io", "volumesnapshots", "get"),
            ("snapshot.storage.k8s.io", "volumesnapshotcontents", "get"),
        }
        fail.check(need <= rules, where, f"the sidecar's ClusterRole lacks {sorted(need - rules)}")
        fail.check(
            not any(v in ("update", "patch", "delete") for _, _, v in rules),
            where,
            "the sidecar's ClusterRole may write",
        )

    # Listeners: every declared port is classified.
    for o in objs:
        spec = pod_spec(o)
        if spec is None:
            continue
        health: set[int] = set()
        tls: dict[str, int] = {}
        plaintext_api: set[int] = set()
        for c in spec["containers"]:
            for a in c.get("args", []):
                m = re.match(r"--http-endpoint=:(\d+)$", a)
                if m:
                    health.add(int(m.group(1)))
            metrics = arg_after(c, "--metrics-listen")
            if metrics:
                health.add(int(metrics.rsplit(":", 1)[1]))
            listen = arg_after(c, "--listen")
            if listen and c["name"] == "agent":
                port = int(listen.rsplit(":", 1)[1])
                if "--insecure-plaintext-tcp" in c["args"]:
                    plaintext_api.add(port)
                elif all(f in c["args"] for f in ("--tls-cert", "--tls-key", "--tls-client-ca")):
                    tls[c["name"]] = port
            if c["name"] == "csi-snapshot-metadata":
                port = int(arg_after(c, "--port") or 50051)
                if arg_after(c, "--tls-cert") and arg_after(c, "--tls-key"):
                    tls[c["name"]] = port
        ports = {}
        for c in spec["containers"]:
            for p in c.get("ports", []):
                n = p["containerPort"]
                ports[p.get("name")] = n
                fail.check(
                    n in health or n in tls.values() or n in plaintext_api,
                    where,
                    f"{o['kind']}/{c['name']} listens on {n}: neither TLS, nor a health or "
                    "metrics endpoint, nor the explicitly plaintext agent API",
                )
        for svc in objs:
            if svc["kind"] != "Service":
                continue
            sel = svc["spec"].get("selector", {})
            labels = o["spec"]["template"]["metadata"].get("labels", {})
            if not sel or not all(labels.get(k) == v for k, v in sel.items()):
                continue
            for sp in svc["spec"]["ports"]:
                target = sp.get("targetPort", sp["port"])
                n = ports.get(target) if isinstance(target, str) else target
                fail.check(
                    n in tls.values(),
                    where,
                    f"Service {svc['metadata']['name']} port {sp['port']} reaches {target}, not a TLS listener",
                )


# ---------------------------------------------------------------------------------------------
# Rendering


KIND_ORDER = [
    "Namespace", "CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
    "Role", "RoleBinding", "CSIDriver", "StorageClass", "VolumeSnapshotClass",
    "VolumeGroupSnapshotClass", "Service", "DaemonSet", "Deployment",
]


def render(chart: helm_python.Chart, values: dict[str, Any]) -> list[tuple[str, str]]:
    """(template path, manifest text) per document, in install order."""
    out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs: list[tuple[str, str]] = []
    for path in sorted(out):
        if path.endswith("NOTES.txt"):
            continue
        for text in re.split(r"^---\s*$", out[path], flags=re.M):
            if yaml.safe_load(text) is not None:
                docs.append((path, text.strip("\n")))

    def order(item: tuple[str, str]) -> int:
        kind = yaml.safe_load(item[1])["kind"]
        return KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)

    return sorted(docs, key=order)


def upstream_crd_texts() -> list[tuple[str, str]]:
    return [(p.name, p.read_text()) for p in sorted(UPSTREAM_CRDS.glob("*.yaml"))]


def sms_crd_texts() -> list[tuple[str, str]]:
    return [(p.name, p.read_text()) for p in sorted(SMS_CRDS.glob("*.yaml"))]


HEADER = (
    "# Generated by ci/chart.py --write from charts/flashcopy-csi ({what}).\n"
    "# Do not edit: change the chart and regenerate; CI fails when this file differs.\n"
)


def generated_manifests(chart: helm_python.Chart) -> dict[str, str]:
    # The node pod is privileged: Pod Security admission must allow it in this namespace.
    ns = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": NAMESPACE,
            "labels": {"pod-security.kubernetes.io/enforce": "privileged"},
        },
    }
    parts = [HEADER.format(what=f"default values, release {RELEASE}, namespace {NAMESPACE}")]
    parts.append("---\n" + yaml.safe_dump(ns, sort_keys=False).rstrip("\n"))
    parts += [f"---\n# Source: {path}\n{text}" for path, text in render(chart, {})]
    upstream = [HEADER.format(what="charts/snapshot-crds/crds, external-snapshotter v8.6.0")]
    for name, text in upstream_crd_texts():
        upstream.append(f"# Source: {name}\n" + text.strip("\n"))
    sms = [HEADER.format(what="charts/snapshot-metadata-crd/crds, external-snapshot-metadata v1.1.0")]
    for name, text in sms_crd_texts():
        sms.append(f"# Source: {name}\n" + text.strip("\n"))
    return {
        "flashcopy-csi.yaml": "\n".join(parts) + "\n",
        "crds/snapshot-metadata-crd.yaml": "\n".join(sms) + "\n",
        "crds/flashcopy.csi.io_crds.yaml": HEADER.format(what="crds/")
        + OUR_CRDS.read_text(),
        "crds/snapshot-crds.yaml": "\n".join(upstream) + "\n",
    }


# ---------------------------------------------------------------------------------------------
# Steps


def step(title: str) -> None:
    print(f"\n== {title}")


def lint_and_schema(fail: Failures) -> None:
    step("helm lint (strict) and values.schema.json")
    for name, values in VARIANTS.items():
        report = helm_python.lint(
            CHART, values, strict=True, namespace=NAMESPACE, kube_version="v1.30.0"
        )
        for msg in report.get("messages", []):
            if msg["severity"] >= 2:
                fail.add(f"lint[{name}]", f"{msg['path']}: {msg['error']}")
        for err in report.get("errors", []):
            fail.add(f"lint[{name}]", err)
        print(f"lint[{name}]: {len(report.get('messages', []))} message(s)")
    chart = helm_python.Chart.load(CHART)
    for what, values in BAD_VALUES.items():
        try:
            chart.validate_schema(values)
        except helm_python.HelmValuesError as e:
            print(f"schema refuses {what}: {' '.join(str(e).split())[:140]}")
        else:
            fail.add("values.schema.json", f"accepts {what}: {values}")


def all_crds() -> list[dict[str, Any]]:
    crds = load_docs(OUR_CRDS.read_text())
    for _, text in upstream_crd_texts() + sms_crd_texts():
        crds += load_docs(text)
    return crds


def validate_variants(fail: Failures, binary: Path | None) -> None:
    chart = helm_python.Chart.load(CHART)
    defaults = chart.values
    crds = all_crds()
    index = CrdIndex(crds)
    step(f"CRDs against apiextensions.k8s.io/v1 (Kubernetes {', '.join(KUBE_VERSIONS)})")
    for crd in crds:
        validate_object(crd, index, "crd", fail)
        for v in crd["spec"]["versions"]:
            props = v["schema"]["openAPIV3Schema"].get("properties", {})
            for col in v.get("additionalPrinterColumns", []):
                head = col["jsonPath"].lstrip(".").split(".")
                if head[0] == "metadata":
                    continue
                node: Any = {"properties": props}
                for part in head:
                    node = node.get("properties", {}).get(part)
                    if node is None:
                        break
                fail.check(
                    node is not None,
                    f"crd {crd['metadata']['name']}",
                    f"printer column {col['name']} points at missing {col['jsonPath']}",
                )
    print(f"{len(crds)} CRDs")
    for name, values in VARIANTS.items():
        step(f"render and validate: {name}")
        merged = deep_merge(defaults, values)
        docs = render(chart, values)
        objs = [yaml.safe_load(text) for _, text in docs]
        for (path, _), obj in zip(docs, objs):
            validate_object(obj, index, f"[{name}] {path}", fail)
            if obj["kind"] in ("Role", "RoleBinding", "ServiceAccount", "Service", "Deployment", "DaemonSet"):
                fail.check(
                    obj["metadata"].get("namespace") == NAMESPACE,
                    f"[{name}] {path}",
                    f"{obj['kind']} without the release namespace",
                )
        check_pods(objs, f"[{name}]", fail)
        check_rbac(objs, f"[{name}]", fail)
        check_driver(objs, merged, f"[{name}]", fail)
        check_tls(objs, merged, f"[{name}]", fail)
        check_our_args(objs, merged, binary, f"[{name}]", fail)
        kinds = sorted({o["kind"] for o in objs})
        print(f"{len(objs)} objects: {', '.join(kinds)}")


def self_test(fail: Failures, binary: Path | None) -> None:
    """Each check above must catch the mistake it exists for: mutate a good render and expect a
    failure from the check, so that no check passes vacuously."""
    step("self-test: every check catches its mistake")
    chart = helm_python.Chart.load(CHART)
    defaults = chart.values
    index = CrdIndex(all_crds())

    def good(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return [yaml.safe_load(t) for _, t in render(chart, values or {})]

    def find(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
        return next(
            o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])
        )

    def run_all(objs: list[dict[str, Any]], values: dict[str, Any]) -> Failures:
        quiet = Failures()
        quiet.add = lambda where, message: quiet.items.append(f"{where}: {message}")  # type: ignore[method-assign]
        for o in objs:
            validate_object(o, index, "self-test", quiet)
        check_pods(objs, "self-test", quiet)
        check_rbac(objs, "self-test", quiet)
        check_driver(objs, deep_merge(defaults, values), "self-test", quiet)
        check_tls(objs, deep_merge(defaults, values), "self-test", quiet)
        check_our_args(objs, deep_merge(defaults, values), binary, "self-test", quiet)
        return quiet

    baseline = run_all(good(), {})
    fail.check(not baseline.items, "self-test", f"the default render fails: {baseline.items}")

    def ds_container(objs: list[dict[str, Any]], name: str) -> dict[str, Any]:
        return container(objs, "DaemonSet", name)  # type: ignore[return-value]

    mutations: list[tuple[str, dict[str, Any], Callable[[list[dict[str, Any]]], None]]] = [
        ("unknown container field", {}, lambda o: ds_container(o, "agent").update(imagePullPolice="x")),
        ("mount of an undeclared volume", {}, lambda o: ds_container(o, "csi-node")["volumeMounts"].append(
            {"name": "nope", "mountPath": "/nope"})),
        ("$(VAR) without env", {}, lambda o: ds_container(o, "kube-sync")["env"].clear()),
        ("registration path outside the plugin dir", {}, lambda o: ds_container(o, "node-driver-registrar")[
            "args"].__setitem__(1, "--kubelet-registration-path=/var/lib/kubelet/plugins/x/csi.sock")),
        ("agent port differs from the controller's template", {}, lambda o: ds_container(o, "agent")[
            "args"].__setitem__(4, "0.0.0.0:9999")),
        ("API token in a privileged container", {}, lambda o: ds_container(o, "agent")["volumeMounts"].append(
            {"name": "api-token", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"})),
        ("health endpoint on an undeclared port", {}, lambda o: ds_container(o, "node-driver-registrar")[
            "args"].__setitem__(2, "--http-endpoint=:1234")),
        ("agent API in plaintext without the value saying so", {"node": {"agent": {"insecurePlaintext": False}}},
         lambda o: ds_container(o, "agent")["args"].append("--insecure-plaintext-tcp")),
        ("agent API neither TLS nor explicitly plaintext", {}, lambda o: ds_container(o, "agent")[
            "args"].__setitem__(slice(None), [a for a in ds_container(o, "agent")["args"]
                                              if a != "--tls-client-ca"])),
        ("the agent's key mounted into csi-node", {}, lambda o: ds_container(o, "csi-node")[
            "volumeMounts"].append({"name": "agent-tls", "mountPath": "/etc/flashcopy-csi/tls"})),
        ("the agent's key as a projected volume of kube-sync", {}, lambda o: (
            pod_spec(find(o, "DaemonSet"))["volumes"].append({"name": "sneaky", "projected": {
                "sources": [{"secret": {"name": f"{RELEASE}-agent-tls"}}]}}),
            ds_container(o, "kube-sync")["volumeMounts"].append({"name": "sneaky", "mountPath": "/x"}))),
        ("the CA Secret mounted anywhere", {}, lambda o: (
            pod_spec(find(o, "Deployment"))["volumes"].append(
                {"name": "ca", "secret": {"secretName": f"{RELEASE}-ca"}}),
            container(o, "Deployment", "csi-controller")["volumeMounts"].append(
                {"name": "ca", "mountPath": "/ca"}))),
        ("the controller's key in the provisioner", {}, lambda o: container(
            o, "Deployment", "csi-provisioner")["volumeMounts"].append(
                {"name": "controller-tls", "mountPath": "/tls"})),
        ("controller reaching TLS agents over http://", {}, lambda o: container(
            o, "Deployment", "csi-controller")["args"].__setitem__(
                container(o, "Deployment", "csi-controller")["args"].index("--agent-template") + 1,
                "http://{node}:9810")),
        ("agent key file outside its Secret's mount", {}, lambda o: ds_container(o, "agent")["args"].__setitem__(
            ds_container(o, "agent")["args"].index("--tls-key") + 1, "/var/lib/flashcopy-csi/key.pem")),
        ("snapshot-metadata sidecar without TLS", {}, lambda o: container(
            o, "Deployment", "csi-snapshot-metadata")["args"].__setitem__(slice(None), [
                a for a in container(o, "Deployment", "csi-snapshot-metadata")["args"]
                if not a.startswith("--tls-")])),
        ("an undeclared plaintext listener", {}, lambda o: container(
            o, "Deployment", "snapshot-controller").setdefault("ports", []).append(
                {"name": "debug", "containerPort": 6060, "protocol": "TCP"})),
        ("Service onto the health port", {}, lambda o: find(o, "Service")["spec"]["ports"][0].update(
            targetPort="sm-http")),
        ("snapshot-metadata sidecar without TokenReview", {}, lambda o: find(
            o, "ClusterRole", f"{RELEASE}-snapshot-metadata")["rules"].pop(1)),
        ("TLS on but no certs init container", {}, lambda o: pod_spec(find(o, "Deployment")).pop(
            "initContainers")),
        *([("agent flag the binary does not know", {}, lambda o: ds_container(o, "agent")[
            "args"].append("--verbose"))] if binary else []),
        ("binding to a missing role", {}, lambda o: find(o, "RoleBinding")["roleRef"].update(name="missing")),
        ("sidecar mode with rights on VolumeSnapshots", {"snapshotController": {"mode": "sidecar"}},
         lambda o: find(o, "ClusterRole", f"{RELEASE}-snapshot-controller")["rules"].append(
             {"apiGroups": ["snapshot.storage.k8s.io"], "resources": ["volumesnapshots"], "verbs": ["get"]})),
        ("full mode without content creation", {}, lambda o: find(
            o, "ClusterRole", f"{RELEASE}-snapshot-controller")["rules"].__setitem__(
                slice(None), [r for r in find(o, "ClusterRole", f"{RELEASE}-snapshot-controller")["rules"]
                              if "volumesnapshotcontents" not in r["resources"]])),
        ("class of another driver", {}, lambda o: find(o, "VolumeSnapshotClass").update(driver="other.csi.io")),
        ("class field unknown to the CRD", {}, lambda o: find(o, "VolumeGroupSnapshotClass").update(parameter={})),
        ("selector not matching the pod labels", {}, lambda o: find(o, "DaemonSet")["spec"]["selector"][
            "matchLabels"].update(extra="x")),
    ]
    for what, values, mutate in mutations:
        objs = good(values)
        mutate(objs)
        caught = run_all(objs, values)
        fail.check(bool(caught.items), "self-test", f"no check caught: {what}")
        print(f"caught {what}: {caught.items[0][:110] if caught.items else '-'}")


def validate_examples(fail: Failures) -> None:
    step("examples/")
    chart = helm_python.Chart.load(CHART)
    defaults = chart.values
    index = CrdIndex(all_crds())
    objs: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        text = path.read_text()
        # Placeholders for generated names (group members) become valid names for validation.
        text = re.sub(
            r"\$\{([A-Z_]+)\}", lambda m: "placeholder-" + m.group(1).lower().replace("_", "-"), text
        )
        for obj in load_docs(text):
            fail.check("namespace" not in obj["metadata"], path.name, "examples take -n from kubectl")
            validate_object(obj, index, f"examples/{path.name}", fail)
            objs.append((path.name, obj))
    pvcs = {o["metadata"]["name"]: o for _, o in objs if o["kind"] == "PersistentVolumeClaim"}
    snaps = {o["metadata"]["name"] for _, o in objs if o["kind"] == "VolumeSnapshot"}
    for f, o in objs:
        kn = f"examples/{f} {o['kind']}/{o['metadata']['name']}"
        if o["kind"] == "PersistentVolumeClaim":
            fail.check(
                o["spec"].get("storageClassName") == defaults["storageClass"]["name"],
                kn,
                "storageClassName is not the chart's StorageClass",
            )
            src = o["spec"].get("dataSource")
            if src and src["kind"] == "VolumeSnapshot":
                fail.check(
                    src["name"] in snaps or src["name"].startswith("placeholder-"),
                    kn,
                    f"restores from unknown VolumeSnapshot {src['name']}",
                )
            if src and src["kind"] == "PersistentVolumeClaim":
                fail.check(src["name"] in pvcs, kn, f"clones unknown PVC {src['name']}")
        if o["kind"] == "VolumeSnapshot":
            fail.check(
                o["spec"]["volumeSnapshotClassName"] == defaults["volumeSnapshotClass"]["name"],
                kn,
                "not the chart's VolumeSnapshotClass",
            )
            fail.check(
                o["spec"]["source"]["persistentVolumeClaimName"] in pvcs, kn, "unknown source PVC"
            )
        if o["kind"] == "VolumeGroupSnapshot":
            fail.check(
                o["apiVersion"] == defaults["volumeGroupSnapshotClass"]["apiVersion"]
                and o["spec"]["volumeGroupSnapshotClassName"]
                == defaults["volumeGroupSnapshotClass"]["name"],
                kn,
                "not the chart's VolumeGroupSnapshotClass",
            )
            sel = o["spec"]["source"]["selector"]["matchLabels"]
            members = [
                n for n, p in pvcs.items()
                if all(p["metadata"].get("labels", {}).get(k) == v for k, v in sel.items())
            ]
            fail.check(len(members) >= 2, kn, f"selects {members}, want two or more PVCs")
        if o["kind"] == "Pod":
            for v in o["spec"].get("volumes", []):
                claim = v.get("persistentVolumeClaim", {}).get("claimName")
                if claim:
                    fail.check(claim in pvcs, kn, f"uses unknown PVC {claim}")
    check_pods([o for _, o in objs], "examples", fail)
    # The backup client of snapshot metadata: its binding names an example ServiceAccount and
    # role, and the role grants what a client of the sidecar needs (upstream client runner).
    roles = {o["metadata"]["name"]: o for _, o in objs if o["kind"] == "ClusterRole"}
    accounts = {o["metadata"]["name"] for _, o in objs if o["kind"] == "ServiceAccount"}
    bindings = [(f, o) for f, o in objs if o["kind"] == "ClusterRoleBinding"]
    fail.check(bool(bindings), "examples", "no backup client ClusterRoleBinding")
    need = {
        ("cbt.storage.k8s.io", "snapshotmetadataservices", "get"),
        ("snapshot.storage.k8s.io", "volumesnapshots", "get"),
        ("snapshot.storage.k8s.io", "volumesnapshotcontents", "get"),
        ("", "serviceaccounts/token", "create"),
    }
    for f, b in bindings:
        kn = f"examples/{f} ClusterRoleBinding/{b['metadata']['name']}"
        role = roles.get(b["roleRef"]["name"])
        fail.check(role is not None, kn, f"roleRef {b['roleRef']['name']} is not in examples/")
        for sub in b["subjects"]:
            fail.check(sub["name"] in accounts, kn, f"subject {sub['name']} is not in examples/")
        if role is not None:
            have = {
                (g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
                for r in rule["resources"] for v in rule["verbs"]
            }
            fail.check(need <= have, kn, f"the client role lacks {sorted(need - have)}")
    print(f"{len(objs)} objects in {len(list(EXAMPLES.glob('*.yaml')))} files")


def upstream_unchanged(fail: Failures) -> None:
    """The upstream CRDs are data copied unchanged from external-snapshotter: any edit (or a new
    upstream version dropped in without updating the sums) shows here."""
    step("upstream snapshot and snapshot-metadata CRDs unchanged (ci/snapshot-crds.sha256)")
    want = {}
    for line in (ROOT / "ci" / "snapshot-crds.sha256").read_text().splitlines():
        digest, name = line.split()
        want[name] = digest
    have = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in [*UPSTREAM_CRDS.glob("*.yaml"), *SMS_CRDS.glob("*.yaml")]
    }
    fail.check(set(have) == set(want), "snapshot-crds", f"files {sorted(have)}, want {sorted(want)}")
    for name in sorted(set(have) & set(want)):
        fail.check(have[name] == want[name], f"snapshot-crds/{name}", "differs from the upstream copy")
    print(f"{len(have)} files")


def crd_from_binary(binary: Path, fail: Failures, write: bool) -> None:
    step(f"CRDs: {binary} crd == {OUR_CRDS.relative_to(ROOT)}")
    if not binary.exists():
        fail.add("crd", f"{binary} does not exist: build it (cargo build) or pass --binary")
        return
    run = subprocess.run([str(binary), "crd"], capture_output=True, text=True)
    if run.returncode != 0:
        first = (run.stderr.strip().splitlines() or ["(no output)"])[0]
        fail.add(
            "crd",
            f"`{binary.name} crd` failed (exit {run.returncode}): {first} -- the binary must print "
            "our CRDs (the k8s types) so that the chart can be checked against them",
        )
        return
    try:
        generated = load_docs(run.stdout)
    except yaml.YAMLError as e:
        fail.add("crd", f"`{binary.name} crd` printed invalid YAML: {e}")
        return
    chart_docs = load_docs(OUR_CRDS.read_text())

    def norm(docs: list[dict[str, Any]]) -> str:
        docs = sorted(docs, key=lambda d: d.get("metadata", {}).get("name", ""))
        return yaml.safe_dump_all(docs, sort_keys=True)

    if norm(generated) == norm(chart_docs):
        print("identical (as data)")
        return
    if write:
        OUR_CRDS.write_text(run.stdout if run.stdout.startswith("---") else "---\n" + run.stdout)
        print(f"wrote {OUR_CRDS.relative_to(ROOT)} from the binary")
        return
    diff = difflib.unified_diff(
        norm(chart_docs).splitlines(),
        norm(generated).splitlines(),
        "chart",
        "binary",
        lineterm="",
    )
    print("\n".join(list(diff)[:200]))
    fail.add("crd", "the chart's CRDs differ from `flashcopy-csi crd` (diff above; --write updates)")


def manifests(fail: Failures, write: bool) -> None:
    step("manifests/ against a fresh render")
    chart = helm_python.Chart.load(CHART)
    want = generated_manifests(chart)
    keep = {"README.md"}
    have = {
        str(p.relative_to(MANIFESTS))
        for p in MANIFESTS.rglob("*")
        if p.is_file() and str(p.relative_to(MANIFESTS)) not in keep
    } if MANIFESTS.exists() else set()
    if write:
        for rel in have - set(want):
            (MANIFESTS / rel).unlink()
            print(f"removed manifests/{rel}")
        for rel, text in want.items():
            path = MANIFESTS / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists() or path.read_text() != text:
                path.write_text(text)
                print(f"wrote manifests/{rel}")
        return
    for rel in sorted(have - set(want)):
        fail.add(f"manifests/{rel}", "not generated by the chart (remove it, or ci/chart.py --write)")
    for rel, text in want.items():
        path = MANIFESTS / rel
        if not path.exists():
            fail.add(f"manifests/{rel}", "missing: run ci/chart.py --write")
            continue
        if path.read_text() != text:
            diff = difflib.unified_diff(
                path.read_text().splitlines(), text.splitlines(), f"manifests/{rel}", "render",
                lineterm="",
            )
            print("\n".join(list(diff)[:80]))
            fail.add(f"manifests/{rel}", "differs from the chart: run ci/chart.py --write")
    print(f"{len(want)} files")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", type=Path, default=ROOT / "target" / "debug" / "flashcopy-csi")
    ap.add_argument("--write", action="store_true", help="regenerate manifests/ and the chart CRDs")
    ap.add_argument("--no-crd-check", action="store_true", help="skip `flashcopy-csi crd`")
    args = ap.parse_args()
    print(
        f"helm SDK {helm_python.helm_sdk_version()}, kubernetes-validate "
        f"{kubernetes_validate.__version__ if hasattr(kubernetes_validate, '__version__') else ''}"
        f" (schemas {', '.join(KUBE_VERSIONS)})"
    )
    fail = Failures()
    binary: Path | None = args.binary
    if args.no_crd_check:
        step("CRDs and container args against the binary: SKIPPED (--no-crd-check)")
        binary = None
    else:
        crd_from_binary(args.binary, fail, args.write)
    upstream_unchanged(fail)
    lint_and_schema(fail)
    validate_variants(fail, binary)
    self_test(fail, binary)
    validate_examples(fail)
    manifests(fail, args.write)
    if fail.items:
        print(f"\n{len(fail.items)} failure(s):")
        for f in fail.items:
            print(f"  {f}")
        return 1
    print("\nchart checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
