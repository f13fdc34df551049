//! Multi-node tests: real `shoal node` processes on loopback (`--peer`)
//! and in network namespaces (mDNS), checked against `shoal run` on one
//! machine. One test binary; each test holds [`serial`] for its whole run,
//! so clusters never compete for this machine's cores; every deadline goes
//! through `secs` (scaled by `SHOAL_TEST_TIME_FACTOR`).

mod clients;
mod failures;
mod hybrid;
mod namespaces;
mod page;
mod pipeline;
mod security;
mod speculate;
mod survive;
mod weights;

/// What every test module uses.
mod prelude {
    pub use std::path::Path;
    pub use std::time::{Duration, Instant};

    pub use serde_json::Value;
    pub use shoal_tests::cluster::*;
    pub use shoal_tests::python::*;
    pub use shoal_tests::{
        default_model, plan_size, prerequisite, run_single, secs, serial, LogsOnFailure, NodeProc,
    };
}
