//! Nothing to build: the package exists for its bench, `benches/peers.rs` (see its docs and
//! BENCHMARKS.md). A package needs a library or binary target, so this one is empty.
