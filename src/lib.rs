//! ShapeBlock hub: one process that reconciles every managed Kubernetes cluster remotely,
//! through a websocket tunnel that a small agent in each cluster opens outward.
//!
//! Layout (each module's own doc says what it may depend on, in a `Depends on:` line, and
//! which external crates it never uses; `tests/architecture.rs` enforces both):
//! - [`crd`]: the ShapeBlock custom resource types; the CRD YAML is generated from them.
//! - [`hub`]: the hub process: agent gateway, cluster registry, HTTP API.
//! - [`tunnel`]: the wire shared by hub and agent: HTTP/2 over a websocket byte stream; and
//!   the network edge (rustls, websocket dial, reconnect backoff) the relay uses too.
//! - [`agent`]: the tunnel agent that runs in each managed cluster.
//! - [`render`]: pure builders of the Kubernetes objects the hub produces.
//! - [`controllers`]: reconcilers of the ShapeBlock kinds, one set per connected cluster.
//! - [`observed`]: pure readers of what Kubernetes reports about Jobs and Pods.
//! - [`relay`]: status events and build log lines, numbered, for the ShapeBlock server and
//!   `/api/v1/events`.
//! - [`secret`]: strings that never print (tokens), and token hashing.
//! - [`config`]: what the two binaries' configurations share.
//! - [`telemetry`]: logging set-up shared by both binaries.
//!
//! The binaries in `src/bin/` only parse arguments and call into these modules.

pub mod agent;
pub mod config;
pub mod controllers;
pub mod crd;
pub mod hub;
pub mod observed;
pub mod relay;
pub mod render;
pub mod secret;
pub mod telemetry;
pub mod tunnel;
