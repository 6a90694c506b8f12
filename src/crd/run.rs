//! `App.spec.run`: how an App runs (the ShapeBlock UI's settings page), and `App.status.runtime`:
//! how it is running.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::rules::env_name_re;

/// The port an App listens on when `spec.run.port` is not set; it is also given as `PORT`.
pub const DEFAULT_PORT: i32 = 8080;

/// A DNS name an Ingress accepts as a host: lowercase labels joined by dots, optionally
/// starting with a `*.` wildcard.
macro_rules! host_re {
    () => {
        "^([*][.])?[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
    };
}

/// A Kubernetes resource quantity (`250m`, `1`, `512Mi`, `1G`).
macro_rules! quantity_re {
    () => {
        "^[0-9]+([.][0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
    };
}

/// How an App runs. Every field is optional; the defaults run one replica listening on
/// port 8080 with a TCP health check. Changing it rolls the current image out again with the
/// new settings (a release), without a rebuild.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.autoscaling) || !has(self.replicas) || (self.replicas >= self.autoscaling.minReplicas && self.replicas <= self.autoscaling.maxReplicas)")
        .message("spec.run.replicas must lie between spec.run.autoscaling.minReplicas and maxReplicas (or be left out when autoscaling)"),
)]
pub struct RunSpec {
    /// Port the application listens on (default 8080). It is also given to the application as
    /// the `PORT` environment variable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// Number of replicas (default 1). With `autoscaling`, the autoscaler decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: Option<i32>,
    /// Command that replaces the image's entrypoint; each element is one argv element, never
    /// run through a shell.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 4096)))]
    pub command: Vec<String>,
    /// Arguments that replace the image's command (`CMD`); one argv element each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(max = 4096)))]
    pub args: Vec<String>,
    /// Environment variables of the application. `PORT` is set by the hub from `port`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 512))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub env: Vec<EnvVar>,
    /// Secrets and ConfigMaps of the App's namespace whose keys all become environment
    /// variables.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub env_from: Vec<EnvFrom>,
    /// Host names the App answers on, through an Ingress; TLS certificates come from
    /// cert-manager with the issuer of the hub's configuration.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["host"]))]
    pub domains: Vec<Domain>,
    /// CPU and memory of each replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<RunResources>,
    /// How the platform knows a replica is healthy: an HTTP GET of `path` on the port, or a
    /// TCP connection to the port when no path is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// Horizontal autoscaling on CPU (an `autoscaling/v2` HorizontalPodAutoscaler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,
}

/// One environment variable.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct EnvVar {
    /// Variable name: letters, digits and `_`, not starting with a digit.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(concat!("self.matches('", env_name_re!(), "')"))
        .message("spec.run.env name must be a variable name: letters, digits and '_', not starting with a digit"))]
    pub name: String,
    /// Value, passed verbatim.
    #[serde(default)]
    #[schemars(length(max = 32768))]
    pub value: String,
}

/// A Secret or a ConfigMap whose keys become environment variables. Name exactly one.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.secret) != has(self.configMap)")
    .message("spec.run.envFrom entries name exactly one of secret or configMap"))]
pub struct EnvFrom {
    /// Name of a Secret in the App's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253), regex(pattern = "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub secret: Option<String>,
    /// Name of a ConfigMap in the App's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253), regex(pattern = "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub config_map: Option<String>,
}

/// A host name the App answers on.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Domain {
    /// DNS name, such as `shop.example.com` or `*.example.com`.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(concat!("self.matches('", host_re!(), "')"))
        .message("spec.run.domains host must be a lowercase DNS name such as shop.example.com, optionally starting with '*.'"))]
    pub host: String,
    /// Whether to serve HTTPS with a certificate from cert-manager (default true). Needs an
    /// issuer in the hub configuration (`apps.tls_issuer`); without one, the host is served
    /// over HTTP and the App's status says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<bool>,
}

/// CPU and memory of each replica, as Kubernetes quantities.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunResources {
    /// CPU reserved for each replica, e.g. `250m` (default `100m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(concat!("self.matches('", quantity_re!(), "')"))
        .message("spec.run.resources.cpuRequest must be a quantity such as 250m or 1"))]
    pub cpu_request: Option<String>,
    /// Memory reserved for each replica, e.g. `256Mi` (default `128Mi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(concat!("self.matches('", quantity_re!(), "')"))
        .message("spec.run.resources.memoryRequest must be a quantity such as 256Mi or 1Gi"))]
    pub memory_request: Option<String>,
    /// Memory a replica may use before it is killed (`OOMKilled`), e.g. `512Mi` (default
    /// `512Mi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(concat!("self.matches('", quantity_re!(), "')"))
        .message("spec.run.resources.memoryLimit must be a quantity such as 512Mi or 1Gi"))]
    pub memory_limit: Option<String>,
}

/// The health check of each replica (readiness and liveness).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    /// HTTP path answered with a 2xx or 3xx by a healthy replica, such as `/healthz`. When
    /// absent, a TCP connection to the port is the check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new("self.startsWith('/') && !self.matches('[[:space:]]')")
        .message("spec.run.healthCheck.path must be an absolute HTTP path such as /healthz, without whitespace"))]
    pub path: Option<String>,
    /// Seconds a new replica gets to start before it is checked (default 0; the check then
    /// retries every 10 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub initial_delay_seconds: Option<i32>,
}

/// Horizontal autoscaling on CPU.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas")
    .message("spec.run.autoscaling.minReplicas must not exceed maxReplicas"))]
pub struct Autoscaling {
    /// Fewest replicas.
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,
    /// Most replicas.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Average CPU use, in percent of the CPU request, the autoscaler aims for (default 80).
    #[serde(
        rename = "targetCPUPercent",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 1, max = 100))]
    pub target_cpu_percent: Option<i32>,
}

/// How a deployed App is doing.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RuntimeState {
    /// Nothing is deployed yet.
    #[default]
    NotDeployed,
    /// A rollout is under way: replicas are starting or being replaced.
    Progressing,
    /// Every desired replica runs the current version and passes its health check.
    Running,
    /// Some replicas serve, others are failing (`reason` says why).
    Degraded,
    /// No replica serves (`reason` says why).
    Down,
}

/// The running App, observed from its workload and pods.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeStatus {
    /// How the App is doing.
    pub state: RuntimeState,
    /// Replicas wanted.
    #[serde(default)]
    pub desired_replicas: i32,
    /// Replicas passing their health check.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Replicas running the current version.
    #[serde(default)]
    pub updated_replicas: i32,
    /// Replicas ready for long enough to serve.
    #[serde(default)]
    pub available_replicas: i32,
    /// Container restarts summed over the current pods.
    #[serde(default)]
    pub restarts: i32,
    /// Image of the workload's current pod template: the version `state` and `reason`
    /// describe (during a rollout, the new one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Where the App answers (`https://host` or `http://host` per domain).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    /// When unhealthy, a short machine-readable reason: `CrashLoopBackOff`, `OOMKilled`,
    /// `ImagePullBackOff`, `ErrImagePull`, `Unschedulable`, `ProbeFailing`,
    /// `CreateContainerError`, `CreateContainerConfigError`, `RolloutStuck`…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human detail of `reason`: the pod, the container's exit code and its last termination
    /// message, and how many current pods share it. While `Progressing`, what the rollout
    /// waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When `state` or `reason` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
}
