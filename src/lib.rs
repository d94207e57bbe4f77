//! pecgate: a gateway that lets a whole company use its PEC (Posta Elettronica Certificata)
//! mailboxes with personal logins, per-user audit and folder policy.
//!
//! The binary (`src/main.rs`) is a thin CLI over this library; `docs/ARCHITECTURE.md` maps
//! the modules and their invariants.

pub mod audit;
pub mod body_cache;
pub mod client_config;
pub mod config;
pub mod control;
pub mod disk;
#[cfg(test)]
mod fuzz;
pub mod gateway;
pub mod guard;
pub mod imap;
pub mod io;
pub mod ledger;
pub mod login;
pub mod metrics;
pub mod monitor;
pub mod notify;
pub mod password;
pub mod policy;
pub mod provider_io;
pub mod receipts;
pub mod registry;
pub mod reload;
pub mod server;
pub mod session;
pub mod smtp;
#[cfg(test)]
mod testing;
pub mod text;
pub mod timeline;
pub mod tls;
pub mod upstream;
pub mod vault;
