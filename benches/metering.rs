//! Metering benchmarks (being written).
fn main() {}
