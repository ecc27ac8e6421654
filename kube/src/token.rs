//! The bearer token: a tower layer that sets `Authorization` on every
//! request from a token that is re-read from its file every
//! [`TOKEN_RELOAD`] and right after a 401.
//!
//! kube-rs has a token-file source of its own, but it re-reads only on a
//! timer: after the kubelet rotates a token in place, requests would fail
//! with 401 for up to a minute. Here the 401 itself marks the token stale,
//! so the next request carries the new one.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::AUTHORIZATION;
use http::{HeaderValue, Request, Response, StatusCode};
use tower::{BoxError, Layer, Service};

use super::KubeError;

/// How long a token read from a token file is used before the file is
/// read again (client-go's cached token source uses a minute too).
pub const TOKEN_RELOAD: Duration = Duration::from_secs(60);

/// Where the token comes from and the one in use.
pub(super) struct TokenSource {
    file: Option<PathBuf>,
    state: Mutex<Cached>,
}

struct Cached {
    token: Option<String>,
    /// `None`: read the file before the next request.
    read_at: Option<Instant>,
}

impl TokenSource {
    /// A literal token, or a token file read now: a file missing or empty
    /// at start is a configuration error; later read failures keep the
    /// token read before.
    pub(super) fn new(token: Option<String>, file: Option<PathBuf>) -> Result<Self, KubeError> {
        let mut cached = Cached { token, read_at: None };
        if let Some(path) = &file {
            // Start-up only: one read of a small local file, before the
            // client exists.
            let text = std::fs::read_to_string(path).map_err(|e| read_error(path, &e))?;
            cached.token = Some(check_token(path, &text)?);
            cached.read_at = Some(Instant::now());
        }
        Ok(Self { file, state: Mutex::new(cached) })
    }

    /// The token for the next request, reading the file again (on the
    /// blocking pool, through tokio::fs) when it is stale.
    async fn current(&self) -> Option<String> {
        let stale = {
            let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            match (&self.file, state.read_at) {
                (Some(path), None) => Some(path.clone()),
                (Some(path), Some(at)) if at.elapsed() >= TOKEN_RELOAD => Some(path.clone()),
                _ => None,
            }
        };
        if let Some(path) = stale {
            let read = tokio::fs::read_to_string(&path)
                .await
                .map_err(|e| read_error(&path, &e))
                .and_then(|text: String| check_token(&path, &text));
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            match read {
                Ok(token) => state.token = Some(token),
                Err(error) => tracing::warn!(%error, "keeping the bearer token read before"),
            }
            state.read_at = Some(Instant::now());
        }
        self.state.lock().unwrap_or_else(PoisonError::into_inner).token.clone()
    }

    /// A 401: the token may have been rotated; read the file again before
    /// the next request.
    fn refused(&self) {
        if self.file.is_some() {
            self.state.lock().unwrap_or_else(PoisonError::into_inner).read_at = None;
        }
    }
}

fn read_error(path: &Path, error: &std::io::Error) -> KubeError {
    KubeError::BadConfig(format!("reading the bearer token {}: {error}", path.display()))
}

/// The token in `text`, trimmed; an empty file is an error.
fn check_token(path: &Path, text: &str) -> Result<String, KubeError> {
    let token = text.trim();
    if token.is_empty() {
        return Err(KubeError::BadConfig(format!("the bearer token file {} is empty", path.display())));
    }
    Ok(token.to_string())
}

/// Adds the bearer token to every request; see the module docs.
#[derive(Clone)]
pub(super) struct BearerLayer {
    source: Arc<TokenSource>,
}

impl BearerLayer {
    pub(super) fn new(source: Arc<TokenSource>) -> Self {
        Self { source }
    }
}

impl<S> Layer<S> for BearerLayer {
    type Service = Bearer<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Bearer { inner, source: self.source.clone() }
    }
}

/// The service [`BearerLayer`] makes.
#[derive(Clone)]
pub(super) struct Bearer<S> {
    inner: S,
    source: Arc<TokenSource>,
}

impl<S, B, R> Service<Request<B>> for Bearer<S>
where
    S: Service<Request<B>, Response = Response<R>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<R>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<R>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        // The clone that was polled ready makes the call (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let source = self.source.clone();
        Box::pin(async move {
            if let Some(token) = source.current().await {
                let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|_| BoxError::from("the bearer token holds characters an HTTP header cannot carry"))?;
                value.set_sensitive(true);
                request.headers_mut().insert(AUTHORIZATION, value);
            }
            let response = inner.call(request).await?;
            if response.status() == StatusCode::UNAUTHORIZED {
                source.refused();
            }
            Ok(response)
        })
    }
}
