#!/usr/bin/env bash
# Builds the test control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
# kwok; kubelet and kube-proxy for the real node of tests/real-node; kubectl for tests/teams.rs)
# from the Go module proxy with the machine's Go, into a cache outside the repository keyed by
# version.
# A binary is rebuilt only when the cached one does not report the pinned version.
#
# Prints the cache directory on its last line of stdout. Progress goes to stderr.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.36.3}
ETCD_VERSION=${ETCD_VERSION:-v3.6.16}
KWOK_VERSION=${KWOK_VERSION:-v0.8.0}
HELM_VERSION=${HELM_VERSION:-v3.22.0}
CACHE_ROOT=${SHAPEBLOCK_TEST_BIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/shapeblock-test-bins}
BIN="$CACHE_ROOT/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION"
HELM_BIN="$CACHE_ROOT/helm-$HELM_VERSION"
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0

log() { printf '[control-plane] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
command -v go >/dev/null || die "Go is required (go1.26+) to build the test control plane"
mkdir -p "$BIN"

reports() { # binary, expected substring of its --version output
  [ -x "$1" ] && "$1" --version 2>/dev/null | grep -qF -- "$2"
}

kubectl_reports() { # kubectl has no --version; `version --client` says "Client Version: vX"
  # Read whole before matching: `grep -q` would stop reading after the first line and, under
  # pipefail, kubectl's SIGPIPE on the second would count as a mismatch (and a rebuild).
  local out
  [ -x "$BIN/kubectl" ] && out=$("$BIN/kubectl" version --client 2>/dev/null) &&
    grep -qxF -- "Client Version: $K8S_VERSION" <<<"$out"
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

build_kubernetes() {
  local need=()
  for c in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy; do
    reports "$BIN/$c" "Kubernetes $K8S_VERSION" || need+=("$c")
  done
  # kubectl for the tests of kubectl through the hub (tests/teams.rs).
  kubectl_reports || need+=(kubectl)
  [ ${#need[@]} -eq 0 ] && { log "kubernetes $K8S_VERSION cached"; return; }
  log "building ${need[*]} $K8S_VERSION (the first build takes a while)"
  local w="$work/k8s" gomod staging minor ldf
  mkdir -p "$w" && cd "$w"
  # k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with local
  # paths, which `go install pkg@version` refuses. A wrapper module replaces each one with its
  # published v0.N.M tag instead; the list comes from the go.mod the proxy serves.
  gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | jq -r .GoMod)
  [ -f "$gomod" ] || die "could not download k8s.io/kubernetes@$K8S_VERSION go.mod"
  go mod init example.invalid/shapeblock-test-k8s >/dev/null 2>&1
  go mod edit -go="$(sed -n 's/^go //p' "$gomod")"
  staging=v0.${K8S_VERSION#v1.}
  for m in $(sed -n 's|^[[:space:]]*\(k8s.io/[^ ]*\) => ./staging/src/k8s.io/.*|\1|p' "$gomod"); do
    go mod edit -replace="$m=$m@$staging"
  done
  go get "k8s.io/kubernetes@$K8S_VERSION" >&2
  minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  ldf="-s -w"
  for kv in "gitVersion=$K8S_VERSION" "gitMajor=1" "gitMinor=$minor" "gitTreeState=clean" \
            "gitCommit=module-proxy" "buildDate=1970-01-01T00:00:00Z"; do
    ldf="$ldf -X k8s.io/component-base/version.$kv -X k8s.io/client-go/pkg/version.$kv"
  done
  for c in "${need[@]}"; do
    log "go build $c"
    go build -trimpath -tags selinux,notest -ldflags "$ldf" -o "$BIN/$c.tmp" "k8s.io/kubernetes/cmd/$c" >&2
    mv "$BIN/$c.tmp" "$BIN/$c"
    if [ "$c" = kubectl ]; then
      kubectl_reports || die "kubectl does not report $K8S_VERSION"
    else
      reports "$BIN/$c" "Kubernetes $K8S_VERSION" || die "$c does not report $K8S_VERSION"
    fi
  done
}

build_etcd() {
  reports "$BIN/etcd" "etcd Version: ${ETCD_VERSION#v}" && { log "etcd $ETCD_VERSION cached"; return; }
  log "building etcd $ETCD_VERSION"
  local w="$work/etcd"
  mkdir -p "$w" && cd "$w"
  # etcd's server module replaces its sibling modules with local paths, so it too is built
  # from a wrapper module; its requires already name the published versions.
  go mod init example.invalid/shapeblock-test-etcd >/dev/null 2>&1
  go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >&2
  go build -trimpath -ldflags "-s -w" -o "$BIN/etcd.tmp" go.etcd.io/etcd/server/v3 >&2
  mv "$BIN/etcd.tmp" "$BIN/etcd"
  reports "$BIN/etcd" "etcd Version: ${ETCD_VERSION#v}" || die "etcd does not report $ETCD_VERSION"
}

build_kwok() {
  if reports "$BIN/kwok" "$KWOK_VERSION" && [ -s "$BIN/kwok-stages.yaml" ]; then
    log "kwok $KWOK_VERSION cached"; return
  fi
  log "building kwok $KWOK_VERSION"
  local w="$work/kwok" dir
  mkdir -p "$w" && cd "$w"
  go mod init example.invalid/shapeblock-test-kwok >/dev/null 2>&1
  go get "sigs.k8s.io/kwok@$KWOK_VERSION" >&2
  go build -trimpath -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" \
    -o "$BIN/kwok.tmp" sigs.k8s.io/kwok/cmd/kwok >&2
  mv "$BIN/kwok.tmp" "$BIN/kwok"
  # The stage definitions (node heartbeat, pod ready/complete/delete) ship inside the module.
  dir=$(go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | jq -r .Dir)/kustomize/stage
  {
    for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
             pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
      [ -f "$dir/$f" ] || die "kwok stage $f missing from the module"
      echo '---'; cat "$dir/$f"
    done
  } > "$BIN/kwok-stages.yaml"
  reports "$BIN/kwok" "$KWOK_VERSION" || die "kwok does not report $KWOK_VERSION"
}

build_helm() {
  mkdir -p "$HELM_BIN"
  helm_ok() { [ -x "$HELM_BIN/helm" ] && "$HELM_BIN/helm" version --short 2>/dev/null | grep -q "^$HELM_VERSION"; }
  helm_ok && { log "helm $HELM_VERSION cached"; return; }
  log "building helm $HELM_VERSION (for the chart checks)"
  local w="$work/helm"
  mkdir -p "$w" && cd "$w"
  go mod init example.invalid/shapeblock-test-helm >/dev/null 2>&1
  go get "helm.sh/helm/v3@$HELM_VERSION" >&2
  go build -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    -o "$HELM_BIN/helm.tmp" helm.sh/helm/v3/cmd/helm >&2
  mv "$HELM_BIN/helm.tmp" "$HELM_BIN/helm"
  helm_ok || die "helm does not report $HELM_VERSION"
}

build_etcd
build_kwok
build_kubernetes
build_helm
# The chart checks find helm here.
ln -sf "$HELM_BIN/helm" "$BIN/helm"
log "binaries in $BIN"
echo "$BIN"
