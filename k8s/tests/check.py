#!/usr/bin/env python3
"""Offline checks of k8s/ (run through k8s/test.sh, which installs the pinned tools).

1. `helm lint --strict` (Helm's Go SDK, embedded by helm-python-sdk) is clean for the
   default values, both examples and every case under tests/cases/.
2. Rendering (`helm template`, i.e. a client-only dry-run install) succeeds for all of
   them, and the committed examples/rendered/*.yaml equal a fresh render (`--update`
   rewrites them).
3. Values that cannot work fail to render with a clear message (tests/cases/invalid.yaml).
4. Every rendered manifest validates against the Kubernetes OpenAPI schemas (strict: no
   unknown fields) of the oldest supported and the newest Kubernetes version; the
   ServiceMonitor and KEDA ScaledObject against the CRDs their operators ship
   (tests/crds/). The rendered files, values files and Chart.yaml pass yamllint.
5. Every rendered `stral` command line uses only flags of the CLI contract, with sane
   values; with STRAL_BIN set, the binary's own parser accepts it (`stral <args> --help`
   exits 0 only when clap parsed every argument before it).
6. The metrics that the dashboard, the HPA and the KEDA queries read are ones the
   coordinator exports (names taken from coordinator/src).
7. k8s/Dockerfile passes hadolint and the structural rules: multi-stage, runtime stages
   without build tools and running as a non-root uid, every workspace crate copied,
   toolchain and CUDA versions matching the workspace.

Prints one line per check and `N passed, M failed`; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
import traceback
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CHART = K8S / "chart"
TESTS = K8S / "tests"
EXAMPLES = K8S / "examples"
RENDERED = EXAMPLES / "rendered"
RELEASE = "stral"
NAMESPACE = "default"
# The floor of Chart.yaml's kubeVersion and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ["1.30.0", "1.37.0"]

# Committed renders: name -> values file under examples/ (None: the chart defaults).
EXAMPLE_VALUES = {
    "default": None,
    "tp1": "values-tp1.yaml",
    "tp4-3replicas": "values-tp4-3replicas.yaml",
}

# The `stral` CLI contract (ARCHITECTURE.md §9 and the distributed-runtime/HTTP issues).
CLI_CONTRACT = {
    "serve": {
        "--host", "--port", "--model", "--tp", "--device", "--workers", "--api-key",
        "--api-key-file", "--served-model-name", "--gpu-memory-utilization",
        "--max-num-seqs", "--max-num-batched-tokens", "--block-size", "--max-waiting",
    },
    "worker": {"--listen", "--device"},
    "route": {"--host", "--port", "--replicas-dns", "--policy"},
}
INT_FLAGS = {"--port", "--tp", "--max-num-seqs", "--max-num-batched-tokens", "--block-size", "--max-waiting"}


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0
        self.warnings: list[str] = []

    def ok(self, name: str) -> None:
        self.passed += 1
        print(f"ok    {name}")

    def fail(self, name: str, detail: str) -> None:
        self.failed += 1
        print(f"FAIL  {name}\n      " + detail.strip().replace("\n", "\n      "))

    def check(self, name: str, problems: list[str]) -> None:
        if problems:
            self.fail(name, "\n".join(problems))
        else:
            self.ok(name)

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        print(f"WARN  {text}")


def load_values(path: Path | None) -> dict:
    if path is None:
        return {}
    return helm.values_from_yaml(path.read_text())


def render(values: dict) -> str:
    """`helm template RELEASE k8s/chart -n NAMESPACE -f values`: manifests sorted in
    install order, each with its `# Source:` line, hooks and NOTES left out (the chart
    has no hooks); the trailing blank line dropped."""
    with helm.Config(namespace=NAMESPACE, storage_driver="memory") as cfg:
        release = cfg.install(str(CHART), RELEASE, values, dry_run="client", namespace=NAMESPACE)
    return release["manifest"].rstrip("\n") + "\n"


def documents(manifest: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(manifest) if d]


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------------------- lint/render

def check_lint(report: Report, name: str, values: dict) -> None:
    problems = []
    for version in KUBE_VERSIONS:
        result = helm.lint(str(CHART), values, strict=True, kube_version=f"v{version}")
        for m in result.get("messages", []):
            problems.append(f"k8s {version}: [{m.get('severity')}] {m.get('path')}: {m.get('error')}")
        problems += [f"k8s {version}: {e}" for e in result.get("errors", [])]
    report.check(f"helm lint --strict [{name}]", problems)


def example_header(name: str) -> str:
    values = EXAMPLE_VALUES[name]
    flags = f" -f k8s/examples/{values}" if values else ""
    return (f"# helm template {RELEASE} k8s/chart --namespace {NAMESPACE}{flags}\n"
            "# Generated by `bash k8s/test.sh --update`; k8s/test.sh fails when it is stale.\n")


def check_examples(report: Report, update: bool) -> dict[str, str]:
    manifests = {}
    for name, values_file in EXAMPLE_VALUES.items():
        values = load_values(EXAMPLES / values_file if values_file else None)
        check_lint(report, name, values)
        try:
            manifest = render(values)
        except helm.HelmError as e:
            report.fail(f"render [{name}]", str(e))
            continue
        manifests[name] = manifest
        expected = example_header(name) + manifest
        path = RENDERED / f"{name}.yaml"
        if update:
            path.write_text(expected)
            report.ok(f"render [{name}] -> {path.relative_to(ROOT)} (updated)")
        elif not path.exists() or path.read_text() != expected:
            report.fail(f"render [{name}] matches {path.relative_to(ROOT)}",
                        "stale or missing: run `bash k8s/test.sh --update` and commit the result")
        else:
            report.ok(f"render [{name}] matches {path.relative_to(ROOT)}")
    return manifests


def check_cases(report: Report) -> dict[str, str]:
    manifests = {}
    for path in sorted((TESTS / "cases").glob("*.yaml")):
        if path.name == "invalid.yaml":
            continue
        values = load_values(path)
        check_lint(report, path.stem, values)
        try:
            manifests[path.stem] = render(values)
            report.ok(f"render [{path.stem}]")
        except helm.HelmError as e:
            report.fail(f"render [{path.stem}]", str(e))
    return manifests


def check_invalid(report: Report) -> None:
    for case in yaml.safe_load((TESTS / "cases" / "invalid.yaml").read_text()):
        name = f"rejects: {case['name']}"
        try:
            render(case["values"])
        except helm.HelmError as e:
            if case["error"] in str(e):
                report.ok(name)
            else:
                report.fail(name, f"failed, but without {case['error']!r}: {e}")
            continue
        report.fail(name, "rendered without error")


# ---------------------------------------------------------------------- schema validation

def strict_schema(schema: dict) -> dict:
    """A CRD's structural schema with unknown fields rejected (the API server would
    silently prune them; a typo in the chart should fail here instead)."""
    s = dict(schema)
    if "properties" in s and "additionalProperties" not in s \
            and not s.get("x-kubernetes-preserve-unknown-fields"):
        s["additionalProperties"] = False
    if "properties" in s:
        s["properties"] = {k: strict_schema(v) for k, v in s["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(s.get(key), dict):
            s[key] = strict_schema(s[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in s:
            s[key] = [strict_schema(x) for x in s[key]]
    return s


def load_crd_schemas() -> dict[tuple[str, str], dict]:
    schemas = {}
    for path in sorted((TESTS / "crds").glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served"):
                    schema = version["schema"]["openAPIV3Schema"]
                    schemas[(f"{group}/{version['name']}", kind)] = strict_schema(schema)
    return schemas


def validate_manifest(report: Report, name: str, manifest: str, crds: dict) -> None:
    problems = []
    for doc in documents(manifest):
        ident = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        crd = crds.get((doc.get("apiVersion"), doc.get("kind")))
        if crd is not None:
            for err in jsonschema.Draft7Validator(crd).iter_errors(doc):
                path = "/".join(str(p) for p in err.absolute_path)
                problems.append(f"{ident} ({doc['apiVersion']} CRD): {path}: {err.message}")
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = "/".join(str(p) for p in e.absolute_path)
                problems.append(f"{ident} (k8s {version}): {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError:
                problems.append(f"{ident}: no schema for {doc.get('apiVersion')} {doc.get('kind')} in k8s {version}")
    report.check(f"kubernetes schemas {'+'.join(KUBE_VERSIONS)} (strict) [{name}]", problems)


def check_yamllint(report: Report, manifests: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        files = [CHART / "Chart.yaml", CHART / "values.yaml", *sorted(EXAMPLES.glob("*.yaml")),
                 *sorted((TESTS / "cases").glob("*.yaml")), *sorted(RENDERED.glob("*.yaml"))]
        for name, manifest in manifests.items():
            path = Path(tmp) / f"{name}.yaml"
            path.write_text(manifest)
            files.append(path)
        proc = subprocess.run(
            [sys.executable, "-m", "yamllint", "--strict", "-f", "parsable",
             "-c", str(TESTS / "yamllint.yaml"), *map(str, files)],
            capture_output=True, text=True)
        report.check(f"yamllint --strict ({len(files)} files)",
                     [] if proc.returncode == 0 else [proc.stdout + proc.stderr])


# ------------------------------------------------------------------------- stral commands

def stral_containers(manifest: str):
    for doc in documents(manifest):
        if doc.get("kind") not in ("Deployment", "StatefulSet"):
            continue
        for c in doc["spec"]["template"]["spec"]["containers"]:
            if c.get("name") in ("stral", "worker", "router"):
                yield f"{doc['kind']}/{doc['metadata']['name']}", c


def contract_problems(ident: str, container: dict) -> list[str]:
    args = [str(a) for a in container.get("args", [])]
    if "command" in container:
        return [f"{ident}: sets command; the image entrypoint (tini -- stral) must run it"]
    if not args or args[0] not in CLI_CONTRACT:
        return [f"{ident}: args do not start with a stral subcommand: {args[:1]}"]
    sub, flags, problems = args[0], {}, []
    i = 1
    while i < len(args):
        flag = args[i]
        if not flag.startswith("--") or flag not in CLI_CONTRACT[sub]:
            problems.append(f"{ident}: `stral {sub}` has no flag {flag!r}")
            i += 1
            continue
        if i + 1 >= len(args) or args[i + 1].startswith("--"):
            problems.append(f"{ident}: {flag} without a value")
            i += 1
            continue
        flags.setdefault(flag, []).append(args[i + 1])
        i += 2
    for flag in INT_FLAGS:
        for value in flags.get(flag, []):
            if not value.isdigit():
                problems.append(f"{ident}: {flag} {value!r} is not an integer")
    for value in flags.get("--device", []):
        if value not in ("cuda", "cpu"):
            problems.append(f"{ident}: --device {value!r}")
    for value in flags.get("--gpu-memory-utilization", []):
        if not 0 < float(value) <= 1:
            problems.append(f"{ident}: --gpu-memory-utilization {value}")
    if sub == "serve" and "--workers" in flags:
        workers = flags["--workers"][0].split(",")
        tp = int(flags.get("--tp", ["0"])[0])
        if len(workers) != tp or not all(re.fullmatch(r"[a-z0-9.-]+:\d+", w) for w in workers):
            problems.append(f"{ident}: --workers {workers} for --tp {tp}")
    if sub == "worker" and not re.fullmatch(r"0\.0\.0\.0:\d+", flags.get("--listen", [""])[0]):
        problems.append(f"{ident}: worker --listen {flags.get('--listen')}")
    return problems


def check_worker_access(report: Report, manifests: dict[str, str]) -> None:
    """Where workers are pods of their own, they listen beyond loopback: every stral
    container there reads the shared token from a mounted Secret, and a NetworkPolicy
    admits only this release's coordinators and workers to the worker pods."""
    for name, manifest in manifests.items():
        docs = documents(manifest)
        workers = [d for d in docs if d.get("kind") == "StatefulSet"
                   and d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"]
        if not workers:
            continue
        problems = []
        secrets = {d["metadata"]["name"] for d in docs if d.get("kind") == "Secret"}
        for ident, c in stral_containers(manifest):
            env = {e["name"]: e for e in c.get("env", [])}
            path = env.get("STRAL_WORKER_TOKEN_FILE", {}).get("value", "")
            mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
            if not path or not path.startswith(mounts.get("worker-token", "//") + "/"):
                problems.append(f"{ident}: STRAL_WORKER_TOKEN_FILE {path!r} is not in the worker-token mount")
        for d in docs:
            if d.get("kind") not in ("Deployment", "StatefulSet"):
                continue
            for v in d["spec"]["template"]["spec"].get("volumes", []):
                if v["name"] == "worker-token" and v["secret"]["secretName"] not in secrets:
                    problems.append(f"{d['metadata']['name']}: token Secret {v['secret']['secretName']} is not rendered")
        policies = [d for d in docs if d.get("kind") == "NetworkPolicy"
                    and d["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component") == "worker"]
        if len(policies) != 1:
            problems.append(f"{len(policies)} NetworkPolicies select the worker pods")
        else:
            sources = [p["podSelector"]["matchLabels"].get("app.kubernetes.io/component")
                       for rule in policies[0]["spec"]["ingress"] for p in rule["from"]]
            if sorted(sources) != ["coordinator", "worker"]:
                problems.append(f"the worker NetworkPolicy admits {sources}")
        report.check(f"workers take calls only with the token, from the coordinator [{name}]", problems)


def check_router(report: Report, manifests: dict[str, str]) -> None:
    """With router.enabled: the chart's Service reaches the router, the router resolves a
    headless Service of the coordinators, and the router has a PDB."""
    for name, manifest in manifests.items():
        docs = documents(manifest)
        routers = [d for d in docs if d.get("kind") == "Deployment"
                   and d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "router"]
        if not routers:
            continue
        problems = []
        args = routers[0]["spec"]["template"]["spec"]["containers"][0]["args"]
        dns = args[args.index("--replicas-dns") + 1] if "--replicas-dns" in args else ""
        services = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Service"}
        headless = services.get(dns.split(".")[0])
        if not headless or headless["spec"].get("clusterIP") != "None" \
                or headless["spec"]["selector"].get("app.kubernetes.io/component") != "coordinator":
            problems.append(f"--replicas-dns {dns!r} is not a headless Service of the coordinators")
        fronts = [s for s in services.values() if s["spec"].get("clusterIP") != "None"
                  and s["spec"]["selector"].get("app.kubernetes.io/component") == "coordinator"]
        if fronts:
            problems.append(f"Services still bypass the router: {[s['metadata']['name'] for s in fronts]}")
        if not any(d.get("kind") == "PodDisruptionBudget"
                   and d["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/component") == "router" for d in docs):
            problems.append("no PodDisruptionBudget for the router")
        report.check(f"clients reach the replicas through stral route [{name}]", problems)


def binary_is_contract_ready(binary: str) -> bool:
    proc = subprocess.run([binary, "worker", "--help"], capture_output=True, text=True)
    return "--listen" in proc.stdout


def check_commands(report: Report, manifests: dict[str, str], binary: str | None) -> None:
    seen: dict[tuple, str] = {}
    problems = []
    for name, manifest in manifests.items():
        for ident, container in stral_containers(manifest):
            problems += contract_problems(f"[{name}] {ident}", container)
            seen.setdefault(tuple(str(a) for a in container.get("args", [])), f"[{name}] {ident}")
    report.check(f"stral command lines follow the CLI contract ({len(seen)} distinct)", problems)
    if not binary:
        report.warn("STRAL_BIN not set: rendered command lines not parsed by the stral binary")
        return
    if not binary_is_contract_ready(binary):
        report.warn(f"{binary} predates the CLI contract (`stral worker --help` has no --listen): "
                    "rendered command lines checked against the contract only")
        return
    problems = []
    for args, ident in seen.items():
        proc = subprocess.run([binary, *args, "--help"], capture_output=True, text=True)
        if proc.returncode != 0:
            problems.append(f"{ident}: stral {' '.join(args)}\n{proc.stderr.strip()}")
    report.check(f"stral's own parser accepts every rendered command line ({len(seen)})", problems)


# ------------------------------------------------------------------------------- metrics

def exported_metrics() -> set[str]:
    names = set()
    for path in (ROOT / "coordinator" / "src").rglob("*.rs"):
        names |= set(re.findall(r"\b(stral_[a-z0-9_]+)", path.read_text()))
    return names


def check_metrics(report: Report, manifests: dict[str, str]) -> None:
    dashboard = json.loads((CHART / "dashboards" / "stral.json").read_text())
    exprs = []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("expr", "query", "definition") and isinstance(v, str):
                    exprs.append(v)
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dashboard)
    for manifest in manifests.values():
        for doc in documents(manifest):
            if doc["kind"] == "HorizontalPodAutoscaler":
                exprs += [m["pods"]["metric"]["name"] for m in doc["spec"]["metrics"] if m["type"] == "Pods"]
            if doc["kind"] == "ScaledObject":
                exprs += [t["metadata"]["query"] for t in doc["spec"]["triggers"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"stral_[a-z0-9_]+", e)}
    problems = []
    if dashboard.get("uid") != "stral-overview" or not dashboard.get("panels"):
        problems.append("dashboard: missing uid or panels")
    ids = [p["id"] for p in dashboard["panels"]]
    if len(ids) != len(set(ids)):
        problems.append("dashboard: duplicate panel ids")
    exported = exported_metrics()
    if not exported:
        report.warn("no stral_* metric names found under coordinator/src: metric names not cross-checked")
    else:
        problems += [f"{m} is read by the dashboard/autoscaler but not exported by the coordinator"
                     for m in sorted(used - exported)]
    report.check(f"dashboard and autoscalers read exported metrics ({len(used)} names)", problems)


