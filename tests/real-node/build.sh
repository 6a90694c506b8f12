#!/usr/bin/env bash
# Builds what the real node of tests/real_node.rs runs that the control plane build does not:
# the kaniko executor and the buildpacks lifecycle (from the Go module proxy) and the images the hub's Jobs and the test
# apps run, as OCI archives made here from Debian packages and the binaries built here, so no
# image is ever pulled. Also a test CA with a certificate for the node's registry, which the
# images trust. Everything goes to a cache outside the repository keyed by version and by the
# content of this directory's scripts.
#
# Needs the Debian packages .ci/run installs (containerd, runc, containernetworking-plugins,
# iptables, conntrack, busybox-static, docker-registry, git, openssh-client, gcc) and the
# control plane of tests/control-plane/build.sh (for helm).
#
# Prints the image directory on its last line of stdout. Progress goes to stderr.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
KANIKO_VERSION=${KANIKO_VERSION:-v1.24.0}
# v0.20.12: the newest lifecycle the proxy serves whose checksum database lookup answers
# (v0.20.19's says 404, and this script does not turn the check off).
LIFECYCLE_VERSION=${LIFECYCLE_VERSION:-v0.20.12}
CACHE_ROOT=${SHAPEBLOCK_TEST_BIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/shapeblock-test-bins}
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0

