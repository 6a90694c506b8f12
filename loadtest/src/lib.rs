//! Load test harness for the ShapeBlock hub: simulated clusters ([`sim`]) behind the real agent
//! code ([`fleet`]), the real hub binary in its own process ([`hub`]), and the ShapeBlock
//! server's end of the relay ([`relay`]). Used by the `shapeblock-loadtest` binary and the
//! `real` benchmark; nothing in the product depends on it.

pub mod fleet;
pub mod hub;
pub mod relay;
pub mod report;
pub mod sim;

pub use fleet::WATCHES_PER_CLUSTER;
