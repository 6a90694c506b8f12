//! Pure renderers: functions from settings to Kubernetes objects, with no I/O, so every shape
//! the hub produces is tested without a cluster.
//!
//! Depends on: crd.
//! Never uses: kube, tokio (renderers are pure: no client, no I/O).

pub mod agent;
pub mod app;
pub mod build;
pub mod image;
pub mod jobs;
