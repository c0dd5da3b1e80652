//! The tools behind the `ringcall` command, kept out of the `ringcall` library that
//! services depend on.
//!
//! # Layout
//!
//! - [`bench`](mod@bench): the load generator behind `ringcall bench` (closed loop on io_uring, open
//!   loop with coordinated-omission correction, HdrHistogram percentiles, text/JSON/CSV
//!   reports).
//! - [`bench::compare`]: `ringcall compare`, the same workloads against every backend in
//!   interleaved rounds, with steal read from `/proc/stat`, server CPU from
//!   `/proc/PID/task/*/schedstat`, JSON and an SVG chart (plotters).
//! - [`top`]: `ringcall top`, a running server's counters as rates, from its stats command.
//! - `src/main.rs`: the clap command line (`serve`, `call`, `bench`, `compare`, `top`).

pub mod bench;
pub mod top;
