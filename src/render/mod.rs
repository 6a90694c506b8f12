//! Pure renderers: functions from settings to Kubernetes objects, with no I/O, so every shape
//! the hub produces is tested without a cluster.

pub mod agent;
pub mod build;
pub mod image;
pub mod jobs;
