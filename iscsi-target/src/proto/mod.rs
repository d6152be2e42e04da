//! The sans-IO protocol core: no sockets, no tokio, no clocks (time is passed in).
//!
//! `pdu` frames and decodes, `text` and `params` handle login keys, `chap` authenticates,
//! `connection` is the per-connection state machine the driver feeds.

pub mod chap;
pub mod connection;
pub mod digest;
pub mod params;
pub mod pdu;
pub mod serial;
pub mod text;
