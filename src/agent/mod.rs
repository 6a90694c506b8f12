//! The tunnel agent that runs in each managed cluster. It dials the hub and serves the hub's
//! requests against its own kube-apiserver (see DESIGN.md, "The tunnel").

/// Entry point of the `shapeblock-agent` binary.
pub fn main() -> std::process::ExitCode {
    eprintln!(
        "shapeblock-agent {}: the tunnel is not built yet",
        env!("CARGO_PKG_VERSION")
    );
    std::process::ExitCode::FAILURE
}
