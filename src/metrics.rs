//! Counters and gauges for monitoring, encoded in the Prometheus/OpenMetrics text format by
//! the `prometheus-client` crate (served by [`crate::monitor`]).
//!
//! Counters are bumped where things happen (every audited command, every login, every SMTP
//! message, every reload); gauges are set at scrape time from where the truth lives (the
//! session registry, the provider budgets, the audit queue), so they cannot drift.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::upstream::pool::PoolFigures;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Command {
    protocol: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Status {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Session {
    protocol: String,
    mailbox: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Mailbox {
    mailbox: String,
}

/// Every metric pecgate exports.
pub struct Metrics {
    registry: Mutex<prometheus_client::registry::Registry>,
    logins: Family<Outcome, Counter>,
    commands: Family<Command, Counter>,
    smtp_messages: Family<Status, Counter>,
    reloads: Family<Outcome, Counter>,
    revoked: Counter,
    sessions: Family<Session, Gauge>,
    provider_connections: Family<Mailbox, Gauge>,
    provider_cap: Family<Mailbox, Gauge>,
    provider_waiting: Family<Mailbox, Gauge>,
    provider_idle: Family<Mailbox, Gauge>,
    folder_watchers: Family<Mailbox, Gauge>,
    parked_sessions: Family<Mailbox, Gauge>,
    provider_limit_refusals: Family<Mailbox, Counter>,
    provider_lends: Family<Mailbox, Counter>,
    audit_queue_depth: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Metrics {
            registry: Mutex::new(prometheus_client::registry::Registry::default()),
            logins: Family::default(),
            commands: Family::default(),
            smtp_messages: Family::default(),
            reloads: Family::default(),
            revoked: Counter::default(),
            sessions: Family::default(),
            provider_connections: Family::default(),
            provider_cap: Family::default(),
            provider_waiting: Family::default(),
            provider_idle: Family::default(),
            folder_watchers: Family::default(),
            parked_sessions: Family::default(),
            provider_limit_refusals: Family::default(),
            provider_lends: Family::default(),
            audit_queue_depth: Gauge::default(),
        };
        // Counters are exported with the `_total` suffix.
        registry.register(
            "pecgate_logins",
            "Login attempts by outcome (ok, failed, locked, busy, limit, not_granted)",
            metrics.logins.clone(),
        );
        registry.register(
            "pecgate_commands",
            "Commands recorded in the audit log, by protocol and outcome",
            metrics.commands.clone(),
        );
        registry.register(
            "pecgate_smtp_messages",
            "Messages submitted over SMTP by final ledger status",
            metrics.smtp_messages.clone(),
        );
        registry.register(
            "pecgate_reloads",
            "Configuration reloads by outcome",
            metrics.reloads.clone(),
        );
        registry.register(
            "pecgate_sessions_revoked",
            "Sessions ended by a reload or an administrator",
            metrics.revoked.clone(),
        );
        registry.register(
            "pecgate_sessions",
            "Logged-in sessions by protocol and mailbox",
            metrics.sessions.clone(),
        );
        registry.register(
            "pecgate_provider_connections",
            "Provider connections open per mailbox",
            metrics.provider_connections.clone(),
        );
        registry.register(
            "pecgate_provider_connection_cap",
            "Provider connections pecgate allows itself per mailbox now: max_connections, or fewer while the provider refuses logins for its own limit",
            metrics.provider_cap.clone(),
        );
        registry.register(
            "pecgate_provider_waiting",
            "Logins and background work waiting for a provider connection, per mailbox",
            metrics.provider_waiting.clone(),
        );
        registry.register(
            "pecgate_provider_idle",
            "Provider connections logged in and waiting for the next session, per mailbox",
            metrics.provider_idle.clone(),
        );
        registry.register(
            "pecgate_folder_watchers",
            "Folder watchers (one provider connection each) serving parked IMAP sessions, per mailbox",
            metrics.folder_watchers.clone(),
        );
        registry.register(
            "pecgate_parked_sessions",
            "IMAP sessions in IDLE on a watched folder, holding no provider connection, per mailbox",
            metrics.parked_sessions.clone(),
        );
        registry.register(
            "pecgate_provider_limit_refusals",
            "Provider logins refused for the provider's own connection limit, per mailbox",
            metrics.provider_limit_refusals.clone(),
        );
        registry.register(
            "pecgate_provider_lends",
            "Provider connections lent by an IMAP session between two commands to a session waiting for one, per mailbox",
            metrics.provider_lends.clone(),
        );
        registry.register(
            "pecgate_audit_queue_depth",
            "Audit events queued and not yet written",
            metrics.audit_queue_depth.clone(),
        );
        *metrics.registry.lock().unwrap_or_else(|e| e.into_inner()) = registry;
        metrics
    }

    pub fn login(&self, outcome: &str) {
        self.logins
            .get_or_create(&Outcome {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    pub fn command(&self, protocol: &str, outcome: &str) {
        self.commands
            .get_or_create(&Command {
                protocol: protocol.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    pub fn smtp_message(&self, status: &str) {
        self.smtp_messages
            .get_or_create(&Status {
                status: status.to_owned(),
            })
            .inc();
    }

    pub fn reload(&self, outcome: &str) {
        self.reloads
            .get_or_create(&Outcome {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    pub fn revoked(&self, sessions: usize) {
        self.revoked.inc_by(sessions as u64);
    }

    /// The text of `/metrics`, with the gauges set from what is true now: sessions per
    /// (protocol, mailbox), provider connections per mailbox (every configured mailbox
    /// appears, 0 included; then the pool's cap, waiters and limit refusals) and the audit
    /// queue.
    pub fn render(
        &self,
        sessions: impl IntoIterator<Item = ((String, String), usize)>,
        mailboxes: impl IntoIterator<Item = String>,
        provider_connections: impl IntoIterator<Item = (String, PoolFigures)>,
        audit_queue_depth: usize,
    ) -> String {
        self.sessions.clear();
        for ((protocol, mailbox), n) in sessions {
            self.sessions
                .get_or_create(&Session { protocol, mailbox })
                .set(n as i64);
        }
        self.provider_connections.clear();
        for mailbox in mailboxes {
            let _ = self
                .provider_connections
                .get_or_create(&Mailbox { mailbox });
        }
        self.provider_cap.clear();
        self.provider_waiting.clear();
        self.provider_idle.clear();
        self.folder_watchers.clear();
        self.parked_sessions.clear();
        for (mailbox, figures) in provider_connections {
            let label = Mailbox { mailbox };
            self.provider_connections
                .get_or_create(&label)
                .set(i64::from(figures.open));
            self.provider_cap
                .get_or_create(&label)
                .set(i64::from(figures.cap));
            self.provider_waiting
                .get_or_create(&label)
                .set(figures.waiting as i64);
            self.provider_idle
                .get_or_create(&label)
                .set(figures.idle as i64);
            self.folder_watchers
                .get_or_create(&label)
                .set(figures.watchers as i64);
            self.parked_sessions
                .get_or_create(&label)
                .set(figures.parked as i64);
            // The pool counts since start; the counters catch up with it.
            catch_up(
                &self.provider_limit_refusals,
                &label,
                figures.limit_refusals,
            );
            catch_up(&self.provider_lends, &label, figures.lends);
        }
        self.audit_queue_depth.set(audit_queue_depth as i64);
        let mut text = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        prometheus_client::encoding::text::encode(&mut text, &registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// Raise the counter of `label` to `total`, a count its source keeps since start.
fn catch_up(family: &Family<Mailbox, Counter>, label: &Mailbox, total: u64) {
    let counter = family.get_or_create(label);
    counter.inc_by(total.saturating_sub(counter.get()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_exported_with_their_labels() {
        let metrics = Metrics::new();
        metrics.login("ok");
        metrics.login("ok");
        metrics.command("imap", "denied");
        let text = metrics.render(
            [(("imap".to_owned(), "studio".to_owned()), 3)],
            ["studio".to_owned(), "legal".to_owned()],
            [(
                "studio".to_owned(),
                PoolFigures {
                    open: 2,
                    cap: 3,
                    ceiling: 5,
                    waiting: 4,
                    idle: 1,
                    limit_refusals: 6,
                    lends: 9,
                    watchers: 2,
                    parked: 40,
                },
            )],
            7,
        );
        assert!(
            text.contains("pecgate_logins_total{outcome=\"ok\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("pecgate_commands_total{protocol=\"imap\",outcome=\"denied\"} 1"),
            "{text}"
        );
        assert!(text.contains("pecgate_sessions{protocol=\"imap\",mailbox=\"studio\"} 3"));
        assert!(text.contains("pecgate_provider_connections{mailbox=\"legal\"} 0"));
        assert!(text.contains("pecgate_provider_connections{mailbox=\"studio\"} 2"));
        assert!(text.contains("pecgate_provider_connection_cap{mailbox=\"studio\"} 3"));
        assert!(text.contains("pecgate_provider_waiting{mailbox=\"studio\"} 4"));
        assert!(text.contains("pecgate_provider_idle{mailbox=\"studio\"} 1"));
        assert!(text.contains("pecgate_folder_watchers{mailbox=\"studio\"} 2"));
        assert!(text.contains("pecgate_parked_sessions{mailbox=\"studio\"} 40"));
        assert!(
            text.contains("pecgate_provider_limit_refusals_total{mailbox=\"studio\"} 6"),
            "{text}"
        );
        assert!(text.contains("pecgate_audit_queue_depth 7"));
        assert!(text.ends_with("# EOF\n"));
    }
}
