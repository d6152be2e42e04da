//! Cross-crate test support: a test initiator and helpers that start real appliance processes
//! on loopback. Used by the integration tests in `tests/tests/` and the benchmarks.

#![forbid(unsafe_code)]

pub mod appliance;
pub mod cunit;
pub mod initiator;
pub mod scsi_sim;
pub mod sim;
