//! Per-recipient state of one sent message, from its receipts, in whatever order they arrive.
//!
//! The rules (see the shared PEC reference): the acceptance lists every recipient as
//! certified (a delivery receipt will follow) or external (none ever will); each delivery or
//! failure receipt names one recipient (`consegna`); a non-acceptance fails them all; the
//! 12 h timeout notice is a warning and the 24 h one (`5.4.1`) a failure; a virus notice is a
//! failure. **Nothing downgrades a delivery**: a late notice, or an acceptance processed
//! after the delivery it preceded, leaves a delivered recipient delivered. Applying the same
//! receipts in any order gives the same state.

use std::collections::BTreeMap;

use super::classify::Kind;
use super::daticert::Daticert;

/// Where one recipient stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipientState {
    /// Named by a receipt before any acceptance or delivery says more.
    Pending,
    /// Accepted by the sender's provider; a delivery receipt is awaited.
    Accepted,
    /// A PEC delivery receipt came: when, and from which provider.
    Delivered {
        at: Option<String>,
        by: Option<String>,
    },
    /// Not delivered: the provider's code and text.
    Failed { at: Option<String>, error: String },
    /// Not a PEC address: delivered by ordinary mail, never receipted.
    External,
}

impl RecipientState {
    pub fn as_str(&self) -> &'static str {
        match self {
            RecipientState::Pending => "pending",
            RecipientState::Accepted => "accepted",
            RecipientState::Delivered { .. } => "delivered",
            RecipientState::Failed { .. } => "failed",
            RecipientState::External => "external",
        }
    }

    /// How final a state is: a state only ever moves up this order.
    fn rank(&self) -> u8 {
        match self {
            RecipientState::Pending => 0,
            RecipientState::Accepted => 1,
            RecipientState::External => 2,
            RecipientState::Failed { .. } => 3,
            RecipientState::Delivered { .. } => 4,
        }
    }
}

/// The state of one sent message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageState {
    /// The provider's id for the submission, from the acceptance (or any later receipt).
    pub identificativo: Option<String>,
    pub recipients: BTreeMap<String, RecipientState>,
    /// 12 h timeout notices received, by recipient (see [`MessageState::warnings`]).
    notices: BTreeMap<String, String>,
}

/// When a delivered or failed state was certified, as an instant (offsets taken into
/// account: `+0100` and `+0200` both occur).
fn instant(state: &RecipientState) -> Option<time::OffsetDateTime> {
    let at = match state {
        RecipientState::Delivered { at, .. } | RecipientState::Failed { at, .. } => {
            at.as_deref()?
        }
        _ => return None,
    };
    time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).ok()
}

/// The text that breaks a tie between two states of the same weight and instant.
fn detail(state: &RecipientState) -> &str {
    match state {
        RecipientState::Delivered { by, .. } => by.as_deref().unwrap_or(""),
        RecipientState::Failed { error, .. } => error,
        _ => "",
    }
}

/// The 24 h notice is final in effect: its `errore-esteso` starts with 5.4.1.
fn final_timeout(d: &Daticert) -> bool {
    d.errore_esteso
        .as_deref()
        .is_some_and(|e| e.trim_start().starts_with("5.4.1"))
}

fn error_text(d: &Daticert) -> String {
    match (&d.errore_esteso, d.errore.as_str()) {
        (Some(extended), _) => extended.clone(),
        (None, "") | (None, "nessuno") => "no reason given".to_owned(),
        (None, code) => code.to_owned(),
    }
}

impl MessageState {
    fn raise(&mut self, address: &str, state: RecipientState) {
        let key = address.trim().to_ascii_lowercase();
        let current = self
            .recipients
            .entry(key)
            .or_insert(RecipientState::Pending);
        // Between two receipts of the same weight (a virus notice and the failure that
        // follows it) the earlier one stands, whichever was read first; at the same instant,
        // the smaller text (any fixed rule keeps the outcome independent of arrival).
        let key = |s: &RecipientState| (instant(s).is_none(), instant(s), detail(s).to_owned());
        let earlier = state.rank() == current.rank() && key(&state) < key(current);
        if state.rank() > current.rank() || earlier {
            *current = state;
        }
    }

