#!/usr/bin/env python3
"""Checks the hearth Helm chart without helm or a cluster.

For the chart's default values and for ci/all-on-values.yaml (every option
on), and for the oldest and newest Kubernetes versions the chart supports:

1. renders the templates with deploy/helm/render (Go's text/template, the
   engine helm uses, with helm's objects and the helm/sprig functions the
   chart calls);
2. validates every rendered object against that Kubernetes version's
   OpenAPI schemas with kubernetes-validate, in strict mode (unknown fields
   are errors). The ServiceMonitor is a prometheus-operator CRD that
   kubernetes-validate has no schema for: its fields are checked here by
   hand against what the operator's v1 API documents for them;
3. checks what the chart promises: least privilege (or the privileged
   fallback), hostPID, NODE_NAME, probes on the metrics port, pods-only
   RBAC, the token only with kubernetes.enabled, tolerations, Secret
   mounts, that selectors match, that mounted ConfigMaps/volumes exist,
   and that values passed through toYaml come out equal;
4. writes each rendered config.toml to --out, for the Rust test to run
   through the real `hearth run --config FILE --print-config`.

Chart.yaml is checked against Helm's v2 chart metadata rules.

Usage: check_chart.py --out DIR   (needs `go` on PATH and kubernetes-validate)
"""

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile

import kubernetes_validate
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
CHART = os.path.join(HERE, "hearth")
RENDER = os.path.join(HERE, "render")
# The chart's kubeVersion floor and the newest schemas kubernetes-validate has.
KUBE_VERSIONS = ["1.25.0", "1.37.0"]
RELEASE = "hearth"
NAMESPACE = "profiling"

failures = []


def check(cond, message):
    if not cond:
        failures.append(message)
    return cond


def load_yaml(path):
    with open(path) as f:
        return yaml.safe_load(f)


def coalesce(user, chart):
    """Helm's value coalescing (user values over the chart's defaults)."""
    out = copy.deepcopy(user)
    for key, value in chart.items():
        if key not in out:
            out[key] = copy.deepcopy(value)
        elif out[key] is None:
            del out[key]
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = coalesce(out[key], value)
    return out


SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)


def check_chart_yaml(meta):
    """Helm's chart metadata validation (apiVersion v2)."""
    check(meta.get("apiVersion") == "v2", "Chart.yaml: apiVersion must be v2")
    name = meta.get("name", "")
    check(name == os.path.basename(CHART), "Chart.yaml: name must match the chart directory")
    check(re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) is not None,
          f"Chart.yaml: name {name!r} is not a valid chart name")
    check(isinstance(meta.get("version"), str) and SEMVER.match(meta["version"]) is not None,
          "Chart.yaml: version must be a SemVer 2 string")
    check(isinstance(meta.get("appVersion"), str), "Chart.yaml: appVersion must be a string (quote it)")
    check(meta.get("type", "application") in ("application", "library"), "Chart.yaml: bad type")
    check(re.fullmatch(r">=\s*\d+\.\d+\.\d+(-0)?", meta.get("kubeVersion", "")) is not None,
          "Chart.yaml: kubeVersion must be a >= constraint")
    floor = re.search(r"\d+\.\d+\.\d+", meta.get("kubeVersion", ""))
    check(floor is not None and floor.group(0) == KUBE_VERSIONS[0],
          f"Chart.yaml: kubeVersion floor should be the oldest version checked ({KUBE_VERSIONS[0]})")
    known = {"apiVersion", "name", "version", "kubeVersion", "description", "type", "keywords",
             "home", "sources", "dependencies", "maintainers", "icon", "appVersion",
             "deprecated", "annotations"}
    check(not set(meta) - known, f"Chart.yaml: unknown fields {set(meta) - known}")
    workspace = open(os.path.join(HERE, "..", "..", "Cargo.toml")).read()
    version = re.search(r'^version = "([^"]+)"', workspace, re.M).group(1)
    check(meta.get("appVersion") == version,
          f"Chart.yaml: appVersion {meta.get('appVersion')} is not hearth's version {version}")


