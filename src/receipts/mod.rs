//! PEC receipts: what the provider sends back about the messages a mailbox sent, and the
//! envelopes of incoming PEC.
//!
//! Pure (no I/O):
//! - [`daticert`]: the certification data (`daticert.xml`) and Message-ID normalisation;
//! - [`classify`]: which kind a message is, from its headers, checked against its daticert;
//! - [`reconcile`]: per-recipient state of a sent message from its receipts, in any order.
//!
//! Blocking I/O (a dedicated thread or `spawn_blocking`):
//! - [`archive`]: receipts and envelopes stored byte for byte, content-addressed, indexed.
//!
//! The receipts worker that watches INBOX, archives, moves and reconciles with the sent ledger
//! is not written yet (the receipts issue stays open).

pub mod archive;
pub mod classify;
pub mod daticert;
pub mod reconcile;
