//! The appliance's reusable parts, shared by the daemon (`src/main.rs`), the tests and the
//! fuzz targets.
//!
//! - [`peer`]: the transport between controllers (frames, messages, client, server).
//!
//! Invariant: nothing here panics on bytes from the network.

#![forbid(unsafe_code)]

pub mod peer;
