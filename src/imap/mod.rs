//! The IMAP side of pecgate.
//!
//! Layers, from bytes up (only the last two do I/O):
//! - [`framing`]: line and literal boundaries, command assembly with limits;
//! - [`command`]: parsing with imap-codec, re-encoding for the provider, audit summaries;
//! - [`classify`]: the one table of what each command kind is and needs;
//! - [`response`]: classifying provider responses, the capability allow-list;
//! - [`authorize`]: the folder and permission policy on commands;
//! - [`identity`]: which message a FETCH answer or an APPEND carried (for the audit);
//! - [`cached_fetch`]: which downloads the body cache answers, and how its bodies join the
//!   provider's answer;
//! - [`listing`]: LIST/LSUB answered and STATUS filtered from the visible tree;
//! - [`provider_client`]: pecgate's side of the provider conversation (tags, literals, IDLE,
//!   attribution of every response);
//! - [`preauth`]: the not-authenticated state (served locally), as decisions;
//! - [`client_session`]: one logged-in client session as a state machine;
//! - [`view`]: a parked session's view of its folder, and the provider news that moves it;
//! - [`renumber`]: a session's numbering against a provider connection that selected its
//!   folder afresh (sequence sets translated, answers renumbered, EXPUNGE held back);
//! - [`phase`]: what a session carries between its attached and parked phases, how it ends;
//! - [`session`]: one connection: TLS, not-authenticated state, login;
//! - [`relay`]: drives the two machines over the client and provider sockets, and parks a
//!   session in IDLE (no provider connection held);
//! - [`lend`]: a session between two commands lends its connection to a waiting one, and
//!   takes up a pooled connection at its next command;
//! - [`watcher`]: one connection per watched folder keeping parked sessions up to date.

pub mod authorize;
pub mod cached_fetch;
pub mod classify;
pub mod client_session;
pub mod command;
pub mod framing;
pub mod identity;
pub mod lend;
pub mod listing;
pub mod mutf7;
pub mod park;
pub mod phase;
pub mod preauth;
pub mod provider_client;
pub mod relay;
pub mod renumber;
pub mod response;
pub mod session;
pub mod view;
pub mod watcher;
