#!/usr/bin/env bash
# One real single-node cluster for the tests: etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kube-proxy, containerd + runc, the kubelet, an OCI registry (TLS, test CA) and
# a git daemon, all inside private network + mount namespaces held by one `sleep`, so no host
# interface, route, iptables rule, /run, /var/lib or /var/log entry is created.
#
#   node.sh run RUN_DIR BINS IMAGES   start, print `READY <holder pid>`, wait until stdin closes
#                                     (the test binary ended, however), then tear everything down
#   node.sh stop RUN_DIR              tear down what a run left (also done before every start)
#
# The host-global effects, all undone by the teardown: cgroups under /shapeblock-real-node in
# every hierarchy, and the kubelet's sysctls (vm.overcommit_memory, kernel.panic,
# kernel.panic_on_oops), restored from RUN_DIR/sysctl-before.txt. One node per machine at a
# time: the teardown kills whatever runs in those cgroups, so a lock serialises test binaries.
#
# Inside the namespaces: node address 10.250.0.1 (a veth pair), the apiserver on 127.0.0.1:6443
# and 10.250.0.1:6443, the registry on 10.250.0.1:5000, git on git://10.250.0.1/, pods on
# 10.88.0.0/16 behind the bridge `sbnode0`, Services on 10.96.0.0/16 through kube-proxy. Pod
# Security admission enforces `restricted` wherever a namespace does not choose a level.
set -uo pipefail
CGROUP=shapeblock-real-node
LOCK=/tmp/shapeblock-real-node.lock
NODE=real-node