    /// Take one receipt into account.
    pub fn apply(&mut self, kind: Kind, d: &Daticert) {
        if self.identificativo.is_none() {
            self.identificativo = d.identificativo.clone();
        }
        let failed = || RecipientState::Failed {
            at: d.at.clone(),
            error: error_text(d),
        };
        match kind {
            Kind::Acceptance => {
                for r in &d.destinatari {
                    let state = if r.certified {
                        RecipientState::Accepted
                    } else {
                        RecipientState::External
                    };
                    self.raise(&r.address, state);
                }
            }
            Kind::NonAcceptance => {
                for r in &d.destinatari {
                    self.raise(&r.address, failed());
                }
            }
            Kind::Delivery => {
                if let Some(to) = &d.consegna {
                    self.raise(
                        to,
                        RecipientState::Delivered {
                            at: d.at.clone(),
                            by: d.gestore.clone(),
                        },
                    );
                }
            }
            Kind::DeliveryFailure | Kind::Virus => {
                let named: Vec<String> = match &d.consegna {
                    Some(to) => vec![to.clone()],
                    None => d.destinatari.iter().map(|r| r.address.clone()).collect(),
                };
                for to in named {
                    self.raise(&to, failed());
                }
            }
            Kind::DeliveryTimeout => {
                let named: Vec<String> = match &d.consegna {
                    Some(to) => vec![to.clone()],
                    None => d
                        .destinatari
                        .iter()
                        .filter(|r| r.certified)
                        .map(|r| r.address.clone())
                        .collect(),
                };
                for to in named {
                    if final_timeout(d) {
                        self.raise(&to, failed());
                    } else {
                        let key = to.trim().to_ascii_lowercase();
                        self.notices.entry(key).or_insert_with(|| error_text(d));
                        self.raise(&to, RecipientState::Accepted);
                    }
                }
            }
            Kind::TakenInCharge
            | Kind::Envelope
            | Kind::Anomaly
            | Kind::Ordinary
            | Kind::Unknown => {}
        }
    }

    /// Warnings worth an alert: recipients with a 12 h notice and still no delivery or
    /// failure (derived from the state, so the order of arrival does not matter).
    pub fn warnings(&self) -> Vec<String> {
        self.notices
            .iter()
            .filter(|(to, _)| {
                matches!(
                    self.recipients.get(*to),
                    Some(RecipientState::Pending | RecipientState::Accepted)
                )
            })
            .map(|(to, text)| format!("{to}: not delivered yet ({text})"))
            .collect()
    }

