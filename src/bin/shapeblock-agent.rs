//! `shapeblock-agent`: the tunnel agent for a managed cluster.

fn main() -> std::process::ExitCode {
    shapeblock::agent::main()
}
