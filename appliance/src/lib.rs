//! The appliance's reusable parts, shared by the daemon (`src/main.rs`), the tests and the
//! fuzz targets.
//!
//! - [`copy_tuning`]: a data-path process restarts once with glibc's `rep movsb` threshold
//!   raised on AMD CPUs where short-distance copies are slow.
//! - [`meta`]: the metadata log (openraft + redb): membership, epochs, write-intent marks.
//! - [`node`]: one controller assembled: engine + metadata replica + peer transport.
//! - [`peer`]: the transport between controllers (frames, messages, client, server).
//!
//! Invariant: nothing here panics on bytes from the network.

#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod copy_tuning;
pub mod events;
pub mod meta;
pub mod node;
pub mod peer;
pub mod server;
