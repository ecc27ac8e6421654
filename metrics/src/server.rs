//! Plain-text HTTP/1.1 endpoints (`/metrics`, `/healthz`, …) on hyper: the
//! one HTTP server stack of the daemon and the tunnel processes.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Serves `answer(path)` as `text/plain` (Prometheus' text format 0.0.4) to
/// every request, until the task is dropped. Connections are served
/// concurrently; a slow client holds only its own task.
pub async fn serve_text<F, Fut>(listener: TcpListener, answer: F)
where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = (StatusCode, String)> + Send + 'static,
{
    let answer = Arc::new(answer);
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let answer = answer.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let reply = answer(request.uri().path().to_string());
                async move {
                    let (status, body) = reply.await;
                    let mut response = Response::new(Full::new(Bytes::from(body)));
                    *response.status_mut() = status;
                    response.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static(prometheus_client::encoding::prometheus_text::CONTENT_TYPE),
                    );
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
        });
    }
}
