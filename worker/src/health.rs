//! The worker's HTTP endpoints: `/healthz` (alive), `/readyz` (connected to the broker and
//! consuming), `/metrics` (Prometheus). Off unless `--listen` (or `worker.listen`) is set.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::metrics::Metrics;

/// Whether the worker is connected and consuming, and whether the broker blocks it;
/// flipped by the supervisor and the broker watcher.
#[derive(Clone, Default)]
pub struct Readiness {
    consuming: Arc<AtomicBool>,
    blocked: Arc<AtomicBool>,
}

impl Readiness {
    /// Mark the worker consuming or not.
    pub fn set(&self, ready: bool) {
        self.consuming.store(ready, Ordering::SeqCst);
    }
    /// Mark the worker's publishing connection blocked by a broker alarm, or not.
    pub fn set_blocked(&self, blocked: bool) {
        self.blocked.store(blocked, Ordering::SeqCst);
    }
    /// True while connected and consuming, and not blocked.
    pub fn get(&self) -> bool {
        self.consuming.load(Ordering::SeqCst) && !self.blocked.load(Ordering::SeqCst)
    }
    fn blocked(&self) -> bool {
        self.blocked.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct AppState {
    ready: Readiness,
    metrics: Metrics,
}

/// Bind `addr` and serve the endpoints in the background. Binding errors are returned, so
/// a taken port stops the worker at start with a clear message.
pub async fn serve(
    addr: &str,
    ready: Readiness,
    metrics: Metrics,
) -> anyhow::Result<std::net::SocketAddr> {
    use anyhow::Context;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { ready, metrics });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    tracing::info!(%local, "serving /healthz, /readyz and /metrics");
    Ok(local)
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.ready.get() {
        (StatusCode::OK, "ready\n")
    } else if state.ready.blocked() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "blocked: a broker resource alarm stops publishing\n",
        )
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

/// `sluice-worker healthcheck`: GET a URL and succeed on 2xx, for container HEALTHCHECKs
/// in images that have no shell or curl.
pub async fn check(url: &str) -> anyhow::Result<()> {
    use anyhow::{bail, Context};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url
        .strip_prefix("http://")
        .context("healthcheck URL must start with http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let io = async {
        let mut stream = tokio::net::TcpStream::connect(authority).await?;
        let request =
            format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(std::time::Duration::from_secs(5), io)
        .await
        .context("healthcheck timed out")?
        .with_context(|| format!("cannot reach {url}"))?;
    let status_line = String::from_utf8_lossy(&response);
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("not an HTTP response")?;
    if !(200..300).contains(&status) {
        bail!("{url} answered {status}");
    }
    Ok(())
}