log() { printf '[real-node] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

teardown() {
  local run=$1 holder="" netns=""
  [ -f "$run/pids/holder" ] && holder=$(cat "$run/pids/holder")
  if [ -n "$holder" ] && [ -e "/proc/$holder/ns/net" ]; then
    netns=$(readlink "/proc/$holder/ns/net")
  fi
  # The kubelet first (it would restart what is killed), then the daemons by pid file.
  for name in kubelet kube-proxy kube-scheduler kube-controller-manager git-daemon registry containerd; do
    [ -f "$run/pids/$name" ] && kill -9 "$(cat "$run/pids/$name")" 2>/dev/null
  done
  # Every container process (they live in the node's cgroups) and every process left in the
  # node's network namespace (containerd's shims, anything a test started there).
  for pass in 1 2 3; do
    find /sys/fs/cgroup/*/$CGROUP -name cgroup.procs 2>/dev/null |
      while read -r procs; do xargs -r kill -9 < "$procs" 2>/dev/null; done
    if [ -n "$netns" ]; then
      for ns in /proc/[0-9]*/ns/net; do
        pid=${ns#/proc/}; pid=${pid%%/*}
        [ "$pid" = "$holder" ] && continue
        [ "$(readlink "$ns" 2>/dev/null)" = "$netns" ] && kill -9 "$pid" 2>/dev/null
      done
    fi
    sleep 0.3
  done
  for name in kube-apiserver etcd; do
    [ -f "$run/pids/$name" ] && kill -9 "$(cat "$run/pids/$name")" 2>/dev/null
  done
  # The holder last: its mount namespace (overlays, container root filesystems, volumes, pod
  # network namespaces) and its network namespace (veth, bridge, iptables) go with it.
  [ -n "$holder" ] && kill -9 "$holder" 2>/dev/null
  # Mounts that leaked to the host's namespace under the run directory, deepest first.
  awk -v dir="$run/" 'index($2, dir) == 1 { print $2 }' /proc/self/mounts | sort -r |
    while read -r m; do umount -l "$m" 2>/dev/null; done
  # Cgroups, deepest first (a cgroup goes once its processes are gone).
  for i in 1 2 3 4 5; do
    left=$(find /sys/fs/cgroup/*/$CGROUP -depth -type d 2>/dev/null)
    [ -z "$left" ] && break
    echo "$left" | while read -r d; do rmdir "$d" 2>/dev/null; done
    sleep 0.3
  done
  [ -f "$run/sysctl-before.txt" ] && sysctl -q -p "$run/sysctl-before.txt" && rm -f "$run/sysctl-before.txt"
  rm -rf "$run/pids"
  left=$(find /sys/fs/cgroup/*/$CGROUP -maxdepth 0 2>/dev/null)
  [ -z "$left" ] || log "cgroups left behind: $left"
}

start() {
  local run=$1 bins=$2 images=$3
  for tool in containerd runc docker-registry iptables conntrack nsenter unshare openssl git ctr curl jq ip sysctl flock; do
    command -v "$tool" >/dev/null || die "$tool is missing (.ci/run installs the real node's packages)"
  done
  [ -x /usr/lib/cni/bridge ] || die "CNI plugins missing (Debian containernetworking-plugins)"
  for b in etcd kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubelet; do
    [ -x "$bins/$b" ] || die "$bins/$b missing: run tests/control-plane/build.sh"
  done
  [ -f "$images/done" ] || die "$images is not an image directory: run tests/real-node/build.sh"
  mkdir -p "$run"/{pids,logs,etcd,kubelet,registry,git,pki,cni,containerd/certs.d/10.250.0.1:5000,ns}
  sysctl vm.overcommit_memory kernel.panic kernel.panic_on_oops > "$run/sysctl-before.txt"
  pki "$run/pki"

  # The namespaces. /run, /var/lib and /var/log are overlaid inside, so the paths containerd
  # and the kubelet hard-code never reach the host's.
  for d in run var_lib var_log; do mkdir -p "$run/ns/$d/upper" "$run/ns/$d/work"; done
  setsid unshare --net --mount --propagation private sh -c "
    mount -t overlay sb-run -o lowerdir=/run,upperdir=$run/ns/run/upper,workdir=$run/ns/run/work /run &&
    mount -t overlay sb-varlib -o lowerdir=/var/lib,upperdir=$run/ns/var_lib/upper,workdir=$run/ns/var_lib/work /var/lib &&
    mount -t overlay sb-varlog -o lowerdir=/var/log,upperdir=$run/ns/var_log/upper,workdir=$run/ns/var_log/work /var/log &&
    exec sleep infinity" </dev/null >"$run/logs/holder.log" 2>&1 &
  echo $! > "$run/pids/holder"
  HOLDER=$!
  for _ in $(seq 100); do grep -q sb-varlog "/proc/$HOLDER/mounts" 2>/dev/null && break; sleep 0.05; done
  grep -q sb-varlog "/proc/$HOLDER/mounts" 2>/dev/null || die "namespaces not set up: $(cat "$run/logs/holder.log")"
  NS ip link set lo up
  NS ip link add sbnode0-host type veth peer name sbnode0-peer
  NS ip addr add 10.250.0.1/24 dev sbnode0-host
  NS ip link set sbnode0-host up
  NS ip link set sbnode0-peer up
  NS ip route add default via 10.250.0.2 dev sbnode0-host onlink

  for h in /sys/fs/cgroup/*/; do [ -f "$h/cgroup.procs" ] && mkdir -p "$h$CGROUP"; done
  local p=$run/pki
  # Pod Security admission enforcing `restricted` in every namespace that does not say
  # otherwise, as hardened clusters do: what the hub creates must either comply or label its
  # namespaces (Project namespaces ask for baseline, for the build pods).
  cat > "$run/admission.yaml" <<EOF
apiVersion: apiserver.config.k8s.io/v1
kind: AdmissionConfiguration
plugins:
- name: PodSecurity
  configuration:
    apiVersion: pod-security.admission.config.k8s.io/v1
    kind: PodSecurityConfiguration
    defaults: {enforce: restricted, enforce-version: latest, warn: restricted, warn-version: latest}
    exemptions: {namespaces: [kube-system]}
EOF
  bg etcd "$bins/etcd" --name=node --data-dir="$run/etcd" --listen-client-urls=http://127.0.0.1:2379 \
    --advertise-client-urls=http://127.0.0.1:2379 --listen-peer-urls=http://127.0.0.1:2380 \
    --initial-advertise-peer-urls=http://127.0.0.1:2380 --initial-cluster=node=http://127.0.0.1:2380 \
    --unsafe-no-fsync=true --log-level=warn
  wait_for etcd NS curl -sf http://127.0.0.1:2379/health
  bg kube-apiserver "$bins/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 --bind-address=0.0.0.0 \
    --advertise-address=10.250.0.1 --secure-port=6443 --cert-dir="$p" \
    --tls-cert-file="$p/apiserver.crt" --tls-private-key-file="$p/apiserver.key" --client-ca-file="$p/ca.crt" \
    --service-account-issuer=https://kubernetes.default.svc --service-account-key-file="$p/sa.pub" \
    --service-account-signing-key-file="$p/sa.key" --service-cluster-ip-range=10.96.0.0/16 \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction --allow-privileged=true \
    --admission-control-config-file="$run/admission.yaml" \
    --kubelet-client-certificate="$p/admin.crt" --kubelet-client-key="$p/admin.key" \
    --kubelet-certificate-authority="$p/ca.crt" --kubelet-preferred-address-types=InternalIP --profiling=false
  wait_for kube-apiserver api /readyz
  local kc=$p/admin.kubeconfig
  bg kube-controller-manager "$bins/kube-controller-manager" --kubeconfig="$kc" \
    --authentication-kubeconfig="$kc" --authorization-kubeconfig="$kc" --bind-address=127.0.0.1 \
    --secure-port=10257 --leader-elect=false --root-ca-file="$p/ca.crt" \
    --service-account-private-key-file="$p/sa.key" --use-service-account-credentials=true \
    --controllers='*,-nodeipam' --flex-volume-plugin-dir="$run/kcm-volume-plugins"
  bg kube-scheduler "$bins/kube-scheduler" --kubeconfig="$kc" --authentication-kubeconfig="$kc" \
    --authorization-kubeconfig="$kc" --bind-address=127.0.0.1 --secure-port=10259 --leader-elect=false
  bg kube-proxy "$bins/kube-proxy" --kubeconfig="$kc" --proxy-mode=iptables --hostname-override=$NODE \
    --cluster-cidr=10.88.0.0/16 --conntrack-max-per-core=0 --conntrack-tcp-timeout-established=0 \
    --conntrack-tcp-timeout-close-wait=0 --healthz-bind-address=127.0.0.1:10256 \
    --metrics-bind-address=127.0.0.1:10249

  # The registry, with TLS from the test CA the images trust.
  cat > "$run/registry.yml" <<EOF
version: 0.1
log: {level: warn}
storage:
  filesystem: {rootdirectory: $run/registry}
  delete: {enabled: true}
http:
  addr: 10.250.0.1:5000
  tls: {certificate: $images/registry.crt, key: $images/registry.key}
EOF
  bg registry docker-registry serve "$run/registry.yml"
  printf 'server = "https://10.250.0.1:5000"\n[host."https://10.250.0.1:5000"]\n  capabilities = ["pull", "resolve", "push"]\n  ca = "%s"\n' \
    "$images/ca.crt" > "$run/containerd/certs.d/10.250.0.1:5000/hosts.toml"
  bg git-daemon git daemon --export-all --enable=receive-pack --base-path="$run/git" \
    --listen=10.250.0.1 --port=9418 --reuseaddr "$run/git"

  cat > "$run/cni/10-sbnode.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "sbnode", "plugins": [
  {"type": "bridge", "bridge": "sbnode0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$run/cni/ipam", "ranges": [[{"subnet": "10.88.0.0/16"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}},
  {"type": "loopback"}]}
EOF
  cat > "$run/containerd.toml" <<EOF
version = 2
root = "$run/containerd/root"
state = "$run/containerd/state"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$run/containerd.sock"
[ttrpc]
  address = "$run/containerd.sock.ttrpc"
[debug]
  address = "$run/containerd-debug.sock"
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "shapeblock.test/pause:3.10"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # without CAP_SYS_RESOURCE (this kind of VM) runc cannot lower oom_score_adj
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$run/cni"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$run/containerd/certs.d"
EOF
  bg containerd containerd --config "$run/containerd.toml" --log-level warn
  wait_for containerd ctr --address "$run/containerd.sock" version
  # The images the Jobs run, straight into the kubelet's namespace (never pulled), and the
  # test apps' base images into the registry too (kaniko and the lifecycle pull from there).
  for tar in "$images"/*.tar; do
    ctr --address "$run/containerd.sock" -n k8s.io images import "$tar" >/dev/null ||
      die "importing $tar failed"
  done
  while read -r local remote; do
    NS ctr --address "$run/containerd.sock" -n k8s.io images tag "$local" "$remote" >/dev/null &&
      NS ctr --address "$run/containerd.sock" -n k8s.io images push --hosts-dir "$run/containerd/certs.d" \
        "$remote" >/dev/null || die "pushing $remote to the node's registry failed"
  done < "$images/registry-images.txt"

  cat > "$run/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /$CGROUP
failSwapOn: false
containerRuntimeEndpoint: unix://$run/containerd.sock
address: 10.250.0.1
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: $p/kubelet.crt
tlsPrivateKeyFile: $p/kubelet.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $p/ca.crt}
authorization: {mode: Webhook}
clusterDomain: cluster.local
clusterDNS: []
resolvConf: ""
staticPodPath: ""
volumePluginDir: $run/kubelet-volume-plugins
serializeImagePulls: false
evictionHard: {}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
enforceNodeAllocatable: ["pods"]
maxPods: 60
podPidsLimit: 4096
shutdownGracePeriod: 0s
EOF
  bg kubelet "$bins/kubelet" --config="$run/kubelet.yaml" --kubeconfig="$p/node.kubeconfig" \
    --root-dir="$run/kubelet" --cert-dir="$run/kubelet/pki" --hostname-override=$NODE --node-ip=10.250.0.1
  wait_for "node Ready" node_ready
  wait_for "kube-proxy" NS curl -sf http://127.0.0.1:10256/healthz
  echo "READY $HOLDER"
}

# A throw-away PKI: CA, apiserver, admin (system:masters), the node's client and serving
# certificates, the ServiceAccount signing key.
pki() {
  local d=$1
  (cd "$d" &&
    openssl ecparam -name prime256v1 -genkey -noout -out ca.key &&
    openssl req -x509 -new -key ca.key -subj /CN=real-node-ca -days 2 -out ca.crt \
      -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null &&
    issue apiserver /CN=kube-apiserver "subjectAltName=DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:127.0.0.1,IP:10.96.0.1,IP:10.250.0.1
extendedKeyUsage=serverAuth" &&
    issue admin "/O=system:masters/CN=admin" "extendedKeyUsage=clientAuth" &&
    issue node "/O=system:nodes/CN=system:node:$NODE" "extendedKeyUsage=clientAuth" &&
    issue kubelet "/CN=$NODE" "subjectAltName=DNS:$NODE,IP:10.250.0.1
extendedKeyUsage=serverAuth" &&
    openssl ecparam -name prime256v1 -genkey -noout -out sa.key &&
    openssl ec -in sa.key -pubout -out sa.pub 2>/dev/null &&
    kubeconfig admin && kubeconfig node) || die "creating the node's certificates failed"
}
issue() { # name subject extensions
  openssl ecparam -name prime256v1 -genkey -noout -out "$1.key"
  openssl req -new -key "$1.key" -subj "$2" -out "$1.csr" 2>/dev/null
  printf '%s\n' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile "$1.ext" \
    -out "$1.crt" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
kubeconfig() { # user
  cat > "$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: node, cluster: {server: "https://127.0.0.1:6443", certificate-authority: "$PWD/ca.crt"}}]
users: [{name: $1, user: {client-certificate: "$PWD/$1.crt", client-key: "$PWD/$1.key"}}]
contexts: [{name: node, context: {cluster: node, user: $1}}]
current-context: node
EOF
}

NS() { nsenter -t "$HOLDER" --net --mount -- "$@"; }
api() { # path: GET as admin inside the namespaces
  NS curl -sf --cacert "$RUN/pki/ca.crt" --cert "$RUN/pki/admin.crt" --key "$RUN/pki/admin.key" \
    "https://127.0.0.1:6443$1"
}
node_ready() {
  api /api/v1/nodes/$NODE | jq -e '.status.conditions[] | select(.type == "Ready" and .status == "True")'
}
bg() { # name command...: a daemon inside the namespaces, its output in logs/<name>.log
  local name=$1; shift
  setsid nsenter -t "$HOLDER" --net --mount -- "$@" </dev/null >>"$RUN/logs/$name.log" 2>&1 &
  echo $! > "$RUN/pids/$name"
}
wait_for() { # what command...: up to 120 s
  local what=$1; shift
  for _ in $(seq 240); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  die "$what not ready after 120 s; see $RUN/logs"
}

case ${1:-} in
  run)
    [ $# -eq 4 ] || die "usage: node.sh run RUN_DIR BINS IMAGES"
    RUN=$2
    trap '' INT TERM HUP PIPE
    exec 9>"$LOCK"
    flock -w 600 9 || die "another real node held $LOCK for 10 minutes"
    teardown "$RUN"
    (start "$RUN" "$3" "$4") || { teardown "$RUN"; exit 1; }
    HOLDER=$(cat "$RUN/pids/holder")
    cat >/dev/null   # until the test binary's end closes our stdin
    teardown "$RUN"
    log "stopped"
    ;;
  stop)
    [ $# -eq 2 ] || die "usage: node.sh stop RUN_DIR"
    exec 9>"$LOCK"; flock -w 60 9 || die "$LOCK is held"
    teardown "$2"
    ;;
  *) die "usage: node.sh run RUN_DIR BINS IMAGES | node.sh stop RUN_DIR" ;;
esac
