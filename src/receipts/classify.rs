//! What a message in a PEC mailbox is: a receipt (of which kind), a transport envelope of an
//! incoming PEC, an anomaly envelope, or ordinary mail. Decided from the headers
//! (`X-Trasporto` first, then `X-Ricevuta`, names compared case-insensitively) and checked
//! against `daticert.xml`; **never from the subject**, which prefixes can stack, encode and
//! collide in. Anything that cannot be decided with certainty is [`Kind::Unknown`] with the
//! reason, so the caller keeps and reports it instead of dropping it.

use mail_parser::{MessageParser, MimeHeaders};

use super::daticert::{self, Daticert, normalise_message_id};

/// What a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Acceptance,
    NonAcceptance,
    TakenInCharge,
    Delivery,
    DeliveryFailure,
    /// The 12 h / 24 h "not delivered yet" notices (`preavviso-errore-consegna`).
    DeliveryTimeout,
    Virus,
    /// An incoming PEC (`X-Trasporto: posta-certificata`): stays in INBOX.
    Envelope,
    /// `X-Trasporto: errore`: ordinary mail or a broken envelope, wrapped by the provider.
    Anomaly,
    /// Not a PEC message at all (no PEC header).
    Ordinary,
    /// PEC headers that cannot be read with certainty (see the reason).
    Unknown,
}

impl Kind {
    /// The name used in the archive, the ledger and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Acceptance => "accettazione",
            Kind::NonAcceptance => "non-accettazione",
            Kind::TakenInCharge => "presa-in-carico",
            Kind::Delivery => "avvenuta-consegna",
            Kind::DeliveryFailure => "errore-consegna",
            Kind::DeliveryTimeout => "preavviso-errore-consegna",
            Kind::Virus => "rilevazione-virus",
            Kind::Envelope => "posta-certificata",
            Kind::Anomaly => "errore",
            Kind::Ordinary => "ordinaria",
            Kind::Unknown => "unknown",
        }
    }

    /// Whether this is a receipt about a message the mailbox sent (to be reconciled).
    pub fn is_receipt(self) -> bool {
        matches!(
            self,
            Kind::Acceptance
                | Kind::NonAcceptance
                | Kind::TakenInCharge
                | Kind::Delivery
                | Kind::DeliveryFailure
                | Kind::DeliveryTimeout
                | Kind::Virus
        )
    }

    fn from_ricevuta(value: &str) -> Option<Kind> {
        Some(match value {
            "accettazione" => Kind::Acceptance,
            "non-accettazione" => Kind::NonAcceptance,
            "presa-in-carico" => Kind::TakenInCharge,
            "avvenuta-consegna" => Kind::Delivery,
            "errore-consegna" => Kind::DeliveryFailure,
            "preavviso-errore-consegna" => Kind::DeliveryTimeout,
            "rilevazione-virus" => Kind::Virus,
            _ => return None,
        })
    }
}

/// What was learnt from one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    pub kind: Kind,
    /// Why the kind is [`Kind::Unknown`] (or a warning on a known kind).
    pub note: Option<String>,
    /// The Message-ID of the original the receipt is about (normalised, no brackets):
    /// `X-Riferimento-Message-ID`, else the daticert `msgid`.
    pub original_message_id: Option<String>,
    /// The certification data, when the message carries a readable `daticert.xml`.
    pub daticert: Option<Daticert>,
}

/// A header's value (first occurrence), the name compared case-insensitively, unfolded.
fn header(message: &mail_parser::Message<'_>, name: &str) -> Option<String> {
    message
        .headers_raw()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, value)| {
            value
                .split(['\r', '\n'])
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
}

/// The `daticert.xml` part, wherever it sits in the MIME tree of this message (not inside an
/// attached original).
fn daticert_part<'a>(message: &'a mail_parser::Message<'_>) -> Option<&'a [u8]> {
    message
        .attachments()
        .find(|part| {
            part.attachment_name()
                .is_some_and(|name| name.eq_ignore_ascii_case("daticert.xml"))
        })
        .map(|part| part.contents())
}

