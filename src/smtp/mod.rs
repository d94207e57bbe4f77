//! The SMTP side of pecgate: message submission through a shared PEC mailbox with personal
//! credentials, the PEC formal checks, and relay to the provider.
//!
//! Layers, from bytes up (only the last three do I/O):
//! - [`reply`]: SMTP replies, ours and the provider's (framing, parsing, wire form);
//! - [`command`]: client command parsing with smtp-proto, the EHLO answer, SASL lines;
//! - [`data`]: receiving DATA (end detection and dot-unstuffing with smtp-proto's
//!   smuggling-hardened receiver, bare CR/LF refusal, size limit, header capture) and
//!   dot-stuffing towards the provider;
//! - [`message`]: the header section: fields, address lists, Message-ID, Subject;
//! - [`checks`]: permission, the PEC formal checks and the send-rate window;
//! - [`spool`]: the on-disk copy of a message being received, removed on every path;
//! - [`provider`]: the SMTP client towards the provider;
//! - [`session`]: one client connection, from greeting to QUIT.
//!
//! Nothing is acknowledged to the client before the provider has answered: the client's
//! `250` after DATA *is* the provider's `250`, relayed, and it is recorded in the sent ledger
//! ([`crate::ledger`]) and the audit log first.

pub mod checks;
pub mod command;
pub mod data;
pub mod message;
pub mod provider;
pub mod reply;
pub mod session;
pub mod spool;
