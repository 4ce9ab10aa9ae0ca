#!/usr/bin/env python3
"""The Python half of scripts/check-deploy.sh: checks the deployment files against schemas and
against the server's own sources, offline.

  check_deploy.py k8s OUT_DIR RENDERED.yaml...  Kubernetes objects (kustomize output)
  check_deploy.py compose                        docker/compose.yaml beyond its schema
  check_deploy.py monitoring RULES_OUT.yaml      Prometheus config and Grafana provisioning;
                                                 every PromQL expression of the dashboard
                                                 goes into RULES_OUT.yaml for `promtool check rules`

Metric names, label names and PHI_SERVE_* variables are read out of the Rust sources
(crates/server/src/metrics.rs, crates/phi-serve/src/*.rs), so renaming a metric or a flag
without updating the manifests fails. Prints nothing and exits 0 when all is well; otherwise
prints one line per problem and exits 1.
"""

import json
import re
import sys
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
METRICS_RS = ROOT / "crates/server/src/metrics.rs"
CLI_SOURCES = sorted((ROOT / "crates/phi-serve/src").glob("*.rs"))
SERVICEMONITOR_SCHEMA = ROOT / "scripts/deploy-schemas/servicemonitor-monitoring.coreos.com-v1.json"

# The Kubernetes versions the manifests must be valid for: the oldest that the manifests
# support and the newest that kubernetes-validate knows.
K8S_VERSIONS = ["1.29", "1.37"]
# Labels Prometheus adds to a target's series (compose: job, instance, service; the Prometheus
# Operator: job, instance, namespace, pod, service, container, endpoint).
TARGET_LABELS = {"job", "instance", "service", "namespace", "pod", "container", "endpoint"}
# Environment variables the image reads besides the PHI_SERVE_* ones.
OTHER_ENV = {"HF_HOME", "RUST_LOG", "HF_TOKEN"}
MIN_STARTUP_SECS = 30 * 60  # a first start downloads gigabytes
UID = 10001  # the image's user

errors = []


def fail(where, msg):
    errors.append(f"{where}: {msg}")


def finish():
    for e in errors:
        print(f"check-deploy: {e}", file=sys.stderr)
    sys.exit(1 if errors else 0)


def rel(p):
    return str(Path(p).resolve().relative_to(ROOT))


def load_yaml(path):
    try:
        return yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        fail(rel(path), f"not readable YAML: {e}")
        return None


# --- What the sources define -----------------------------------------------------------------


def skip_string(src, i):
    """Index just past the Rust string literal that starts at src[i] == '"'."""
    i += 1
    while src[i] != '"':
        i += 2 if src[i] == "\\" else 1
    return i + 1


def bracket_block(src, start):
    """The text from the '[' at src[start] to its matching ']', strings skipped."""
    depth, i = 0, start
    while i < len(src):
        c = src[i]
        if c == '"':
            i = skip_string(src, i)
            continue
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
            if depth == 0:
                return src[start : i + 1]
        i += 1
    raise ValueError("unbalanced [")


def exported_metrics():
    """(series names, label names) that GET /metrics can expose, from metrics.rs."""
    src = METRICS_RS.read_text().split("#[cfg(test)]")[0]
    histograms = set(re.findall(r'\.render\(\s*&mut out,\s*"(phi_serve_\w+)"', src))
    names = set(re.findall(r'"(phi_serve_\w+)"', src))
    names |= set(re.findall(r"# TYPE (phi_serve_\w+) ", src))
    names |= set(re.findall(r"(phi_serve_\w+)\{\{", src))
    # Names built in a loop: `for (name, ..) in [("hits_total", ..), ..]` or
    # `for (name, ..) in gauges` over `let gauges = [..]`, then format!("phi_serve_..{name}").
    for m in re.finditer(r'format!\("(phi_serve_\w*)\{name\}"\)', src):
        head = list(re.finditer(r"for \(name\b[^)]*\) in (\[|\w+)", src[: m.start()]))
        if not head:
            fail(rel(METRICS_RS), f"cannot find the loop that builds {m.group(1)}*")
            continue
        h = head[-1]
        if h.group(1) == "[":
            block = bracket_block(src, h.end() - 1)
        else:
            let = list(re.finditer(rf"let {h.group(1)}\s*=\s*\[", src[: h.start()]))
            if not let:
                fail(rel(METRICS_RS), f"cannot find `let {h.group(1)} = [`")
                continue
            block = bracket_block(src, let[-1].end() - 1)
        for first in re.findall(r'\(\s*"([a-z0-9_]+)"\s*,', block):
            names.add(m.group(1) + first)
    names = {n for n in names if n not in histograms}
    for h in histograms:
        names |= {f"{h}_bucket", f"{h}_sum", f"{h}_count"}
    labels = set(re.findall(r'([a-z_]+)=\\"', src))
    # A sanity floor: a rewrite of metrics.rs that this parser misses must not pass silently.
    if len(names) < 20 or not histograms or "le" not in labels:
        fail(rel(METRICS_RS), f"parsed only {sorted(names)}; update exported_metrics()")
    return names, labels


