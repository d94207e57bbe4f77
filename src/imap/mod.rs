//! The IMAP side of pecgate.
//!
//! Layers, from bytes up (only the last two do I/O):
//! - [`framing`]: line and literal boundaries, command assembly with limits;
//! - [`command`]: parsing with imap-codec, the closed list of relayed commands, re-encoding
//!   for the provider, audit summaries;
//! - [`response`]: classifying provider responses, the capability allow-list;
//! - [`session`]: one connection: TLS, not-authenticated state, login;
//! - [`relay`]: the authenticated relay between client and provider.

pub mod authorize;
pub mod command;
pub mod framing;
pub mod mutf7;
pub mod relay;
pub mod response;
pub mod session;
pub mod stream;