def render(values_files, kube_version, tmp, notes_out):
    """Renders the chart; returns [(source, object)]."""
    def to_json(path):
        out = os.path.join(tmp, os.path.basename(path) + f".{len(os.listdir(tmp))}.json")
        with open(out, "w") as f:
            json.dump(load_yaml(path) or {}, f)
        return out

    args = ["go", "run", ".",
            "-chart", CHART,
            "-chart-json", to_json(os.path.join(CHART, "Chart.yaml")),
            "-values-json", to_json(os.path.join(CHART, "values.yaml")),
            "-name", RELEASE, "-namespace", NAMESPACE,
            "-kube-version", "v" + kube_version,
            "-notes-out", notes_out]
    for path in values_files:
        args += ["-override-json", to_json(path)]
    env = dict(os.environ, GOTOOLCHAIN="local", GOFLAGS="-mod=mod", GO111MODULE="on")
    result = subprocess.run(args, cwd=RENDER, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"rendering failed:\n{result.stderr}")
    docs = []
    for block in result.stdout.split("---\n# Source: ")[1:]:
        source, _, text = block.partition("\n")
        for obj in yaml.safe_load_all(text):
            if obj is not None:
                docs.append((source, obj))
    return docs


def check_service_monitor(obj):
    """monitoring.coreos.com/v1 ServiceMonitor: the fields the chart sets."""
    where = "ServiceMonitor"
    check(obj.get("apiVersion") == "monitoring.coreos.com/v1", f"{where}: apiVersion")
    check(set(obj) <= {"apiVersion", "kind", "metadata", "spec"}, f"{where}: unknown top-level fields")
    spec = obj.get("spec", {})
    check(set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"},
          f"{where}: unexpected spec fields {set(spec)}")
    check(isinstance(spec.get("selector", {}).get("matchLabels"), dict), f"{where}: selector.matchLabels")
    check(isinstance(spec.get("namespaceSelector", {}).get("matchNames"), list),
          f"{where}: namespaceSelector.matchNames")
    duration = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")
    for ep in spec.get("endpoints", []):
        check(set(ep) <= {"port", "path", "interval", "scrapeTimeout"}, f"{where}: endpoint fields {set(ep)}")
        check(isinstance(ep.get("port"), str), f"{where}: endpoint port must be a port name")
        for key in ("interval", "scrapeTimeout"):
            if key in ep:
                check(isinstance(ep[key], str) and duration.match(ep[key]) is not None,
                      f"{where}: {key} {ep[key]!r} is not a Prometheus duration")
    check(len(spec.get("endpoints", [])) > 0, f"{where}: no endpoints")


