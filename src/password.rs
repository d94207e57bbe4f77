//! Employee password hashing (argon2id, PHC strings) and password entry.
//!
//! Employee passwords live in the config file only as argon2id PHC strings
//! produced by `pecgate hash-password`. The daemon verifies logins against
//! them; users that do not exist are verified against a fixed dummy hash so
//! that "unknown user" and "wrong password" take the same time.

use std::io::{self, BufRead, IsTerminal};
use std::sync::OnceLock;

use argon2::password_hash::{PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Params, PasswordHasher, PasswordVerifier};
use zeroize::Zeroizing;

/// Errors from hashing or reading passwords. None of them carries the
/// password or the hash.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("cannot hash password: {0}")]
    Hash(argon2::password_hash::Error),
    #[error("not an argon2id password hash: {reason}")]
    NotArgon2id { reason: String },
    #[error("cannot read password: {0}")]
    Io(#[from] io::Error),
    #[error("the passwords do not match")]
    Mismatch,
    #[error("the password is empty")]
    Empty,
}

/// A hash of a password nobody knows, with argon2's default parameters (the
/// ones [`hash_password`] uses), so verifying against it costs the same as
/// verifying a real user's hash. Precomputed so the first unknown-user login
/// does not pay for an extra hash.
const DUMMY_PHC: &str = "$argon2id$v=19$m=19456,t=2,p=1$7id3p0/dIJeTwMvnO5bylw$yZ0dpIdm/Olw+E9y4yStvCpq6JCs9waHhjMS4BvGcCs";

/// Hashes `password` with argon2id, argon2's default cost parameters
/// (m=19456 KiB, t=2, p=1) and a fresh random salt; returns the PHC string.
pub fn hash_password(password: &[u8]) -> Result<String, PasswordError> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    let hash = Argon2::default()
        .hash_password(password, &salt)
        .map_err(PasswordError::Hash)?;
    Ok(hash.to_string())
}

/// Checks that `phc` is a usable argon2id PHC string (what the config demands
/// of `users.*.password`). The error never repeats the string.
pub fn check_phc(phc: &str) -> Result<(), PasswordError> {
    let not_argon2id = |reason: &str| PasswordError::NotArgon2id {
        reason: reason.to_owned(),
    };
    let hash =
        PasswordHash::new(phc).map_err(|e| not_argon2id(&format!("malformed PHC string ({e})")))?;
    if hash.algorithm != Algorithm::Argon2id.ident() {
        return Err(not_argon2id("the algorithm is not argon2id"));
    }
    Params::try_from(&hash).map_err(|e| not_argon2id(&format!("bad parameters ({e})")))?;
    if hash.salt.is_none() || hash.hash.is_none() {
        return Err(not_argon2id("salt or hash output missing"));
    }
    Ok(())
}

/// Verifies `password` against an argon2id PHC string. The comparison inside
/// argon2 is constant-time; a malformed or non-argon2id hash never matches.
pub fn verify_password(phc: &str, password: &[u8]) -> bool {
    let Ok(hash) = PasswordHash::new(phc) else {
        return false;
    };
    // Only argon2id is accepted for logins, matching what the config
    // validation allows; argon2 would otherwise also verify argon2i/argon2d.
    if hash.algorithm != Algorithm::Argon2id.ident() {
        return false;
    }
    Argon2::default().verify_password(password, &hash).is_ok()
}

/// Burns the time of one real verification, for logins naming a user that
/// does not exist (or is disabled), so timing does not reveal which user
/// names exist. Only equalises timing with hashes that use the default
/// parameters, i.e. ones made by [`hash_password`].
pub fn verify_against_dummy(password: &[u8]) {
    static DUMMY: OnceLock<PasswordHash<'static>> = OnceLock::new();
    let hash = DUMMY.get_or_init(|| PasswordHash::new(DUMMY_PHC).expect("dummy hash is valid"));
    // The result is meaningless; the point is the work.
    let _ = std::hint::black_box(Argon2::default().verify_password(password, hash));
}

/// Reads a password for the CLI (`hash-password`, `vault set`).
///
/// On a terminal it prompts without echo (twice when `confirm`, and both
/// entries must match). Otherwise, so that scripts can pipe a password in, it
/// reads exactly one line from stdin, dropping the line ending. An empty
/// password is an error either way.
pub fn read_password_interactive(
    prompt: &str,
    confirm: bool,
) -> Result<Zeroizing<String>, PasswordError> {
    if !io::stdin().is_terminal() {
        return read_password_line(&mut io::stdin().lock());
    }
    let first = Zeroizing::new(rpassword::prompt_password(prompt)?);
    if first.is_empty() {
        return Err(PasswordError::Empty);
    }
    if confirm {
        let second = Zeroizing::new(rpassword::prompt_password("Repeat to confirm: ")?);
        if *first != *second {
            return Err(PasswordError::Mismatch);
        }
    }
    Ok(first)
}