# ---------------------------------------------------------------------------- Dockerfile

def dockerfile_stages(text: str) -> list[dict]:
    lines, current = [], ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        current += raw.rstrip("\\").strip() + " " if raw.rstrip().endswith("\\") else raw.strip()
        if not raw.rstrip().endswith("\\"):
            if current.strip():
                lines.append(current.strip())
            current = ""
    args, stages = {}, []
    for line in lines:
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "ARG" and not stages:
            k, _, v = rest.partition("=")
            args[k] = v
        elif op == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            image = re.sub(r"\$\{(\w+)\}", lambda g: args.get(g.group(1), g.group(0)), m.group(1))
            stages.append({"name": m.group(2), "image": image, "ops": []})
        elif stages:
            stages[-1]["ops"].append((op, rest))
    return [{"args": args}, *stages]


def check_dockerfile(report: Report) -> None:
    dockerfile = K8S / "Dockerfile"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "hadolint"), "--config", str(TESTS / "hadolint.yaml"), str(dockerfile)],
        capture_output=True, text=True)
    report.check("hadolint k8s/Dockerfile", [] if proc.returncode == 0 else [proc.stdout + proc.stderr])

    text = dockerfile.read_text()
    head, *stages = dockerfile_stages(text)
    args = head["args"]
    by_name = {s["name"]: s for s in stages}
    problems = []
    if [s["name"] for s in stages] != ["build", "cuda-headers", "cpu", "cuda"]:
        problems.append(f"stages {[s['name'] for s in stages]}: want build, cuda-headers, cpu, cuda (cuda last = default)")
    workspace = tomllib.loads((ROOT / "Cargo.toml").read_text())
    build = by_name.get("build", {"ops": [], "image": ""})
    copied = {rest.split()[0] for op, rest in build["ops"] if op == "COPY"} | {
        p for op, rest in build["ops"] if op == "COPY" for p in rest.split()[:-1]}
    for needed in ["Cargo.toml", "Cargo.lock", "src", *workspace["workspace"]["members"]]:
        if needed not in copied:
            problems.append(f"build stage does not COPY {needed} (a workspace member or root file)")
    min_rust = tuple(int(x) for x in workspace["workspace"]["package"]["rust-version"].split("."))
    rust = tuple(int(x) for x in args.get("RUST_VERSION", "0").split("."))
    if rust[:len(min_rust)] < min_rust:
        problems.append(f"RUST_VERSION {args.get('RUST_VERSION')} is older than rust-version {min_rust}")
    kernels = (ROOT / "kernels" / "Cargo.toml").read_text()
    m = re.search(r'"cuda-(\d+)"', kernels)
    if m:
        want = f"{int(m.group(1)) // 1000}.{int(m.group(1)) % 1000 // 10}"
        have = ".".join(args.get("CUDA_VERSION", "").split(".")[:2])
        if want != have:
            problems.append(f"CUDA_VERSION {args.get('CUDA_VERSION')} but cudarc is built for CUDA {want}")
        if args.get("CUDA_PACKAGE_SUFFIX") != want.replace(".", "-"):
            problems.append(f"CUDA_PACKAGE_SUFFIX {args.get('CUDA_PACKAGE_SUFFIX')} for CUDA {want}")
    forbidden = re.compile(r"\b(build-essential|gcc|g\+\+|clang|make|cmake|cargo|rustc|rustup|"
                           r"cuda-nvcc\S*|cuda-toolkit\S*|\S+-dev(?:-\S+)?|python3-pip)(?:=\S*)?\b")
    for name in ("cpu", "cuda"):
        stage = by_name.get(name)
        if not stage:
            continue
        if name == "cuda" and not re.fullmatch(r"nvidia/cuda:[\d.]+-runtime-ubuntu[\d.]+", stage["image"]):
            problems.append(f"cuda stage FROM {stage['image']}: want an nvidia/cuda *-runtime-* image (NCCL, no compilers)")
        if name == "cpu" and "slim" not in stage["image"]:
            problems.append(f"cpu stage FROM {stage['image']}: want a slim base")
        users = [rest for op, rest in stage["ops"] if op == "USER"]
        if not users or not re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", users[-1]):
            problems.append(f"{name}: last USER {users[-1:]} is not a numeric non-root uid")
        for op, rest in stage["ops"]:
            if op == "RUN" and "install" in rest:
                bad = [m.group(1) for m in forbidden.finditer(rest.split("install", 1)[1])]
                if bad:
                    problems.append(f"{name}: installs build tools {bad}")
            if op == "COPY" and "--from=" in rest and not re.search(r"--from=(build|cuda-headers)\b", rest):
                problems.append(f"{name}: COPY {rest}")
        entry = [rest for op, rest in stage["ops"] if op == "ENTRYPOINT"]
        if not entry or json.loads(entry[-1]) != ["/usr/bin/tini", "--", "/usr/local/bin/stral"]:
            problems.append(f"{name}: ENTRYPOINT {entry[-1:]}: want tini -- stral (the chart sets args only)")
    ignore = (K8S / "Dockerfile.dockerignore").read_text().split()
    for needed in ["src", "Cargo.toml", "Cargo.lock", *workspace["workspace"]["members"]]:
        if needed in ignore:
            problems.append(f"Dockerfile.dockerignore excludes {needed}")
    report.check("Dockerfile structure (stages, non-root, no build tools, versions)", problems)


