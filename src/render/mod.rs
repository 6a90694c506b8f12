//! Pure renderers: functions from settings to Kubernetes objects, with no I/O, so every shape
//! the hub produces is tested without a cluster.
//!
//! Depends on: crd, tunnel (the names the agent impersonates, which the manifest's policy
//! and the Teams' bindings use too).
//! Never uses: kube, tokio (renderers are pure: no client, no I/O).

pub mod agent;
pub mod app;
pub mod build;
pub mod image;
pub mod jobs;