log() { printf '[real-node] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
for tool in busybox git ssh gcc openssl python3 containerd runc docker-registry; do
  command -v "$tool" >/dev/null || die "$tool is missing (.ci/run installs the real node's Debian packages)"
done

BINS=${SHAPEBLOCK_TEST_BINS:-$(bash "$here/../control-plane/build.sh" | tail -n 1)}
[ -x "$BINS/helm" ] && [ -x "$BINS/kubelet" ] && [ -x "$BINS/kube-proxy" ] ||
  die "$BINS lacks helm, kubelet or kube-proxy: run tests/control-plane/build.sh"

# One scratch directory for the Go builds below, removed however the script ends.
w=$(mktemp -d); trap 'rm -rf "$w"' EXIT
# The kaniko executor: the slow part (about two minutes), keyed by version only. The proxy
# serves upstream GoogleContainerTools/kaniko, not the osscontainertools fork the hub's default
# configuration names; the flags the hub renders are the same in both.
KANIKO="$CACHE_ROOT/kaniko-$KANIKO_VERSION"
if ! "$KANIKO/executor" version 2>/dev/null | grep -qF "$KANIKO_VERSION"; then
  log "building the kaniko executor $KANIKO_VERSION"
  mkdir -p "$KANIKO"
  (mkdir -p "$w/kaniko" && cd "$w/kaniko" && go mod init example.invalid/shapeblock-test-kaniko >/dev/null 2>&1 &&
    go get "github.com/GoogleContainerTools/kaniko@$KANIKO_VERSION" >&2 &&
    go build -trimpath -ldflags "-s -w -X github.com/GoogleContainerTools/kaniko/pkg/version.version=$KANIKO_VERSION" \
      -o "$KANIKO/executor.tmp" github.com/GoogleContainerTools/kaniko/cmd/executor >&2)
  mv "$KANIKO/executor.tmp" "$KANIKO/executor"
fi

# The buildpacks lifecycle (creator, launcher), for a test builder: no builder image or
# buildpack is on any registry this machine reaches.
LIFECYCLE="$CACHE_ROOT/lifecycle-$LIFECYCLE_VERSION"
if ! [ -x "$LIFECYCLE/lifecycle" ] || ! [ -x "$LIFECYCLE/launcher" ]; then
  log "building the buildpacks lifecycle $LIFECYCLE_VERSION"
  mkdir -p "$LIFECYCLE"
  (mkdir -p "$w/lifecycle" && cd "$w/lifecycle" && go mod init example.invalid/shapeblock-test-lifecycle >/dev/null 2>&1 &&
    go get "github.com/buildpacks/lifecycle@$LIFECYCLE_VERSION" >&2 &&
    for c in lifecycle launcher; do
      go build -trimpath -ldflags "-s -w -X github.com/buildpacks/lifecycle/cmd.Version=${LIFECYCLE_VERSION#v}" \
        -o "$LIFECYCLE/$c.tmp" "github.com/buildpacks/lifecycle/cmd/$c" >&2 || exit 1
    done)
  for c in lifecycle launcher; do mv "$LIFECYCLE/$c.tmp" "$LIFECYCLE/$c"; done
fi

key=$(cat "$here/build.sh" "$here/oci-image.py" | sha256sum | cut -c1-12)
OUT="$CACHE_ROOT/real-node-kaniko-$KANIKO_VERSION-lifecycle-$LIFECYCLE_VERSION-$key"
if [ -f "$OUT/done" ]; then
  log "images cached in $OUT"
  echo "$OUT"
  exit 0
fi
log "making the images in $OUT"
rm -rf "$OUT.tmp"; mkdir -p "$OUT.tmp"; cd "$OUT.tmp"

# A test CA and the registry's certificate (the node's address 10.250.0.1).
openssl ecparam -name prime256v1 -genkey -noout -out ca.key
openssl req -x509 -new -key ca.key -subj /CN=shapeblock-real-node-ca -days 3650 -out ca.crt \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
openssl ecparam -name prime256v1 -genkey -noout -out registry.key
openssl req -new -key registry.key -subj /CN=10.250.0.1 -out registry.csr 2>/dev/null
printf 'subjectAltName=IP:10.250.0.1,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > registry.ext
openssl x509 -req -in registry.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
  -extfile registry.ext -out registry.crt 2>/dev/null
rm -f registry.csr registry.ext ca.srl
cat /etc/ssl/certs/ca-certificates.crt ca.crt > ca-bundle.crt

# Copies a dynamic binary and the libraries it loads into a root filesystem.
with_libraries() { # rootfs binary...
  local root=$1; shift
  for b in "$@"; do
    mkdir -p "$root$(dirname "$b")"; cp -L "$b" "$root$b"
    ldd "$b" | awk '/=>/ { print $3 } /ld-linux/ { print $1 }'
  done | sort -u | while read -r lib; do mkdir -p "$root$(dirname "$lib")"; cp -L "$lib" "$root$lib"; done
}
image() { python3 "$here/oci-image.py" "$@" >&2; }

# busybox: the base of the test apps and of the tool images (a shell for git's helpers).
base=rootfs-busybox
mkdir -p $base/bin $base/etc $base/tmp $base/root $base/proc $base/sys $base/dev
chmod 1777 $base/tmp
cp "$(command -v busybox)" $base/bin/busybox
for applet in $($base/bin/busybox --list); do [ "$applet" = busybox ] || ln -sf busybox "$base/bin/$applet"; done
printf 'root:x:0:0:root:/root:/bin/sh\napp:x:10001:10001:app:/tmp:/bin/sh\n' > $base/etc/passwd
printf 'root:x:0:\napp:x:10001:\n' > $base/etc/group
image $base busybox.tar shapeblock.test/busybox:1 --cmd '["/bin/sh"]'
# The buildpack apps' run image: busybox with a non-root user (the lifecycle keeps the run
# image's user, and the app chart runs nothing as root), as builders' run images have.
image $base run.tar shapeblock.test/run:1 --user 1002:1000 --env CNB_USER_ID=1002 --env CNB_GROUP_ID=1000 \
  --env PATH=/usr/bin:/bin
# Images node.sh pushes to the node's registry (kaniko and the lifecycle pull from there).
printf 'shapeblock.test/busybox:1 10.250.0.1:5000/base/busybox:1\nshapeblock.test/run:1 10.250.0.1:5000/base/run:1\n' > registry-images.txt

# pause: the sandbox image (registry.k8s.io is out of reach).
cat > pause.c <<'C'
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
static void quit(int sig) { (void)sig; exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, NULL, WNOHANG) > 0) {} }
int main(void) {
  signal(SIGINT, quit); signal(SIGTERM, quit); signal(SIGCHLD, reap);
  for (;;) pause();
}
C
mkdir -p rootfs-pause; gcc -Os -static -o rootfs-pause/pause pause.c; strip rootfs-pause/pause
image rootfs-pause pause.tar shapeblock.test/pause:3.10 --entrypoint '["/pause"]'

# git: Debian's git with its HTTP helper and the ssh client, on busybox.
g=rootfs-git; cp -a $base $g
with_libraries $g "$(command -v git)" /usr/lib/git-core/git-remote-http "$(command -v ssh)"
ln -sf git-remote-http $g/usr/lib/git-core/git-remote-https
mkdir -p $g/etc/ssl/certs; cp ca-bundle.crt $g/etc/ssl/certs/ca-certificates.crt
image $g git.tar shapeblock.test/git:1 --env PATH=/usr/bin:/bin --env GIT_EXEC_PATH=/usr/lib/git-core

