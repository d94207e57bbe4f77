//! PEC receipts: what the provider sends back about the messages a mailbox sent, and the
//! envelopes of incoming PEC.
//!
//! Pure (no I/O):
//! - [`daticert`]: the certification data (`daticert.xml`) and Message-ID normalisation;
//! - [`classify`]: which kind a message is, from its headers, checked against its daticert;
//! - [`reconcile`]: per-recipient state of a sent message from its receipts, in any order.
//!
//! - [`scan`]: the worker's IMAP commands and response decoding, and what it does with
//!   each kind.
//!
//! Blocking I/O (a dedicated thread or `spawn_blocking`):
//! - [`archive`]: receipts and envelopes stored byte for byte, content-addressed, indexed;
//! - [`report`]: what `pecgate receipts` prints, and the export for preservation.
//!
//! Driver (session layer, async I/O):
//! - [`worker`]: one per mailbox; watches INBOX, archives, reconciles with the sent ledger
//!   ([`crate::ledger`]), files receipts, alerts; over `conn`, its provider conversation.

pub mod archive;
pub mod classify;
mod conn;
pub mod daticert;
pub mod reconcile;
pub mod report;
pub mod scan;
pub mod worker;
