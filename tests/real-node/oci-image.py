#!/usr/bin/env python3
"""Writes a one-layer OCI image archive (an image layout in a tar, as `ctr images import` reads
it) from a root filesystem directory, with no registry and no daemon.

usage: oci-image.py ROOTFS OUT.tar NAME [--entrypoint JSON] [--cmd JSON] [--env K=V]...
                    [--workdir DIR] [--user UID]

NAME is the reference the image is imported as (e.g. shapeblock.test/git:2.39). The layer is
reproducible: owners root, times zero, entries sorted."""
import argparse
import gzip
import hashlib
import io
import json
import os
import tarfile

args = argparse.ArgumentParser()
args.add_argument("rootfs")
args.add_argument("out")
args.add_argument("name")
args.add_argument("--entrypoint")
args.add_argument("--cmd")
args.add_argument("--env", action="append", default=[])
args.add_argument("--workdir")
args.add_argument("--user")
a = args.parse_args()


def as_root(info):
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    return info


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


layer_tar = io.BytesIO()
with tarfile.open(fileobj=layer_tar, mode="w", format=tarfile.PAX_FORMAT) as tar:
    for entry in sorted(os.listdir(a.rootfs)):
        tar.add(os.path.join(a.rootfs, entry), arcname=entry, filter=as_root)
layer_tar = layer_tar.getvalue()
layer = gzip.compress(layer_tar, mtime=0)

config = {"Env": a.env or ["PATH=/usr/local/bin:/usr/bin:/bin"]}
for key, value in (("Entrypoint", a.entrypoint), ("Cmd", a.cmd)):
    if value:
        config[key] = json.loads(value)
if a.workdir:
    config["WorkingDir"] = a.workdir
if a.user:
    config["User"] = a.user
config = json.dumps({
    "architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z",
    "config": config,
    "rootfs": {"type": "layers", "diff_ids": [sha256(layer_tar)]},
}, sort_keys=True).encode()


def descriptor(media_type, data):
    return {"mediaType": media_type, "digest": sha256(data), "size": len(data)}


manifest = json.dumps({
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": descriptor("application/vnd.oci.image.config.v1+json", config),
    "layers": [descriptor("application/vnd.oci.image.layer.v1.tar+gzip", layer)],
}, sort_keys=True).encode()
entry = descriptor("application/vnd.oci.image.manifest.v1+json", manifest)
entry["annotations"] = {"io.containerd.image.name": a.name,
                        "org.opencontainers.image.ref.name": a.name}
entry["platform"] = {"architecture": "amd64", "os": "linux"}
index = json.dumps({"schemaVersion": 2, "manifests": [entry],
                    "mediaType": "application/vnd.oci.image.index.v1+json"}).encode()

with tarfile.open(a.out, "w") as out:
    def add(name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        out.addfile(info, io.BytesIO(data))
    add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    add("index.json", index)
    for blob in (config, manifest, layer):
        add("blobs/sha256/" + hashlib.sha256(blob).hexdigest(), blob)
print(f"{a.name}: {len(layer)} bytes")