def cli_env():
    """The PHI_SERVE_* variables of the command line, and the default shutdown grace."""
    env, grace = set(), None
    for f in CLI_SOURCES:
        src = f.read_text().split("#[cfg(test)]")[0]
        env |= set(re.findall(r'"(PHI_SERVE_[A-Z0-9_]+)"', src))
        g = re.search(r'env = "PHI_SERVE_SHUTDOWN_GRACE_SECS", default_value_t = (\d+)', src)
        if g:
            grace = int(g.group(1))
    if len(env) < 10 or "PHI_SERVE_API_KEYS" not in env or grace is None:
        fail("crates/phi-serve/src", "cannot read the PHI_SERVE_* variables; update cli_env()")
    return env, grace or 30


# --- Kubernetes -------------------------------------------------------------------------------


def validate_k8s_schema(where, doc, sm_validator):
    """Validates one object; False if it is not valid."""
    from kubernetes_validate import utils as kv

    before = len(errors)

    if doc.get("apiVersion") == "monitoring.coreos.com/v1":
        for e in sorted(sm_validator.iter_errors(doc), key=lambda e: list(e.path)):
            path = ".".join(str(p) for p in e.absolute_path)
            fail(where, f"{path}: {e.message}")
        return len(errors) == before
    for version in K8S_VERSIONS:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            fail(where, f"not valid on Kubernetes {version}: {path}: {e.message}")
            break
        except kv.SchemaNotFoundError as e:
            fail(where, e.message)
    return len(errors) == before