/// Reads one line from `reader` as a password, stripping a trailing `\n` or
/// `\r\n`. End of input before any character counts as an empty password.
pub fn read_password_line<R: BufRead + ?Sized>(
    reader: &mut R,
) -> Result<Zeroizing<String>, PasswordError> {
    // Reserve up front so that typical passwords never make the string
    // reallocate, which would leave an unzeroized copy on the heap.
    let mut line = Zeroizing::new(String::with_capacity(1024));
    reader.read_line(&mut line)?;
    if line.ends_with('\n') {
        line.pop();
        if line.ends_with('\r') {
            line.pop();
        }
    }
    if line.is_empty() {
        return Err(PasswordError::Empty);
    }
    Ok(line)
}

/// `authzid NUL authcid NUL password` (RFC 4616); an authzid other than empty or the authcid is
/// refused (pecgate has no proxy authorisation).
pub fn parse_sasl_plain(response: &[u8]) -> Option<(String, Zeroizing<Vec<u8>>)> {
    let mut parts = response.split(|&b| b == 0);
    let authzid = parts.next()?;
    let authcid = parts.next()?;
    let password = parts.next()?;
    if parts.next().is_some() || authcid.is_empty() {
        return None;
    }
    if !authzid.is_empty() && authzid != authcid {
        return None;
    }
    let login = std::str::from_utf8(authcid).ok()?.to_owned();
    Some((login, Zeroizing::new(password.to_vec())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_verify_round_trip() {
        let phc = hash_password(b"correct horse").unwrap();
        assert!(phc.starts_with("$argon2id$"), "{phc}");
        assert!(phc.contains("m=19456,t=2,p=1"), "{phc}");
        assert!(check_phc(&phc).is_ok());
        assert!(verify_password(&phc, b"correct horse"));
        assert!(!verify_password(&phc, b"correct horsf"));
        assert!(!verify_password(&phc, b""));
    }

    #[test]
    fn salts_differ() {
        assert_ne!(hash_password(b"x").unwrap(), hash_password(b"x").unwrap());
    }

    #[test]
    fn malformed_hashes_never_verify() {
        for phc in [
            "",
            "plaintext",
            "$argon2id$",
            "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ",
            // A valid argon2i hash: right shape, wrong algorithm.
            "$argon2i$v=19$m=16,t=2,p=1$c2FsdHNhbHQ$vBaNuXkCu4w7JoGJ4Y8i6A",
            "$2b$12$abcdefghijklmnopqrstuuM7Qk1Jc3hbK5T9nqR0pQ0Dd0n5e1H1i",
        ] {
            assert!(!verify_password(phc, b"password"), "{phc:?}");
            assert!(check_phc(phc).is_err(), "{phc:?}");
        }
    }

    #[test]
    fn check_phc_error_does_not_echo_the_hash() {
        let phc = "$argon2i$v=19$m=16,t=2,p=1$c2FsdHNhbHQ$vBaNuXkCu4w7JoGJ4Y8i6A";
        let msg = check_phc(phc).unwrap_err().to_string();
        assert!(!msg.contains("c2FsdHNhbHQ"), "{msg}");
    }

    #[test]
    fn dummy_hash_uses_default_params() {
        let hash = PasswordHash::new(DUMMY_PHC).unwrap();
        assert!(check_phc(DUMMY_PHC).is_ok());
        let params = Params::try_from(&hash).unwrap();
        let default = Params::default();
        assert_eq!(
            (params.m_cost(), params.t_cost(), params.p_cost()),
            (default.m_cost(), default.t_cost(), default.p_cost())
        );
        assert_eq!(hash.hash.unwrap().len(), Params::DEFAULT_OUTPUT_LEN);
        verify_against_dummy(b"anything");
    }

    #[test]
    fn password_line_reading() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (b"secret\n", Some("secret")),
            (b"secret\r\n", Some("secret")),
            (b"secret", Some("secret")),
            (b"with space \nsecond line\n", Some("with space ")),
            (b"\n", None),
            (b"", None),
        ];
        for (input, expected) in cases {
            let got = read_password_line(&mut &input[..]);
            match expected {
                Some(want) => assert_eq!(got.unwrap().as_str(), *want),
                None => assert!(matches!(got, Err(PasswordError::Empty))),
            }
        }
    }

    #[test]
    fn sasl_plain() {
        let (login, pw) = parse_sasl_plain(b"\0mario\0secret").unwrap();
        assert_eq!((login.as_str(), pw.as_slice()), ("mario", &b"secret"[..]));
        assert!(parse_sasl_plain(b"mario\0mario\0pw").is_some());
        assert!(parse_sasl_plain(b"admin\0mario\0pw").is_none());
        assert!(parse_sasl_plain(b"\0\0pw").is_none());
        assert!(parse_sasl_plain(b"mario-pw").is_none());
        assert!(parse_sasl_plain(b"\0a\0b\0c").is_none());
    }
}
