//! Benchmarks and capacity planning (ARCHITECTURE §9).
//!
//! Will own: the `stral bench` load generator (keystroke, chat and fixed workloads;
//! open and closed loop; TTFT/TPOT/ITL/E2E percentiles, goodput, plots), the
//! step-time model behind the sim backend, and the `stral plan` capacity planner.
//! Measured results live in `benches/RESULTS.md`.

pub mod bench;
pub mod plan;
