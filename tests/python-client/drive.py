"""Drives the hub as the ShapeBlock server (FastAPI) would, through the Python client that
openapi-python-client generated from openapi.json: register a cluster, then a project, an
app, a build, its status and logs, a rollback. Run by tests/python_client.rs, which plays the
cluster (it starts the agent once this script prints REGISTERED, and finishes the build's
pods). Any failure raises, and the script exits non-zero with the reason."""

import sys
import time

from sbhub import AuthenticatedClient
from sbhub.api.clusters import cluster_status, register_cluster
from sbhub.api.resources import (
    app_logs,
    build_logs,
    create_app,
    create_appbuild,
    create_project,
    get_app,
    get_appbuild,
    get_project,
    list_projects,
    rollback_app,
)
from sbhub.models import (
    ApiError,
    App,
    AppBuild,
    AppBuildSpec,
    AppSpec,
    AppSpecBuild,
    AppSpecGitType0,
    AppSpecRegistry,
    BuildType,
    ClusterWithToken,
    ConnectionState,
    IoK8SApimachineryPkgApisMetaV1ObjectMeta as ObjectMeta,
    Project,
    ProjectList,
    ProjectSpec,
    RegisterCluster,
    Rollback,
)

url, token, ca_file, namespace = sys.argv[1:5]
client = AuthenticatedClient(base_url=url, token=token, verify_ssl=ca_file, timeout=30.0)


def wait(what, check, timeout=120.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.2)


def expect(value, kind):
    if not isinstance(value, kind):
        raise AssertionError(f"expected a {kind.__name__}, got {value!r}")
    return value


registered = expect(
    register_cluster.sync(client=client, body=RegisterCluster(name="python-client")),
    ClusterWithToken,
)
cluster = registered.cluster.id
assert "kind: Deployment" in registered.manifest
print(f"REGISTERED {cluster} {registered.token}", flush=True)


def connected():
    state = cluster_status.sync(cluster, client=client)
    return isinstance(state, ConnectionState) and state.connected


wait("the agent connected", connected)
# The hub installs the CRDs once the agent connects: resources are served after that.
wait(
    "the ShapeBlock kinds served",
    lambda: isinstance(list_projects.sync(cluster, client=client), ProjectList),
)

project = Project(metadata=ObjectMeta(name=namespace), spec=ProjectSpec(display_name="Python"))
expect(create_project.sync(cluster, client=client, body=project), Project)


def project_phase():
    found = expect(get_project.sync(cluster, namespace, client=client), Project)
    return found.status and found.status.phase == "Active"


wait("the project Active", project_phase)

app = App(
    metadata=ObjectMeta(name="web"),
    spec=AppSpec(
        display_name="Web",
        git=AppSpecGitType0(url="https://github.com/org/web.git"),
        registry=AppSpecRegistry(url="registry.example.com"),
        build=AppSpecBuild(type_=BuildType.DOCKERFILE),
    ),
)
expect(create_app.sync(cluster, namespace, client=client, body=app), App)
wait(
    "the app Ready",
    lambda: (a := get_app.sync(cluster, namespace, "web", client=client)).status
    and a.status.phase == "Ready",
)

build = AppBuild(metadata=ObjectMeta(name="web-1"), spec=AppBuildSpec(app_name="web", git_ref="main"))
created = expect(create_appbuild.sync(cluster, namespace, client=client, body=build), AppBuild)
assert created.spec.app_name == "web"
phases = []


def build_phase():
    found = expect(get_appbuild.sync(cluster, namespace, "web-1", client=client), AppBuild)
    phase = found.status.phase if found.status else None
    if phase and (not phases or phases[-1] != phase):
        phases.append(phase)
    if phase == "Failed":
        raise AssertionError(f"the build failed: {found.status.reason}: {found.status.message}")
    return found if phase == "Completed" else None


done = wait("the build Completed", build_phase)
print(f"PHASES {' '.join(phases)}", flush=True)
assert done.status.image.startswith(f"registry.example.com/{namespace}/web"), done.status.image

log = build_logs.sync(cluster, namespace, "web-1", client=client)
assert isinstance(log, str) and "Pushed" in log, repr(log)
lines = wait(
    "the app's pod logging",
    lambda: (text := app_logs.sync(cluster, namespace, "web", client=client, tail=10)) and text,
)
assert all(line.startswith("[web-") for line in lines.splitlines()), repr(lines)
print(f"APP LOG {lines.splitlines()[0]}", flush=True)

rollback = expect(
    rollback_app.sync(cluster, namespace, "web", client=client, body=Rollback(to="web-1")),
    AppBuild,
)
assert rollback.metadata.name.startswith("web-rollback-"), rollback.metadata.name
assert rollback.spec.rollback_to == "web-1"

# Errors come back typed, with the API's reason.
missing = get_app.sync_detailed(cluster, namespace, "nope", client=client)
assert missing.status_code == 404, missing
assert isinstance(missing.parsed, ApiError) and missing.parsed.reason == "NotFound", missing.parsed
refused = rollback_app.sync(cluster, namespace, "web", client=client, body=Rollback(to="nope"))
assert isinstance(refused, ApiError) and refused.code == 404, refused
print("DONE", flush=True)
