//! The control socket: `state_dir/control.sock`, a Unix socket only pecgate's own user can
//! reach (mode 0600, in a 0700 directory), through which `pecgate sessions` lists the
//! sessions logged in and `pecgate sessions kick USER` ends a user's sessions at once.
//!
//! One request line per connection, one answer: `sessions` → a JSON array of
//! [`SessionInfo`]; `kick USER` → `{"ended": N}`; anything else → `{"error": "..."}`. Every
//! kick is an audit event (`protocol = system`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::audit::{AuditEvent, Outcome, Protocol};
use crate::gateway::Live;
use crate::registry::SessionInfo;

/// File name of the socket inside `state_dir`.
pub const SOCKET_NAME: &str = "control.sock";

/// Errors of the control socket, on either side.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot reach pecgate's control socket {} (is pecgate running, and are you its user?): {source}", path.display())]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("unexpected answer from pecgate: {0}")]
    Answer(String),
}

/// Bind the socket (replacing a stale one left by a crash), readable only by this user.
pub fn bind(state_dir: &Path) -> Result<UnixListener, ControlError> {
    let path = state_dir.join(SOCKET_NAME);
    let io = |source| ControlError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let listener = UnixListener::bind(&path).map_err(io)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// Answer requests until `shutdown`.
pub async fn serve(listener: UnixListener, live: Live, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), answer(stream, &live)).await;
    }
    if let Ok(address) = listener.local_addr()
        && let Some(path) = address.as_pathname()
    {
        let _ = std::fs::remove_file(path);
    }
}

async fn answer(stream: UnixStream, live: &Live) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(4096)).read_line(&mut line).await?;
    let reply = handle(line.trim(), live).await;
    write.write_all(reply.as_bytes()).await?;
    write.write_all(b"\n").await?;
    write.shutdown().await
}

async fn handle(request: &str, live: &Live) -> String {
    let gateway = live.current();
    let mut words = request.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("sessions"), None, None) => {
            serde_json::to_string(&gateway.registry.list()).expect("sessions serialise")
        }
        (Some("kick"), Some(user), None) => {
            let ended = gateway.registry.end_where(|s| {
                (s.user == user).then(|| "ended by an administrator".to_owned())
            });
            gateway.metrics.revoked(ended);
            tracing::warn!(user, sessions = ended, "sessions kicked by an administrator");
            let _ = gateway
                .audit
                .record_durable(AuditEvent {
                    ts: SystemTime::now(),
                    session: "control".to_owned(),
                    user: Some(user.to_owned()),
                    mailbox: None,
                    peer: "control-socket".to_owned(),
                    protocol: Protocol::System,
                    command: "kick".to_owned(),
                    folder: None,
                    detail: format!("sessions={ended}"),
                    outcome: Outcome::Ok,
                })
                .await;
            format!("{{\"ended\": {ended}}}")
        }
        _ => serde_json::json!({ "error": format!("unknown request {request:?}: use `sessions` or `kick USER`") })
            .to_string(),
    }
}

/// Client side: send one request to the daemon whose state is in `state_dir`.
async fn request(state_dir: &Path, line: &str) -> Result<String, ControlError> {
    let path = state_dir.join(SOCKET_NAME);
    let mut stream = UnixStream::connect(&path)
        .await
        .map_err(|source| ControlError::Connect {
            path: path.clone(),
            source,
        })?;
    let io = |source| ControlError::Io {
        path: path.clone(),
        source,
    };
    stream.write_all(line.as_bytes()).await.map_err(io)?;
    stream.write_all(b"\n").await.map_err(io)?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .await
        .map_err(io)?;
    Ok(reply)
}

/// The sessions logged in now.
pub async fn sessions(state_dir: &Path) -> Result<Vec<SessionInfo>, ControlError> {
    let reply = request(state_dir, "sessions").await?;
    serde_json::from_str(&reply).map_err(|_| ControlError::Answer(reply.trim().to_owned()))
}

/// End `user`'s sessions; how many were ended.
pub async fn kick(state_dir: &Path, user: &str) -> Result<u64, ControlError> {
    let reply = request(state_dir, &format!("kick {user}")).await?;
    let value: serde_json::Value =
        serde_json::from_str(&reply).map_err(|_| ControlError::Answer(reply.trim().to_owned()))?;
    value["ended"]
        .as_u64()
        .ok_or_else(|| ControlError::Answer(reply.trim().to_owned()))
}
