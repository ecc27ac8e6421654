//! Criterion benchmarks for netd; see `benches/`.