def check_objects(docs, values, label):
    by_kind = {}
    for _, obj in docs:
        by_kind.setdefault(obj["kind"], []).append(obj)
    ds = by_kind["DaemonSet"][0]
    pod = ds["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    sc = container["securityContext"]
    where = f"{label}: DaemonSet"

    check(pod.get("hostPID") is True, f"{where}: hostPID")
    check(ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items(),
          f"{where}: selector does not match the pod labels")
    check(sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem")
    vsc = values["securityContext"]
    if vsc["privileged"]:
        check(sc.get("privileged") is True, f"{where}: privileged fallback")
        check("capabilities" not in sc, f"{where}: capabilities with privileged")
    else:
        check(sc.get("privileged") is False and sc.get("allowPrivilegeEscalation") is False,
              f"{where}: least privilege")
        check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: drop ALL")
        check(sc.get("capabilities", {}).get("add") == vsc["capabilities"],
              f"{where}: capabilities {sc.get('capabilities')} != values {vsc['capabilities']}")
        for required in ("BPF", "PERFMON", "SYS_PTRACE"):
            check(required in sc["capabilities"]["add"], f"{where}: {required} missing")
        check(pod.get("securityContext", {}).get("seccompProfile") == vsc["seccompProfile"],
              f"{where}: seccompProfile")
        apparmor_field = sc.get("appArmorProfile")
        apparmor_annotation = ds["spec"]["template"]["metadata"]["annotations"].get(
            "container.apparmor.security.beta.kubernetes.io/hearth")
        check((apparmor_field == vsc["appArmorProfile"]) != (apparmor_annotation is not None),
              f"{where}: AppArmor profile set once, as field or annotation")
        if apparmor_annotation is not None:
            check(apparmor_annotation == "unconfined", f"{where}: AppArmor annotation {apparmor_annotation}")

    env = {e["name"]: e for e in container.get("env", [])}
    check(env.get("NODE_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName",
          f"{where}: NODE_NAME from the downward API")
    for extra in values["extraEnv"]:
        check(env.get(extra["name"]) == extra, f"{where}: extraEnv {extra['name']}")

    port = values["metrics"]["port"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    check(ports.get("metrics") == port, f"{where}: metrics port")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        check(container.get(probe) == values[probe], f"{where}: {probe} differs from values")
        check(container.get(probe, {}).get("httpGet", {}).get("path") == path, f"{where}: {probe} path")
        check(container.get(probe, {}).get("httpGet", {}).get("port") in ("metrics", port), f"{where}: {probe} port")
    check(container.get("resources") == values["resources"], f"{where}: resources differ from values")
    check(pod.get("tolerations") == values["tolerations"], f"{where}: tolerations differ from values")
    check({"operator": "Exists"} in pod.get("tolerations", []) or values["tolerations"] != [{"operator": "Exists"}],
          f"{where}: tolerate every taint")
    check(pod.get("nodeSelector", {}) == values["nodeSelector"], f"{where}: nodeSelector")
    check(pod.get("affinity", {}) == values["affinity"], f"{where}: affinity")
    for key, value in values["podAnnotations"].items():
        check(ds["spec"]["template"]["metadata"]["annotations"].get(key) == value, f"{where}: podAnnotations")
    check(values["podLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items(), f"{where}: podLabels")
    check(pod.get("imagePullSecrets", []) == values["imagePullSecrets"], f"{where}: imagePullSecrets")

    # Token and RBAC: only with kubernetes.enabled; pods get/list/watch only.
    k8s = values["kubernetes"]["enabled"]
    check(pod.get("automountServiceAccountToken") is k8s, f"{where}: automountServiceAccountToken")
    sa_name = pod["serviceAccountName"]
    if values["serviceAccount"]["create"]:
        (sa,) = by_kind["ServiceAccount"]
        check(sa["metadata"]["name"] == sa_name, f"{label}: ServiceAccount name")
        check(sa.get("automountServiceAccountToken") is False, f"{label}: ServiceAccount automount off")
    if k8s and values["rbac"]["create"]:
        (role,) = by_kind["ClusterRole"]
        check(role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
              f"{label}: ClusterRole must allow pods get/list/watch and nothing else")
        (binding,) = by_kind["ClusterRoleBinding"]
        check(binding["roleRef"]["name"] == role["metadata"]["name"], f"{label}: binding roleRef")
        check(binding["subjects"] == [{"kind": "ServiceAccount", "name": sa_name, "namespace": NAMESPACE}],
              f"{label}: binding subject")
    else:
        check("ClusterRole" not in by_kind, f"{label}: ClusterRole without kubernetes.enabled")

    # Volumes: every mount has a volume; the config file is the ConfigMap's.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for m in container["volumeMounts"]:
        check(m["name"] in volumes, f"{where}: mount {m['name']} has no volume")
    args = container["args"]
    config_path = args[args.index("--config") + 1]
    (cm,) = by_kind["ConfigMap"]
    config_mount = mounts.get(config_path)
    check(config_mount is not None and config_mount.get("subPath") in cm["data"],
          f"{where}: {config_path} is not a key of the ConfigMap")
    check(volumes["config"]["configMap"]["name"] == cm["metadata"]["name"], f"{where}: ConfigMap name")
    check("/var/lib/hearth" in mounts, f"{where}: state mount")
    tls = values["otlp"]["tls"]
    if tls["secretName"]:
        check(volumes["tls"]["secret"]["secretName"] == tls["secretName"], f"{where}: TLS Secret")
        items = {i["key"]: i["path"] for i in volumes["tls"]["secret"]["items"]}
        check(items.get(tls["caKey"]) == "ca.pem", f"{where}: CA item")
    headers = values["otlp"]["headersSecret"]
    if headers["name"]:
        check(volumes["headers"]["secret"]["secretName"] == headers["name"], f"{where}: headers Secret")

    # Priority class.
    if values["priorityClass"]["create"]:
        (pc,) = by_kind["PriorityClass"]
        check(pod.get("priorityClassName") == pc["metadata"]["name"], f"{where}: priorityClassName")
        check(pc["value"] == values["priorityClass"]["value"], f"{label}: PriorityClass value")
    elif values["priorityClassName"]:
        check(pod.get("priorityClassName") == values["priorityClassName"], f"{where}: priorityClassName")

    # Metrics Service and ServiceMonitor select the agents.
    if values["metrics"]["service"]["enabled"] or values["serviceMonitor"]["enabled"]:
        (svc,) = by_kind["Service"]
        check(svc["spec"]["selector"].items() <= ds["spec"]["template"]["metadata"]["labels"].items(),
              f"{label}: Service selector does not match the pods")
        check([p["name"] for p in svc["spec"]["ports"]] == ["metrics"], f"{label}: Service port")
        if values["serviceMonitor"]["enabled"]:
            (sm,) = by_kind["ServiceMonitor"]
            check(sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items(),
                  f"{label}: ServiceMonitor selector does not match the Service")
            check(sm["spec"]["endpoints"][0]["port"] == "metrics", f"{label}: ServiceMonitor port")
            check(values["serviceMonitor"]["labels"].items() <= sm["metadata"]["labels"].items(),
                  f"{label}: ServiceMonitor labels")
    return cm["data"]["config.toml"]


def check_all_on(defaults, all_on):
    """ci/all-on-values.yaml must switch on every option the defaults leave off."""
    exempt = {"nameOverride", "fullnameOverride", "image.tag", "state.hostPath",
              "config.otlp-endpoint"}

    def walk(default, merged, path):
        for key, value in default.items():
            where = f"{path}{key}"
            if where in exempt:
                continue
            if isinstance(value, dict) and value:
                walk(value, merged[key], where + ".")
            elif value is False:
                check(merged[key] is True, f"all-on values: {where} is not turned on")
            elif value in ("", [], {}):
                check(merged[key] not in ("", [], {}, None), f"all-on values: {where} is not set")

    walk(defaults, coalesce(all_on, defaults), "")
    check(coalesce(all_on, defaults)["config"].get("otlp-endpoint", "").startswith("https://"),
          "all-on values: config.otlp-endpoint should be an https:// endpoint (TLS on)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="directory for the rendered config.toml files")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    check_chart_yaml(load_yaml(os.path.join(CHART, "Chart.yaml")))
    defaults = load_yaml(os.path.join(CHART, "values.yaml"))
    all_on_path = os.path.join(CHART, "ci", "all-on-values.yaml")
    all_on = load_yaml(all_on_path)
    check_all_on(defaults, all_on)

    cases = {"default": [], "all-on": [all_on_path]}
    with tempfile.TemporaryDirectory() as tmp:
        for label, files in cases.items():
            values = defaults
            for path in files:
                values = coalesce(load_yaml(path), values)
            for kube in KUBE_VERSIONS:
                notes = os.path.join(tmp, "NOTES.txt")
                docs = render(files, kube, tmp, notes)
                check(len(open(notes).read().strip()) > 0, f"{label}: NOTES.txt rendered empty")
                where = f"{label} values, Kubernetes {kube}"
                for source, obj in docs:
                    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')} ({source})"
                    if obj.get("kind") == "ServiceMonitor":
                        check_service_monitor(obj)
                        print(f"{where}: {name}: CRD, fields checked by hand")
                        continue
                    try:
                        kubernetes_validate.validate(obj, kube, strict=True)
                        print(f"{where}: {name}: valid (strict)")
                    except kubernetes_validate.ValidationError as e:
                        failures.append(f"{where}: {name}: {e.message}")
                    except kubernetes_validate.SchemaNotFoundError as e:
                        failures.append(f"{where}: {name}: no schema: {e}")
                kinds = sorted({obj["kind"] for _, obj in docs})
                print(f"{where}: kinds {', '.join(kinds)}")
                config = check_objects(docs, values, where)
                with open(os.path.join(args.out, f"{label}-{kube}.config.toml"), "w") as f:
                    f.write(config)
    if failures:
        print("\n".join(["CHART CHECK FAILED:"] + failures), file=sys.stderr)
        sys.exit(1)
    print("chart checks passed")


if __name__ == "__main__":
    main()