/// Classify one message, given as the provider serves it.
pub fn classify(raw: &[u8]) -> Classified {
    let unknown = |note: String| Classified {
        kind: Kind::Unknown,
        note: Some(note),
        original_message_id: None,
        daticert: None,
    };
    let Some(message) = MessageParser::default().parse(raw) else {
        return unknown("not a parseable message".to_owned());
    };
    let trasporto = header(&message, "X-Trasporto").map(|v| v.to_ascii_lowercase());
    let ricevuta = header(&message, "X-Ricevuta").map(|v| v.to_ascii_lowercase());
    let by_header = match (&trasporto, &ricevuta) {
        (Some(t), _) if t == "posta-certificata" => Kind::Envelope,
        (Some(t), _) if t == "errore" => Kind::Anomaly,
        (Some(t), _) => return unknown(format!("unknown X-Trasporto {t:?}")),
        (None, Some(r)) => match Kind::from_ricevuta(r) {
            Some(kind) => kind,
            None => return unknown(format!("unknown X-Ricevuta {r:?}")),
        },
        (None, None) => {
            return Classified {
                kind: Kind::Ordinary,
                note: None,
                original_message_id: None,
                daticert: None,
            };
        }
    };
    let daticert = match daticert_part(&message).map(daticert::parse) {
        Some(Ok(d)) => Some(d),
        Some(Err(error)) if by_header != Kind::Anomaly => {
            return unknown(format!(
                "{} with a daticert.xml that cannot be read: {error}",
                by_header.as_str()
            ));
        }
        _ => None,
    };
    // The certification data must say the same thing as the headers.
    if let Some(d) = &daticert
        && by_header != Kind::Anomaly
        && !d.tipo.eq_ignore_ascii_case(by_header.as_str())
    {
        return unknown(format!(
            "headers say {} but daticert.xml says {:?}",
            by_header.as_str(),
            d.tipo
        ));
    }
    let original_message_id = header(&message, "X-Riferimento-Message-ID")
        .and_then(|v| normalise_message_id(&v))
        .or_else(|| daticert.as_ref().and_then(|d| d.msgid.clone()));
    let note = (by_header.is_receipt() && daticert.is_none())
        .then(|| "no daticert.xml: kept, but it certifies nothing".to_owned());
    Classified {
        kind: by_header,
        note,
        original_message_id,
        daticert,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(headers: &str, tipo: &str, msgid: &str) -> Vec<u8> {
        format!(
            "{headers}From: posta-certificata@pec.example.it\r\n\
             Subject: ACCETTAZIONE: prova\r\n\
             MIME-Version: 1.0\r\n\
             Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n\
             --b\r\nContent-Type: text/plain\r\n\r\nRicevuta\r\n\
             --b\r\nContent-Type: application/xml; name=\"daticert.xml\"\r\n\
             Content-Disposition: attachment; filename=\"daticert.xml\"\r\n\r\n\
             <postacert tipo=\"{tipo}\" errore=\"nessuno\"><dati><msgid>{msgid}</msgid>\
             <identificativo>opec1@pec.example.it</identificativo></dati></postacert>\r\n\
             --b--\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn headers_decide_and_daticert_must_agree() {
        let c = classify(&receipt(
            "X-Ricevuta: accettazione\r\nX-Riferimento-Message-ID: <m1@studio.it>\r\n",
            "accettazione",
            "&lt;m1@studio.it&gt;",
        ));
        assert_eq!(c.kind, Kind::Acceptance);
        assert_eq!(c.original_message_id.as_deref(), Some("m1@studio.it"));
        assert_eq!(
            c.daticert.unwrap().identificativo.as_deref(),
            Some("opec1@pec.example.it")
        );
        // Mixed-case names; the Message-ID from daticert when the header is missing.
        let c = classify(&receipt(
            "x-ricevuta: Avvenuta-Consegna\r\n",
            "avvenuta-consegna",
            "m2@studio.it",
        ));
        assert_eq!(c.kind, Kind::Delivery);
        assert_eq!(c.original_message_id.as_deref(), Some("m2@studio.it"));
        // Disagreement is not guessed away.
        let c = classify(&receipt(
            "X-Ricevuta: accettazione\r\n",
            "errore-consegna",
            "m3@x",
        ));
        assert_eq!(c.kind, Kind::Unknown);
        assert!(c.note.unwrap().contains("daticert.xml says"));
    }

    #[test]
    fn the_subject_alone_decides_nothing() {
        let raw = b"From: a@b\r\nSubject: CONSEGNA: fattura\r\n\r\nciao\r\n";
        assert_eq!(classify(raw).kind, Kind::Ordinary);
        let raw = b"From: a@b\r\nX-Ricevuta: something-new\r\n\r\nciao\r\n";
        assert_eq!(classify(raw).kind, Kind::Unknown);
        let raw = b"From: a@b\r\nX-Trasporto: posta-certificata\r\n\r\nciao\r\n";
        assert_eq!(classify(raw).kind, Kind::Envelope);
    }
}