# kaniko: the executor laid out as kaniko's own image is (everything under /kaniko).
k=rootfs-kaniko; mkdir -p $k/kaniko/ssl/certs $k/kaniko/.docker $k/etc $k/tmp $k/root $k/workspace
chmod 1777 $k/tmp
cp "$KANIKO/executor" $k/kaniko/executor
cp ca-bundle.crt $k/kaniko/ssl/certs/ca-certificates.crt
printf 'hosts: files dns\n' > $k/etc/nsswitch.conf
image $k kaniko.tar "shapeblock.test/kaniko:$KANIKO_VERSION" --entrypoint '["/kaniko/executor"]' \
  --workdir /workspace --env HOME=/root --env USER=root --env PATH=/usr/local/bin:/kaniko \
  --env SSL_CERT_DIR=/kaniko/ssl/certs --env DOCKER_CONFIG=/kaniko/.docker/

# helm: the deploy Jobs' CLI (static), on busybox.
h=rootfs-helm; cp -a $base $h; mkdir -p $h/usr/bin $h/etc/ssl/certs
cp -L "$BINS/helm" $h/usr/bin/helm; cp ca-bundle.crt $h/etc/ssl/certs/ca-certificates.crt
image $h helm.tar shapeblock.test/helm:1 --env PATH=/usr/bin:/bin --entrypoint '["/usr/bin/helm"]'

# A test builder: the lifecycle, one buildpack (shell scripts on busybox) that serves the
# app's www/ directory and writes the build variable GREETING into it, and the busybox base as
# the run image. Its user is 1002:1000, as heroku/builder:24's, not the 1001 many assume.
b=rootfs-builder; cp -a $base $b
mkdir -p $b/cnb/lifecycle $b/cnb/buildpacks/shapeblock.test_static/0.0.1/bin $b/etc/ssl/certs $b/layers $b/workspace
cp "$LIFECYCLE/lifecycle" "$LIFECYCLE/launcher" $b/cnb/lifecycle/
for phase in detector analyzer restorer builder exporter rebaser creator extender; do
  ln -sf lifecycle "$b/cnb/lifecycle/$phase"
done
cp ca-bundle.crt $b/etc/ssl/certs/ca-certificates.crt
echo 'cnb:x:1002:1000:cnb:/home/cnb:/bin/sh' >> $b/etc/passwd; echo 'cnb:x:1000:' >> $b/etc/group
bp=$b/cnb/buildpacks/shapeblock.test_static/0.0.1
cat > $bp/buildpack.toml <<'TOML'
api = "0.10"
[buildpack]
id = "shapeblock.test/static"
version = "0.0.1"
name = "Static files (ShapeBlock tests)"
TOML
cat > $bp/bin/detect <<'SH'
#!/bin/sh
# Applies to any app with a www/ directory.
[ -d www ]
SH
cat > $bp/bin/build <<'SH'
#!/bin/sh
set -eu
# A build variable, as the platform hands it over: a file in $CNB_PLATFORM_DIR/env.
if [ -f "$CNB_PLATFORM_DIR/env/GREETING" ]; then
  cp "$CNB_PLATFORM_DIR/env/GREETING" www/greeting.txt
fi
echo "built by $(id -u):$(id -g)" > www/builder.txt
cat > "$CNB_LAYERS_DIR/launch.toml" <<'TOML'
[[processes]]
type = "web"
command = ["httpd", "-f", "-v", "-p", "8080", "-h", "www"]
default = true
TOML
SH
chmod +x $bp/bin/detect $bp/bin/build
printf '[[order]]\n[[order.group]]\nid = "shapeblock.test/static"\nversion = "0.0.1"\n' > $b/cnb/order.toml
printf '[[images]]\nimage = "10.250.0.1:5000/base/run:1"\n' > $b/cnb/run.toml
image $b builder.tar shapeblock.test/builder:1 --env PATH=/cnb/lifecycle:/usr/bin:/bin \
  --env CNB_USER_ID=1002 --env CNB_GROUP_ID=1000 --user 1002:1000 --workdir /workspace

rm -rf rootfs-* pause.c
touch done
cd /; rm -rf "$OUT"; mv "$OUT.tmp" "$OUT"
log "images in $OUT"
echo "$OUT"
