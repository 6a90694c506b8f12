//! Load test harness for the ShapeBlock hub: simulated clusters ([`sim`]) behind the real agent
//! code ([`fleet`]) and the ShapeBlock server's end of the relay ([`relay`]); the hub process,
//! its API client and the samplers come from `shapeblock-test-support`. Used by the
//! `shapeblock-loadtest` binary and the `fleet_real` benchmark; nothing in the product depends
//! on it.

// Harness code: a failed expectation ends the run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod fleet;
pub mod relay;
pub mod report;
pub mod sim;

pub use fleet::WATCHES_PER_CLUSTER;
