//! Modified UTF-7, the encoding of IMAP mailbox names (RFC 3501 section 5.1.3).
//!
//! Policy decisions compare folder names as Unicode text, so every name a client sends is
//! decoded first. [`decode_canonical`] also insists that the name is in the one canonical
//! encoding: a client must not reach a folder through an alternative spelling of its name
//! (ASCII hidden in base64, split base64 runs, stray bits) that the policy and the provider
//! might read differently.

use base64::Engine;
use base64::alphabet::Alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

/// RFC 3501's base64 variant: `,` instead of `/`, no padding.
fn engine() -> GeneralPurpose {
    let alphabet =
        Alphabet::new("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,")
            .expect("valid alphabet");
    GeneralPurpose::new(
        &alphabet,
        GeneralPurposeConfig::new()
            .with_encode_padding(false)
            .with_decode_padding_mode(DecodePaddingMode::RequireNone)
            .with_decode_allow_trailing_bits(false),
    )
}

/// Encode Unicode text as modified UTF-7.
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut pending: Vec<u16> = Vec::new();
    let flush = |pending: &mut Vec<u16>, out: &mut String| {
        if pending.is_empty() {
            return;
        }
        let bytes: Vec<u8> = pending.iter().flat_map(|u| u.to_be_bytes()).collect();
        out.push('&');
        out.push_str(&engine().encode(bytes));
        out.push('-');
        pending.clear();
    };
    for c in text.chars() {
        if (' '..='~').contains(&c) {
            flush(&mut pending, &mut out);
            if c == '&' {
                out.push_str("&-");
            } else {
                out.push(c);
            }
        } else {
            let mut units = [0u16; 2];
            pending.extend_from_slice(c.encode_utf16(&mut units));
        }
    }
    flush(&mut pending, &mut out);
    out
}

/// Why a name is not canonical modified UTF-7.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Mutf7Error {
    #[error("byte outside printable US-ASCII")]
    RawByte,
    #[error("unterminated or malformed base64 run")]
    Malformed,
    #[error("not valid UTF-16")]
    BadUtf16,
    #[error("not the canonical encoding of the name")]
    NotCanonical,
}

/// Decode a wire name, accepting only its canonical encoding.
pub fn decode_canonical(wire: &[u8]) -> Result<String, Mutf7Error> {
    let mut out = String::with_capacity(wire.len());
    let mut i = 0;
    while i < wire.len() {
        let b = wire[i];
        if !(0x20..=0x7e).contains(&b) {
            return Err(Mutf7Error::RawByte);
        }
        if b != b'&' {
            out.push(b as char);
            i += 1;
            continue;
        }
        let end = wire[i + 1..]
            .iter()
            .position(|&c| c == b'-')
            .map(|p| i + 1 + p)
            .ok_or(Mutf7Error::Malformed)?;
        let run = &wire[i + 1..end];
        if run.is_empty() {
            out.push('&');
        } else {
            let bytes = engine().decode(run).map_err(|_| Mutf7Error::Malformed)?;
            if bytes.len() % 2 != 0 {
                return Err(Mutf7Error::Malformed);
            }
            let units: Vec<u16> = bytes
                .chunks_exact(2)
                .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
                .collect();
            let text = String::from_utf16(&units).map_err(|_| Mutf7Error::BadUtf16)?;
            out.push_str(&text);
        }
        i = end + 1;
    }
    if encode(&out).as_bytes() != wire {
        return Err(Mutf7Error::NotCanonical);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let cases = [
            ("INBOX", "INBOX"),
            ("Riservat\u{e0}", "Riservat&AOA-"),
            ("R&D", "R&-D"),
            (
                "~peter/mail/\u{53f0}\u{5317}/\u{65e5}\u{672c}\u{8a9e}",
                "~peter/mail/&U,BTFw-/&ZeVnLIqe-",
            ),
            ("\u{1f600}", "&2D3eAA-"),
            ("", ""),
        ];
        for (text, wire) in cases {
            assert_eq!(encode(text), wire);
            assert_eq!(decode_canonical(wire.as_bytes()).as_deref(), Ok(text));
        }
    }

    #[test]
    fn rejects_alternative_spellings() {
        let cases: &[(&[u8], Mutf7Error)] = &[
            // "a" hidden in base64.
            (b"&AGE-", Mutf7Error::NotCanonical),
            // Two runs where the canonical form has one.
            (b"&AOA-&AOA-", Mutf7Error::NotCanonical),
            (b"Riservat\xc3\xa0", Mutf7Error::RawByte),
            (b"Ris&AOA", Mutf7Error::Malformed),
            (b"&AO-", Mutf7Error::Malformed),
            (b"&AOA=-", Mutf7Error::Malformed),
            // A lone surrogate.
            (b"&2D0-", Mutf7Error::BadUtf16),
            (b"tab\there", Mutf7Error::RawByte),
        ];
        for (wire, want) in cases {
            assert_eq!(
                decode_canonical(wire),
                Err(*want),
                "{}",
                String::from_utf8_lossy(wire)
            );
        }
    }
}
