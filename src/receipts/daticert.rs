//! `daticert.xml`: the certification data every PEC receipt and envelope carries (DPCM 2005
//! technical annex; see the shared PEC reference). Parsed with quick-xml into [`Daticert`];
//! what a provider writes loosely (a `msgid` XML-escaped, without brackets, URL-encoded or
//! missing; a `zona` such as `+0100`) is normalised here, in one place.

use quick_xml::events::Event;
use quick_xml::reader::Reader;

/// Why a daticert could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DaticertError {
    #[error("daticert.xml is not well-formed XML: {0}")]
    Xml(String),
    #[error("daticert.xml has no <postacert tipo=...>")]
    NotPostacert,
    #[error("daticert.xml: invalid date or time {0:?}")]
    Date(String),
}

/// A recipient as the certification data lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Recipient {
    pub address: String,
    /// `certificato` (a PEC mailbox) or `esterno` (ordinary mail: no delivery receipt).
    pub certified: bool,
}

/// The certification data of one receipt or envelope.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Daticert {
    /// `postacert/@tipo`: accettazione, avvenuta-consegna, ...
    pub tipo: String,
    /// `postacert/@errore`: nessuno, no-dest, no-dominio, virus, altro.
    pub errore: String,
    pub mittente: Option<String>,
    pub destinatari: Vec<Recipient>,
    pub oggetto: Option<String>,
    pub gestore: Option<String>,
    /// `dati/data` with `giorno`, `ora` and `zona`, as RFC 3339 (UTC offset kept).
    pub at: Option<String>,
    /// The provider's id for the submission (the envelope's Message-ID).
    pub identificativo: Option<String>,
    /// The original Message-ID, normalised (no brackets), when present and readable.
    pub msgid: Option<String>,
    /// `ricevuta/@tipo`: completa, breve, sintetica.
    pub ricevuta: Option<String>,
    /// The recipient a delivery (or failure) receipt is for.
    pub consegna: Option<String>,
    pub errore_esteso: Option<String>,
}

/// A Message-ID as providers write it, normalised: unfolded and trimmed, `%3C`/`%3E` and
/// XML escapes already undone by the caller or here, one pair of angle brackets dropped.
/// `None` when nothing is left.
pub fn normalise_message_id(raw: &str) -> Option<String> {
    let unfolded: String = raw
        .split(['\r', '\n'])
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("");
    let mut text = unfolded.trim().to_owned();
    for (escaped, plain) in [("&lt;", "<"), ("&gt;", ">"), ("&amp;", "&")] {
        text = text.replace(escaped, plain);
    }
    let lower = text.to_ascii_lowercase();
    if lower.starts_with("%3c") && lower.ends_with("%3e") && text.len() >= 6 {
        text = text[3..text.len() - 3].to_owned();
    }
    let mut text = text.as_str();
    while let Some(inner) = text.strip_prefix('<').and_then(|t| t.strip_suffix('>')) {
        text = inner.trim();
    }
    (!text.is_empty()).then(|| text.to_owned())
}

/// `giorno` (dd/mm/yyyy), `ora` (hh:mm:ss) and `zona` (+hhmm) as RFC 3339.
fn timestamp(giorno: &str, ora: &str, zona: &str) -> Result<String, DaticertError> {
    let bad = || DaticertError::Date(format!("{giorno} {ora} {zona}"));
    let date = time::Date::parse(
        giorno.trim(),
        time::macros::format_description!("[day]/[month]/[year]"),
    )
    .map_err(|_| bad())?;
    let clock = time::Time::parse(
        ora.trim(),
        time::macros::format_description!("[hour]:[minute]:[second]"),
    )
    .map_err(|_| bad())?;
    let zona = zona.trim();
    let offset = if zona.is_empty() {
        time::UtcOffset::UTC
    } else {
        time::UtcOffset::parse(
            zona,
            time::macros::format_description!("[offset_hour sign:mandatory][offset_minute]"),
        )
        .map_err(|_| bad())?
    };
    time::PrimitiveDateTime::new(date, clock)
        .assume_offset(offset)
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(|_| bad())
}