# ---------------------------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--update", action="store_true", help="rewrite examples/rendered/*.yaml")
    opts = parser.parse_args()
    binary = os.environ.get("STRAL_BIN") or None
    report = Report()
    print(f"helm SDK {helm.helm_sdk_version()} (helm-python-sdk, libhelm_c {helm.helm_c_version()}), "
          f"kubernetes schemas {', '.join(KUBE_VERSIONS)}")

    def guarded(name, fn, *args, default=None):
        try:
            return fn(*args)
        except Exception:  # a crashing check is a failed check, with its traceback
            report.fail(name, traceback.format_exc())
            return default

    examples = guarded("render examples", check_examples, report, opts.update, default={})
    cases = guarded("render cases", check_cases, report, default={})
    guarded("invalid values", check_invalid, report)
    manifests = {**examples, **cases}
    crds = guarded("load CRDs", load_crd_schemas, default={})
    for name, manifest in manifests.items():
        guarded(f"schemas [{name}]", validate_manifest, report, name, manifest, crds)
    guarded("yamllint", check_yamllint, report, manifests)
    guarded("stral commands", check_commands, report, manifests, binary)
    guarded("worker access", check_worker_access, report, manifests)
    guarded("router", check_router, report, manifests)
    guarded("metrics", check_metrics, report, manifests)
    guarded("Dockerfile", check_dockerfile, report)

    print(f"\nk8s: {report.passed} passed, {report.failed} failed"
          + (f" ({len(report.warnings)} warnings)" if report.warnings else ""))
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