def labels_match(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_deployment(where, objs, known_env, default_grace, overlay):
    deps = objs.get("Deployment", [])
    if len(deps) != 1:
        fail(where, f"expected one Deployment, found {len(deps)}")
        return
    dep = deps[0]
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    pod_labels = spec["template"]["metadata"].get("labels", {})
    w = f"{where}: Deployment/{dep['metadata']['name']}"
    if not labels_match(spec["selector"].get("matchLabels"), pod_labels):
        fail(w, "selector does not match the pod template's labels")
    if pod.get("enableServiceLinks") is not False:
        fail(w, "enableServiceLinks must be false (a Service named phi-serve injects PHI_SERVE_PORT=tcp://...)")
    psc = pod.get("securityContext", {})
    if psc.get("runAsNonRoot") is not True or psc.get("runAsUser") != UID or psc.get("fsGroup") != UID:
        fail(w, f"pod securityContext must set runAsNonRoot, runAsUser {UID} and fsGroup {UID}")
    containers = {c["name"]: c for c in pod["containers"]}
    c = containers.get("phi-serve")
    if c is None:
        fail(w, "no container named phi-serve")
        return
    csc = c.get("securityContext", {})
    if csc.get("readOnlyRootFilesystem") is not True or csc.get("allowPrivilegeEscalation") is not False:
        fail(w, "container securityContext must set readOnlyRootFilesystem and not allowPrivilegeEscalation")

    env = {e["name"]: e for e in c.get("env", [])}
    for name in env:
        if name.startswith("PHI_SERVE_") and name not in known_env:
            fail(w, f"env {name} is not a variable phi-serve reads")
        elif not name.startswith("PHI_SERVE_") and name not in OTHER_ENV:
            fail(w, f"env {name} is not a variable the image uses")
    keys = env.get("PHI_SERVE_API_KEYS", {}).get("valueFrom", {}).get("secretKeyRef")
    if not keys:
        fail(w, "PHI_SERVE_API_KEYS must come from a Secret (valueFrom.secretKeyRef)")
    if "value" in env.get("PHI_SERVE_API_KEYS", {}):
        fail(w, "PHI_SERVE_API_KEYS must not be written in the manifest")
    if env.get("PHI_SERVE_HOST", {}).get("value") not in (None, "0.0.0.0", "::"):
        fail(w, "PHI_SERVE_HOST must listen on all addresses")
    port = int(env.get("PHI_SERVE_PORT", {}).get("value", 8080))

    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    if ports.get("http") != port:
        fail(w, f"container port `http` must be {port}, the server's PHI_SERVE_PORT")
    probes = {k: c.get(k) for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    want = {"startupProbe": "/health", "livenessProbe": "/health", "readinessProbe": "/ready"}
    for k, path in want.items():
        p = probes[k]
        got = (p or {}).get("httpGet", {})
        if got.get("path") != path or got.get("port") not in ("http", port):
            fail(w, f"{k} must GET {path} on port http")
    sp = probes["startupProbe"] or {}
    startup = sp.get("failureThreshold", 3) * sp.get("periodSeconds", 10)
    if startup < MIN_STARTUP_SECS:
        fail(w, f"startupProbe allows {startup} s, less than the {MIN_STARTUP_SECS} s a first download may take")

    grace = int(env.get("PHI_SERVE_SHUTDOWN_GRACE_SECS", {}).get("value", default_grace))
    cmd = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    sleep = int(cmd[-1]) if len(cmd) >= 2 and cmd[0].endswith("sleep") and cmd[-1].isdigit() else None
    if sleep is None:
        fail(w, "preStop must be `sleep N`, so the Service stops routing before SIGTERM")
        sleep = 0
    tgp = pod.get("terminationGracePeriodSeconds", 30)
    if tgp <= sleep + grace:
        fail(w, f"terminationGracePeriodSeconds {tgp} must exceed preStop {sleep} s + shutdown grace {grace} s")

    pvcs = {p["metadata"]["name"] for p in objs.get("PersistentVolumeClaim", [])}
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    data = vols.get(mounts.get("/data"), {}).get("persistentVolumeClaim", {}).get("claimName")
    if data not in pvcs:
        fail(w, f"/data must be mounted from one of the rendered PVCs {sorted(pvcs)}, not {data}")
    if env.get("HF_HOME", {}).get("value", "/data/huggingface").split("/")[1:2] != ["data"]:
        fail(w, "HF_HOME must be on the /data volume")

    image = c["image"]
    limits = c.get("resources", {}).get("limits", {})
    device = env.get("PHI_SERVE_DEVICE", {}).get("value")
    if overlay == "cuda":
        if not image.endswith(":cuda") or str(limits.get("nvidia.com/gpu")) != "1" or device != "cuda":
            fail(w, "the cuda overlay needs image :cuda, limits nvidia.com/gpu 1 and PHI_SERVE_DEVICE=cuda")
        if not pod.get("tolerations") or not pod.get("nodeSelector"):
            fail(w, "the cuda overlay needs a nodeSelector and tolerations for GPU nodes")
    elif overlay == "cpu":
        if not image.endswith(":cpu") or "nvidia.com/gpu" in limits:
            fail(w, "the cpu overlay needs image :cpu and no GPU")
    if overlay in ("cpu", "cuda") and "PHI_SERVE_KV_CACHE_TOKENS" not in env:
        fail(w, "set PHI_SERVE_KV_CACHE_TOKENS: the default budget ignores the container's limits")

    # The other objects must point at this Deployment and its port.
    for svc in objs.get("Service", []):
        sw = f"{where}: Service/{svc['metadata']['name']}"
        if not labels_match(svc["spec"].get("selector"), pod_labels):
            fail(sw, "selector does not match the pods")
        for p in svc["spec"]["ports"]:
            if p.get("targetPort") not in ("http", port):
                fail(sw, f"port {p.get('name')} must target the container's port http")
        if not any(p.get("name") == "http" for p in svc["spec"]["ports"]):
            fail(sw, "needs a port named http (the ServiceMonitor scrapes it)")
    for sm in objs.get("ServiceMonitor", []):
        mw = f"{where}: ServiceMonitor/{sm['metadata']['name']}"
        sel = sm["spec"]["selector"].get("matchLabels", {})
        svcs = [s for s in objs.get("Service", []) if labels_match(sel, s["metadata"].get("labels", {}))]
        if not svcs:
            fail(mw, "selects no rendered Service")
        for ep in sm["spec"]["endpoints"]:
            if ep.get("path", "/metrics") != "/metrics":
                fail(mw, "must scrape /metrics")
            if svcs and ep.get("port") not in {p.get("name") for p in svcs[0]["spec"]["ports"]}:
                fail(mw, f"port {ep.get('port')} is not a port name of the Service")
    for hpa in objs.get("HorizontalPodAutoscaler", []):
        ref = hpa["spec"]["scaleTargetRef"]
        if (ref.get("kind"), ref.get("name")) != ("Deployment", dep["metadata"]["name"]):
            fail(f"{where}: HorizontalPodAutoscaler", "scaleTargetRef is not the Deployment")
        if any(m.get("type") == "Resource" for m in hpa["spec"].get("metrics", [])):
            if "cpu" not in c.get("resources", {}).get("requests", {}) and overlay:
                fail(f"{where}: HorizontalPodAutoscaler", "CPU utilisation needs a CPU request")
    for pdb in objs.get("PodDisruptionBudget", []):
        if not labels_match(pdb["spec"]["selector"].get("matchLabels"), pod_labels):
            fail(f"{where}: PodDisruptionBudget", "selector does not match the pods")
    if "Secret" in objs:
        fail(where, "renders a Secret: API keys belong outside the committed manifests")


def cmd_k8s(out_dir, files):
    names, _ = exported_metrics()
    known_env, default_grace = cli_env()
    schema = json.loads(SERVICEMONITOR_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    sm_validator = jsonschema.Draft202012Validator(schema)
    for f in files:
        overlay = Path(f).stem  # base, cpu or cuda
        where = f"render of {overlay}"
        try:
            docs = [d for d in yaml.safe_load_all(Path(f).read_text()) if d]
        except yaml.YAMLError as e:
            fail(where, f"not YAML: {e}")
            continue
        objs, valid = {}, True
        for d in docs:
            kind, name = d.get("kind"), d.get("metadata", {}).get("name")
            objs.setdefault(kind, []).append(d)
            valid &= validate_k8s_schema(f"{where}: {kind}/{name}", d, sm_validator)
        # JSON for the upstream CRD validator (node), which reads no YAML.
        (Path(out_dir) / f"{overlay}.json").write_text(json.dumps(docs))
        if not valid:
            continue  # the checks below assume the schema's types
        for kind in ("Deployment", "Service", "PersistentVolumeClaim", "HorizontalPodAutoscaler",
                     "PodDisruptionBudget", "ServiceMonitor"):
            if kind not in objs:
                fail(where, f"renders no {kind}")
        if "Deployment" in objs:
            try:
                check_deployment(where, objs, known_env, default_grace, overlay if overlay != "base" else None)
            except (KeyError, TypeError, ValueError, IndexError) as e:
                fail(where, f"unexpected structure ({type(e).__name__}: {e}); update check_deployment()")
    # Metric names in the manifests' comments too (the HPA's custom-metric example).
    for f in sorted((DOCKER / "k8s").rglob("*.yaml")):
        for m in sorted(set(re.findall(r"\bphi_serve_[a-z0-9_]+", f.read_text()))):
            if m not in names:
                fail(rel(f), f"names metric {m}, which the server does not export")
    finish()


# --- Docker Compose ---------------------------------------------------------------------------


def duration_secs(s):
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?", str(s))
    if not m or not any(m.groups()):
        return None
    h, mi, sec = (int(x or 0) for x in m.groups())
    return h * 3600 + mi * 60 + sec


def cmd_compose():
    known_env, default_grace = cli_env()
    path = DOCKER / "compose.yaml"
    doc = load_yaml(path)
    if not isinstance(doc, dict):
        return finish()
    services = doc.get("services", {})
    declared = set((doc.get("volumes") or {}).keys())
    for want in ("phi-serve", "phi-serve-cuda", "prometheus", "grafana"):
        if want not in services:
            fail(rel(path), f"no service {want}")
    for name, svc in services.items():
        w = f"{rel(path)}: service {name}"
        image = svc.get("image", "")
        if ":" not in image or image.endswith(":latest"):
            fail(w, f"image {image!r} needs a fixed tag")
        build = svc.get("build")
        if isinstance(build, dict):
            ctx = (path.parent / build.get("context", ".")).resolve()
            if not ctx.is_dir():
                fail(w, f"build context {build.get('context')} does not exist")
            df = ctx / build.get("dockerfile", "Dockerfile")
            if not df.is_file():
                fail(w, f"Dockerfile {rel(df) if df.is_relative_to(ROOT) else df} does not exist")
        for v in svc.get("volumes", []):
            src = v.split(":")[0] if isinstance(v, str) else v.get("source")
            if src.startswith((".", "/")):
                if not (path.parent / src).exists():
                    fail(w, f"bind-mount source {src} does not exist")
            elif src not in declared:
                fail(w, f"named volume {src} is not declared under volumes:")
        env = svc.get("environment", {})
        if isinstance(env, list):
            env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
        if name.startswith("phi-serve"):
            for k in env:
                if k.startswith("PHI_SERVE_") and k not in known_env:
                    fail(w, f"environment {k} is not a variable phi-serve reads")
            if "${PHI_SERVE_API_KEYS" not in str(env.get("PHI_SERVE_API_KEYS", "")):
                fail(w, "PHI_SERVE_API_KEYS must come from the environment or .env, not the file")
            grace = int(env.get("PHI_SERVE_SHUTDOWN_GRACE_SECS", default_grace))
            stop = duration_secs(svc.get("stop_grace_period", "10s"))
            if stop is None or stop <= grace:
                fail(w, f"stop_grace_period {svc.get('stop_grace_period')} must exceed the shutdown grace {grace} s")
            if not any(str(p).endswith(":8080") for p in svc.get("ports", [])):
                fail(w, "must publish the container's port 8080")
            if "healthcheck" in svc:
                fail(w, "keeps the image's health check; do not override it here")
    cuda = services.get("phi-serve-cuda", {})
    devices = cuda.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if cuda and (cuda.get("profiles") != ["cuda"] or not any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)):
        fail(f"{rel(path)}: service phi-serve-cuda", "needs profile cuda and an nvidia gpu device reservation")
    if services.get("grafana", {}).get("profiles") != ["grafana"]:
        fail(f"{rel(path)}: service grafana", "must be under the grafana profile")
    finish()


# --- Prometheus and Grafana -------------------------------------------------------------------

PROMQL_FUNCTIONS = {
    # aggregations
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
    "topk", "quantile", "limitk", "limit_ratio",
    # functions
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "day_of_month", "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp",
    "floor", "histogram_avg", "histogram_count", "histogram_fraction", "histogram_quantile",
    "histogram_stddev", "histogram_stdvar", "histogram_sum", "holt_winters", "hour", "idelta",
    "increase", "irate", "label_join", "label_replace", "ln", "log2", "log10", "minute", "month",
    "predict_linear", "rate", "resets", "round", "scalar", "sgn", "sort", "sort_desc", "sqrt",
    "time", "timestamp", "vector", "year", "avg_over_time", "min_over_time", "max_over_time",
    "sum_over_time", "count_over_time", "quantile_over_time", "stddev_over_time",
    "stdvar_over_time", "last_over_time", "present_over_time",
    # Grafana's template functions
    "label_values", "label_names", "metrics", "query_result",
}
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "Inf", "NaN"}
GROUPING = r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"


def promql_parts(expr):
    """(metric names, label names, unknown functions) of a PromQL expression."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    labels = []
    # Grafana's label_values(metric, label): its last argument is a label.
    for m in re.finditer(r"\blabel_values\(([^()]*),\s*(\w+)\s*\)", s):
        labels.append(m.group(2))
    s = re.sub(r"\blabel_values\(([^()]*),\s*\w+\s*\)", r"label_values(\1)", s)
    for m in re.finditer(r"\{([^}]*)\}", s):
        labels += re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", m.group(1))
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    for m in re.finditer(GROUPING, s):
        labels += [x.strip() for x in m.group(2).split(",") if x.strip()]
    s = re.sub(GROUPING, " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)
    s = re.sub(r"\b\d+(\.\d+)?([eE][-+]?\d+)?\b", " ", s)
    metrics, unknown = [], []
    for m in re.finditer(r"[A-Za-z_:][\w:]*", s):
        tok = m.group(0)
        if s[m.end() :].lstrip().startswith("("):
            if tok not in PROMQL_FUNCTIONS:
                unknown.append(tok)
        elif tok not in PROMQL_KEYWORDS:
            metrics.append(tok)
    return metrics, labels, unknown


def grafana_exprs(dash):
    """(where, PromQL, recording-rule name or None) of every panel target and query variable."""
    out = []

    def panels(ps):
        for p in ps:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dash.get("panels", [])):
        for t in p.get("targets", []):
            where = f"panel {p.get('id')} {p.get('title')!r} target {t.get('refId')}"
            out.append((where, t.get("expr"), f"dashboard:panel_{p.get('id')}_{t.get('refId')}"))
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v.get("query")
            out.append((f"variable {v.get('name')}", q.get("query") if isinstance(q, dict) else q, None))
    return out


def for_promtool(expr):
    """A Grafana query as plain PromQL: its variables replaced by what they stand for."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m").replace("$__range", "1h")
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def cmd_monitoring(rules_out):
    names, metric_labels = exported_metrics()
    compose = load_yaml(DOCKER / "compose.yaml") or {}
    services = compose.get("services", {})

    # Prometheus: the compose services it scrapes, on the server's port and path.
    ppath = DOCKER / "prometheus/prometheus.yml"
    prom = load_yaml(ppath)
    if isinstance(prom, dict):
        jobs = {j.get("job_name"): j for j in prom.get("scrape_configs", [])}
        job = jobs.get("phi-serve")
        if not job:
            fail(rel(ppath), "no scrape job phi-serve")
        else:
            if job.get("metrics_path", "/metrics") != "/metrics":
                fail(rel(ppath), "job phi-serve must scrape /metrics")
            interval = duration_secs(job.get("scrape_interval", prom.get("global", {}).get("scrape_interval", "1m")))
            if interval != 5:
                fail(rel(ppath), f"job phi-serve scrapes every {interval} s, not 5 s")
            targets = []
            for sd in job.get("dns_sd_configs", []):
                targets += [(n, sd.get("port")) for n in sd.get("names", [])]
            for sc in job.get("static_configs", []):
                targets += [tuple(t.rsplit(":", 1)) for t in sc.get("targets", [])]
            for host, port in targets:
                if host not in services or str(port) != "8080":
                    fail(rel(ppath), f"target {host}:{port} is not a compose service on port 8080")
            if not any(h == "phi-serve" for h, _ in targets):
                fail(rel(ppath), "does not scrape phi-serve")
        mounts = services.get("prometheus", {}).get("volumes", [])
        if "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" not in mounts:
            fail("docker/compose.yaml", "prometheus must mount ./prometheus/prometheus.yml at /etc/prometheus/prometheus.yml")

    # Grafana provisioning: a Prometheus datasource at the compose service, the dashboards folder.
    gmounts = {}
    for v in services.get("grafana", {}).get("volumes", []):
        parts = v.split(":")
        gmounts[parts[1]] = parts[0]
    if gmounts.get("/etc/grafana/provisioning") != "./grafana/provisioning":
        fail("docker/compose.yaml", "grafana must mount ./grafana/provisioning at /etc/grafana/provisioning")
    ds_uids = set()
    for f in sorted((DOCKER / "grafana/provisioning/datasources").glob("*.y*ml")):
        d = load_yaml(f) or {}
        if d.get("apiVersion") != 1 or not d.get("datasources"):
            fail(rel(f), "needs apiVersion: 1 and datasources")
        for ds in d.get("datasources", []):
            ds_uids.add(ds.get("uid"))
            if ds.get("type") != "prometheus" or ds.get("url") != "http://prometheus:9090":
                fail(rel(f), "the datasource must be type prometheus at http://prometheus:9090")
    dash_dirs = []
    for f in sorted((DOCKER / "grafana/provisioning/dashboards").glob("*.y*ml")):
        d = load_yaml(f) or {}
        if d.get("apiVersion") != 1 or not d.get("providers"):
            fail(rel(f), "needs apiVersion: 1 and providers")
        for p in d.get("providers", []):
            path = p.get("options", {}).get("path")
            src = gmounts.get(path)
            if p.get("type") != "file" or not src or not (DOCKER / src).is_dir():
                fail(rel(f), f"provider {p.get('name')} reads {path}, which compose does not mount from this repo")
            else:
                dash_dirs.append(DOCKER / src)
    if not ds_uids or not dash_dirs:
        fail("docker/grafana/provisioning", "needs a datasource and a dashboard provider")

    rules = []
    dashboards = sorted({f for d in dash_dirs for f in d.glob("*.json")})
    if not dashboards:
        fail("docker/grafana/dashboards", "no dashboard")
    for f in dashboards:
        w = rel(f)
        try:
            dash = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            fail(w, f"not JSON: {e}")
            continue
        for k in ("uid", "title", "panels", "schemaVersion"):
            if k not in dash:
                fail(w, f"has no {k}")
        variables = {v.get("name") for v in dash.get("templating", {}).get("list", [])}
        ids = [p.get("id") for p in dash.get("panels", [])]
        if len(ids) != len(set(ids)) or None in ids:
            fail(w, "panel ids must be present and unique")
        for p in dash.get("panels", []):
            pw = f"{w}: panel {p.get('id')} {p.get('title')!r}"
            if not {"x", "y", "w", "h"} <= set(p.get("gridPos", {})):
                fail(pw, "gridPos needs x, y, w and h")
            refs = [t.get("refId") for t in p.get("targets", [])]
            if len(refs) != len(set(refs)) or not refs:
                fail(pw, "targets need unique refIds")
            for ds in [p.get("datasource")] + [t.get("datasource") for t in p.get("targets", [])]:
                uid = (ds or {}).get("uid", "")
                var = re.fullmatch(r"\$\{?(\w+)\}?", uid)
                if (ds or {}).get("type") != "prometheus" or not (uid in ds_uids or (var and var.group(1) in variables)):
                    fail(pw, f"datasource {ds} is neither the provisioned one nor a dashboard variable")
        exprs = grafana_exprs(dash)
        if not exprs:
            fail(w, "has no PromQL")
        for where, expr, record in exprs:
            ew = f"{w}: {where}"
            if not expr:
                fail(ew, "has no expression")
                continue
            metrics, labels, unknown = promql_parts(expr)
            if not metrics:
                fail(ew, "names no metric")
            for m in metrics:
                if m not in names:
                    fail(ew, f"metric {m} is not exported by the server (crates/server/src/metrics.rs)")
            for l in labels:
                if l not in metric_labels | TARGET_LABELS:
                    fail(ew, f"label {l} is neither the server's {sorted(metric_labels)} nor a target label")
            for u in unknown:
                fail(ew, f"{u}() is not a PromQL function")
            if record:  # Grafana's label_values() is no PromQL
                rules.append({"record": re.sub(r"[^\w:]", "_", record), "expr": for_promtool(expr)})
    Path(rules_out).write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    finish()


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "k8s":
        cmd_k8s(sys.argv[2], sys.argv[3:])
    elif sys.argv[1:] == ["compose"]:
        cmd_compose()
    elif len(sys.argv) == 3 and sys.argv[1] == "monitoring":
        cmd_monitoring(sys.argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