/// Parse `daticert.xml`.
pub fn parse(xml: &[u8]) -> Result<Daticert, DaticertError> {
    let mut reader = Reader::from_reader(xml);
    reader.config_mut().trim_text(true);
    let mut out = Daticert::default();
    let mut path: Vec<String> = Vec::new();
    let mut pending_recipient_certified = true;
    let (mut giorno, mut ora, mut zona) = (String::new(), String::new(), String::new());
    let mut seen_postacert = false;
    let mut buf = Vec::new();
    loop {
        let event = reader
            .read_event_into(&mut buf)
            .map_err(|e| DaticertError::Xml(e.to_string()))?;
        match event {
            Event::Start(ref start) | Event::Empty(ref start) => {
                let name =
                    String::from_utf8_lossy(start.local_name().as_ref()).to_ascii_lowercase();
                let attribute =
                    |wanted: &str| -> Option<String> {
                        start.attributes().flatten().find_map(|a| {
                            a.key
                                .local_name()
                                .as_ref()
                                .eq_ignore_ascii_case(wanted.as_bytes())
                                .then(|| {
                                    a.unescape_value().map(|v| v.into_owned()).unwrap_or_else(
                                        |_| String::from_utf8_lossy(&a.value).into_owned(),
                                    )
                                })
                        })
                    };
                match name.as_str() {
                    "postacert" => {
                        seen_postacert = true;
                        out.tipo = attribute("tipo").unwrap_or_default().trim().to_owned();
                        out.errore = attribute("errore").unwrap_or_default().trim().to_owned();
                    }
                    "destinatari" => {
                        pending_recipient_certified = attribute("tipo")
                            .is_none_or(|t| !t.trim().eq_ignore_ascii_case("esterno"));
                    }
                    "data" => zona = attribute("zona").unwrap_or_default(),
                    "ricevuta" => out.ricevuta = attribute("tipo").map(|t| t.trim().to_owned()),
                    _ => {}
                }
                if matches!(event, Event::Start(_)) {
                    path.push(name);
                }
            }
            Event::End(_) => {
                path.pop();
            }
            Event::Text(text) => {
                let value = text
                    .unescape()
                    .map(|v| v.into_owned())
                    .unwrap_or_else(|_| String::from_utf8_lossy(&text).into_owned());
                let value = value.trim().to_owned();
                match path.last().map(String::as_str) {
                    Some("mittente") => out.mittente = Some(value),
                    Some("destinatari") => out.destinatari.push(Recipient {
                        address: value,
                        certified: pending_recipient_certified,
                    }),
                    Some("oggetto") => out.oggetto = Some(value),
                    Some("gestore-emittente") => out.gestore = Some(value),
                    Some("giorno") => giorno = value,
                    Some("ora") => ora = value,
                    Some("identificativo") => out.identificativo = normalise_message_id(&value),
                    Some("msgid") => out.msgid = normalise_message_id(&value),
                    Some("consegna") => out.consegna = Some(value),
                    Some("errore-esteso") => out.errore_esteso = Some(value),
                    _ => {}
                }
            }
            Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    if !seen_postacert || out.tipo.is_empty() {
        return Err(DaticertError::NotPostacert);
    }
    if !giorno.is_empty() {
        out.at = Some(timestamp(&giorno, &ora, &zona)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DELIVERY: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<postacert tipo="avvenuta-consegna" errore="nessuno">
  <intestazione>
    <mittente>studio@pec.example.it</mittente>
    <destinatari tipo="certificato">comune@pec.example.it</destinatari>
    <destinatari tipo="esterno">mario@example.com</destinatari>
    <risposte>studio@pec.example.it</risposte>
    <oggetto>Fattura n° 42 &amp; allegati</oggetto>
  </intestazione>
  <dati>
    <gestore-emittente>Provider S.p.A.</gestore-emittente>
    <data zona="+0200">
      <giorno>29/06/2026</giorno>
      <ora>14:05:09</ora>
    </data>
    <identificativo>opec21.20260629140509.12345.06.1.5@pec.example.it</identificativo>
    <msgid>&lt;abc.123@studio.example.it&gt;</msgid>
    <ricevuta tipo="breve"/>
    <consegna>comune@pec.example.it</consegna>
  </dati>
</postacert>"#;

    #[test]
    fn a_delivery_receipt_is_read_whole() {
        let d = parse(DELIVERY.as_bytes()).unwrap();
        assert_eq!(d.tipo, "avvenuta-consegna");
        assert_eq!(d.errore, "nessuno");
        assert_eq!(d.msgid.as_deref(), Some("abc.123@studio.example.it"));
        assert_eq!(
            d.identificativo.as_deref(),
            Some("opec21.20260629140509.12345.06.1.5@pec.example.it")
        );
        assert_eq!(d.consegna.as_deref(), Some("comune@pec.example.it"));
        assert_eq!(d.ricevuta.as_deref(), Some("breve"));
        assert_eq!(d.at.as_deref(), Some("2026-06-29T14:05:09+02:00"));
        assert_eq!(d.oggetto.as_deref(), Some("Fattura n° 42 & allegati"));
        assert_eq!(
            d.destinatari,
            [
                Recipient {
                    address: "comune@pec.example.it".into(),
                    certified: true
                },
                Recipient {
                    address: "mario@example.com".into(),
                    certified: false
                }
            ]
        );
    }

    #[test]
    fn message_ids_are_normalised_however_written() {
        for raw in [
            "<abc@x.it>",
            "&lt;abc@x.it&gt;",
            "abc@x.it",
            "  <abc@x.it>\r\n ",
            "%3Cabc@x.it%3E",
            "&lt;&lt;abc@x.it&gt;&gt;",
        ] {
            assert_eq!(
                normalise_message_id(raw).as_deref(),
                Some("abc@x.it"),
                "{raw}"
            );
        }
        assert_eq!(normalise_message_id(" <> "), None);
    }

    #[test]
    fn broken_inputs_are_errors_not_panics() {
        assert!(matches!(
            parse(b"<postacert"),
            Err(DaticertError::Xml(_)) | Err(DaticertError::NotPostacert)
        ));
        assert_eq!(parse(b"<other/>"), Err(DaticertError::NotPostacert));
        let bad_date = DELIVERY.replace("29/06/2026", "31/02/2026");
        assert!(matches!(
            parse(bad_date.as_bytes()),
            Err(DaticertError::Date(_))
        ));
    }
}