    /// Recipients still waiting for a delivery or failure receipt.
    pub fn undelivered(&self) -> Vec<&str> {
        self.recipients
            .iter()
            .filter(|(_, s)| matches!(s, RecipientState::Pending | RecipientState::Accepted))
            .map(|(a, _)| a.as_str())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::receipts::daticert::Recipient;

    fn receipt(tipo: &str, consegna: Option<&str>, extra: impl FnOnce(&mut Daticert)) -> Daticert {
        let mut d = Daticert {
            tipo: tipo.into(),
            errore: "nessuno".into(),
            identificativo: Some("opec1@pec.it".into()),
            consegna: consegna.map(str::to_owned),
            destinatari: vec![
                Recipient {
                    address: "a@pec.it".into(),
                    certified: true,
                },
                Recipient {
                    address: "b@pec.it".into(),
                    certified: true,
                },
                Recipient {
                    address: "c@example.com".into(),
                    certified: false,
                },
            ],
            at: Some("2026-06-29T14:05:09+02:00".into()),
            gestore: Some("Provider".into()),
            ..Daticert::default()
        };
        extra(&mut d);
        d
    }

    /// Every order of `receipts` gives the same final state.
    fn in_every_order(receipts: &[(Kind, Daticert)]) -> MessageState {
        fn permutations(n: usize) -> Vec<Vec<usize>> {
            if n == 0 {
                return vec![vec![]];
            }
            let mut out = Vec::new();
            for p in permutations(n - 1) {
                for i in 0..=p.len() {
                    let mut q = p.clone();
                    q.insert(i, n - 1);
                    out.push(q);
                }
            }
            out
        }
        let mut states = permutations(receipts.len()).into_iter().map(|order| {
            let mut state = MessageState::default();
            for i in order {
                state.apply(receipts[i].0, &receipts[i].1);
            }
            state.recipients
        });
        let first = states.next().unwrap();
        assert!(states.all(|s| s == first), "order changes the outcome");
        let mut state = MessageState::default();
        for (kind, d) in receipts {
            state.apply(*kind, d);
        }
        state
    }

    #[test]
    fn per_recipient_states_whatever_the_order() {
        let state = in_every_order(&[
            (Kind::Acceptance, receipt("accettazione", None, |_| {})),
            (
                Kind::Delivery,
                receipt("avvenuta-consegna", Some("a@pec.it"), |_| {}),
            ),
            (
                Kind::DeliveryFailure,
                receipt("errore-consegna", Some("B@pec.it"), |d| {
                    d.errore = "no-dest".into();
                    d.errore_esteso = Some("5.1.1 - Provider - indirizzo non valido".into());
                }),
            ),
        ]);
        assert_eq!(state.recipients["a@pec.it"].as_str(), "delivered");
        assert_eq!(
            state.recipients["b@pec.it"],
            RecipientState::Failed {
                at: Some("2026-06-29T14:05:09+02:00".into()),
                error: "5.1.1 - Provider - indirizzo non valido".into()
            }
        );
        assert_eq!(state.recipients["c@example.com"], RecipientState::External);
        assert!(state.undelivered().is_empty());
        assert_eq!(state.identificativo.as_deref(), Some("opec1@pec.it"));
    }

    #[test]
    fn a_late_timeout_never_downgrades_a_delivery() {
        let twelve = receipt("preavviso-errore-consegna", Some("a@pec.it"), |d| {
            d.errore_esteso = Some("4.4.7 - non ancora consegnato".into());
        });
        let twenty_four = receipt("preavviso-errore-consegna", Some("a@pec.it"), |d| {
            d.errore_esteso = Some("5.4.1 - non consegnato entro 24 ore".into());
        });
        let state = in_every_order(&[
            (Kind::Acceptance, receipt("accettazione", None, |_| {})),
            (Kind::DeliveryTimeout, twelve.clone()),
            (Kind::DeliveryTimeout, twenty_four.clone()),
            (
                Kind::Delivery,
                receipt("avvenuta-consegna", Some("a@pec.it"), |_| {}),
            ),
        ]);
        assert_eq!(state.recipients["a@pec.it"].as_str(), "delivered");
        assert!(
            state.warnings().is_empty(),
            "a delivered recipient is not warned about"
        );
        // Without the delivery: the 12 h notice warns, the 24 h one fails.
        let mut state = MessageState::default();
        state.apply(Kind::Acceptance, &receipt("accettazione", None, |_| {}));
        state.apply(Kind::DeliveryTimeout, &twelve);
        assert_eq!(state.recipients["a@pec.it"].as_str(), "accepted");
        assert_eq!(state.warnings().len(), 1);
        state.apply(Kind::DeliveryTimeout, &twenty_four);
        assert_eq!(state.recipients["a@pec.it"].as_str(), "failed");
        assert_eq!(state.undelivered(), ["b@pec.it"]);
    }

    #[test]
    fn a_non_acceptance_fails_everyone() {
        let mut state = MessageState::default();
        state.apply(
            Kind::NonAcceptance,
            &receipt("non-accettazione", None, |d| d.errore = "altro".into()),
        );
        assert!(state.recipients.values().all(|s| s.as_str() == "failed"));
    }
}

/// The fixtures (tests/fixtures/receipts, written from the PEC reference by
/// `generate.py`): each file classified as its manifest says, each scenario reconciled to the
/// outcome its note describes, in its order of arrival and the reverse.
#[cfg(test)]
mod fixtures {
    use super::*;
    use crate::receipts::classify::classify;

    fn dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/receipts")
    }

