//! The monitoring endpoint (`[metrics] listen`, off by default): `/metrics` (see
//! [`crate::metrics`]) and `/health` (200 while the audit log is writable, 503 otherwise).
//! One request per connection, answered in line within 5 s: scrapes are rare and cheap, and
//! nothing here can hold a session up.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::gateway::Live;

/// What one HTTP request asked for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    Health,
    NotFound,
    BadMethod,
}

/// The route of a request line (`GET /metrics HTTP/1.1`); anything unparseable is not found.
fn route(request: &[u8]) -> Route {
    let line = request.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut words = line.split(|&b| b == b' ');
    let (method, path) = (
        words.next().unwrap_or_default(),
        words.next().unwrap_or_default(),
    );
    let path = path.split(|&b| b == b'?').next().unwrap_or_default();
    match (method, path) {
        (b"GET" | b"HEAD", b"/metrics") => Route::Metrics,
        (b"GET" | b"HEAD", b"/health") => Route::Health,
        (b"GET" | b"HEAD", _) => Route::NotFound,
        _ => Route::BadMethod,
    }
}

/// Serve `/metrics` and `/health` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, live: Live, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => return,
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        // One request per connection, answered in line: scrapes are rare and cheap.
        let _ = tokio::time::timeout(Duration::from_secs(5), answer(stream, &live)).await;
    }
}

async fn answer(mut stream: tokio::net::TcpStream, live: &Live) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let gateway = live.current();
    let (status, content_type, body) = match route(&request) {
        Route::Metrics => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            gateway.metrics.render(
                gateway.registry.counts(),
                gateway.config.mailboxes.keys().cloned(),
                gateway.carried.provider_connections(),
                gateway.audit.queue_depth(),
            ),
        ),
        Route::Health if gateway.audit.is_healthy() => (
            "200 OK",
            "text/plain",
            "ok: audit log writable\n".to_owned(),
        ),
        Route::Health => (
            "503 Service Unavailable",
            "text/plain",
            "unavailable: the audit log cannot be written\n".to_owned(),
        ),
        Route::NotFound => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        Route::BadMethod => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_owned(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if !request.starts_with(b"HEAD") {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\n"), Route::Metrics);
        assert_eq!(route(b"GET /health?x=1 HTTP/1.0\r\n"), Route::Health);
        assert_eq!(route(b"GET / HTTP/1.1\r\n"), Route::NotFound);
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n"), Route::BadMethod);
        assert_eq!(route(b"\xff\xfe"), Route::BadMethod);
    }
}
