//! How benchmarks and the load test print what they measured.

use std::time::Duration;

/// The `p` quantile (0..=1) of some samples (sorts them).
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() as f64 - 1.0) * p).round() as usize]
}

/// A duration in milliseconds, for a table.
pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// An amount of memory given in KiB, in MiB.
pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Prints a figure a test measured so that it shows in CI's log too: straight to stderr,
/// past libtest's capture of passing tests' output.
pub fn report(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}