    fn manifest() -> serde_json::Value {
        let text = std::fs::read_to_string(dir().join("MANIFEST.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn every_fixture_is_classified_as_its_manifest_says() {
        let manifest = manifest();
        let files = manifest["files"].as_array().unwrap();
        assert!(files.len() >= 30);
        for f in files {
            let name = f["file"].as_str().unwrap();
            let raw = std::fs::read(dir().join(name)).unwrap();
            let c = classify(&raw);
            let expected = f["kind"].as_str().unwrap();
            let got = match c.kind {
                // The manifest calls every non-PEC message unknown.
                Kind::Ordinary => "unknown",
                kind => kind.as_str(),
            };
            assert_eq!(got, expected, "{name}: {:?}", c.note);
            if !c.kind.is_receipt() {
                continue;
            }
            assert_eq!(
                c.original_message_id.as_deref(),
                f["msgid"].as_str(),
                "{name}: original Message-ID"
            );
            let d = c.daticert.expect(name);
            assert_eq!(
                d.identificativo
                    .as_deref()
                    .map(|i| i.trim_matches(['<', '>'])),
                f["identificativo"]
                    .as_str()
                    .map(|i| i.trim_matches(['<', '>'])),
                "{name}: identificativo"
            );
            assert_eq!(d.consegna.as_deref(), f["consegna"].as_str(), "{name}");
            // The daticert's own msgid, however written, normalises to the same id.
            if let Some(msgid) = &d.msgid {
                assert_eq!(
                    Some(msgid.as_str()),
                    f["msgid"].as_str(),
                    "{name}: daticert msgid"
                );
            }
            assert_eq!(d.at.as_deref(), f["data"].as_str(), "{name}: date");
            assert_eq!(
                d.errore_esteso.as_deref(),
                f["errore_esteso"].as_str(),
                "{name}: errore-esteso"
            );
            let recipients: Vec<(String, bool)> = f["destinatari"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    (
                        r["address"].as_str().unwrap().to_owned(),
                        r["tipo"].as_str() == Some("certificato"),
                    )
                })
                .collect();
            let parsed: Vec<(String, bool)> = d
                .destinatari
                .iter()
                .map(|r| (r.address.clone(), r.certified))
                .collect();
            assert_eq!(parsed, recipients, "{name}: destinatari");
        }
    }

    /// A scenario's state after its receipts in every order (they must agree).
    fn scenario(name: &str) -> MessageState {
        let manifest = manifest();
        let s = manifest["scenarios"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no scenario {name}"));
        let mut receipts = Vec::new();
        for file in s["arrival"].as_array().unwrap() {
            let raw = std::fs::read(dir().join(file.as_str().unwrap())).unwrap();
            let c = classify(&raw);
            assert_eq!(
                c.original_message_id.as_deref(),
                s["msgid"].as_str(),
                "{file}: every receipt of a scenario points at its original"
            );
            receipts.push((c.kind, c.daticert.unwrap()));
        }
        let mut orders = vec![receipts.clone()];
        orders.push(receipts.iter().rev().cloned().collect());
        let states: Vec<MessageState> = orders
            .iter()
            .map(|order| {
                let mut state = MessageState::default();
                for (kind, d) in order {
                    state.apply(*kind, d);
                }
                state
            })
            .collect();
        assert_eq!(
            states[0].recipients, states[1].recipients,
            "{name}: order matters"
        );
        states.into_iter().next().unwrap()
    }

    fn states(state: &MessageState) -> Vec<(&str, &str)> {
        state
            .recipients
            .iter()
            .map(|(a, s)| (a.as_str(), s.as_str()))
            .collect()
    }

    #[test]
    fn scenarios_end_as_their_notes_say() {
        let fattura = scenario("fattura");
        assert_eq!(
            states(&fattura),
            [
                ("altro@pec.example.test", "delivered"),
                ("copia@pec.ente.test", "delivered"),
                ("ufficio@pec.ente.test", "failed"),
            ]
        );
        assert_eq!(
            states(&scenario("timeout")),
            [("lento@pec.lento.test", "failed")]
        );
        let tardiva = scenario("tardiva");
        assert!(
            states(&tardiva).iter().all(|(_, s)| *s == "delivered"),
            "{tardiva:?}"
        );
        assert!(
            states(&scenario("virus"))
                .iter()
                .all(|(_, s)| *s == "failed")
        );
        let estate = scenario("estate");
        assert_eq!(
            states(&estate),
            [
                ("fornitore@posta.example.com", "external"),
                ("mario.rossi@gmail.com", "external"),
                ("ufficio@pec.ente.test", "delivered"),
            ]
        );
    }
}
