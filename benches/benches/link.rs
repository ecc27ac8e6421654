//! One small request and its answer (120 B out, 400 B back, as `wrk` and
//! its server exchange) across a tunnel link over loopback TCP and TLS 1.3
//! with the tunnel's own settings and certificates, one at a time:
//! - `h2`: one stream of the HTTP/2 link the agent and server speak today
//!   (`transport::TunnelStream` on both ends, pings off as in hotpaths);
//! - `mux`: one stream of a `netd-mux/1` link (`tunnel::mux`), pings on;
//! - `tls`: the TLS connection itself, no multiplexing: the floor of any
//!   encrypted link (one connection per tunnelled one, rathole's shape).
//!
//! Both ends run on one thread of one process, so a round trip is the CPU
//! of both sides plus the loopback's syscalls, with no cross-process
//! wake-up; `cargo xtask bench tunnel` measures the processes.
//!
//! Run: `cargo bench -p netd-benches --bench link`.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use netd_tunnel::certs::{CertFiles, CertificateAuthority};
use netd_tunnel::mux::{self, Role};
use netd_tunnel::tls;
use netd_tunnel::transport::{self, TunnelStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const REQUEST: usize = 120;
const RESPONSE: usize = 400;

type AgentTls = tokio_rustls::client::TlsStream<TcpStream>;
type ServerTls = tokio_rustls::server::TlsStream<TcpStream>;

/// A TLS connection on loopback: the agent's end (client) and the server's,
/// with `alpn` offered and required.
async fn tls_pair(dir: &std::path::Path, alpn: &[u8]) -> (AgentTls, ServerTls) {
    let server_tls = tls::server(&CertFiles::in_dir(dir, "server").load().unwrap(), alpn).unwrap();
    let mut agent_tls = (*tls::agent(&CertFiles::in_dir(dir, "node").load().unwrap()).unwrap()).clone();
    agent_tls.alpn_protocols = vec![alpn.to_vec()];
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let (accepted, dialled) = tokio::join!(listener.accept(), TcpStream::connect(listener.local_addr().unwrap()));
    let (accepted, dialled) = (accepted.unwrap().0, dialled.unwrap());
    accepted.set_nodelay(true).unwrap();
    dialled.set_nodelay(true).unwrap();
    let (agent, server) = tokio::join!(
        tokio_rustls::TlsConnector::from(Arc::new(agent_tls)).connect(IpAddr::V4(Ipv4Addr::LOCALHOST).into(), dialled),
        tokio_rustls::TlsAcceptor::from(server_tls).accept(accepted),
    );
    (agent.unwrap(), server.unwrap())
}

fn certificates() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let day = Duration::from_secs(86_400);
    let ca = CertificateAuthority::generate("link bench CA", day).unwrap();
    ca.write_cert(dir.path()).unwrap();
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    ca.issue_server("tunnel-server", &[], &[ip], day).unwrap().write(dir.path(), "server").unwrap();
    ca.issue_node("edge-1", &[], day).unwrap().write(dir.path(), "node").unwrap();
    dir
}

/// The agent's end answers every request with a response, in a task.
fn answer(mut end: impl AsyncRead + AsyncWrite + Unpin + Send + 'static) {
    tokio::spawn(async move {
        let (mut request, response) = ([0_u8; REQUEST], [0x48_u8; RESPONSE]);
        while end.read_exact(&mut request).await.is_ok() {
            if end.write_all(&response).await.is_err() || end.flush().await.is_err() {
                break;
            }
        }
    });
}

/// The server's end: the client side of each round trip.
type ClientEnd = Box<dyn ClientIo>;
trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ClientIo for T {}

async fn h2_link(dir: &std::path::Path) -> ClientEnd {
    let (agent_tls, server_tls) = tls_pair(dir, tls::ALPN_TUNNEL).await;
    let (agent, server) = tokio::join!(
        transport::agent_builder().handshake::<_, Bytes>(agent_tls),
        transport::server_builder().handshake::<_, Bytes>(server_tls),
    );
    let (mut agent, (mut link, connection)) = (agent.unwrap(), server.unwrap());
    tokio::spawn(async move { drop(connection.await) });
    let request = http::Request::builder().method("CONNECT").uri("10.0.0.1:80").body(()).unwrap();
    let (response, send_up) = link.send_request(request, false).unwrap();
    let (accepted, mut respond) = agent.accept().await.unwrap().unwrap();
    let send_down = respond.send_response(http::Response::new(()), false).unwrap();
    tokio::spawn(async move { while let Some(Ok(_)) = agent.accept().await {} });
    let response = response.await.unwrap();
    answer(TunnelStream::new(send_down, accepted.into_body()));
    Box::new(TunnelStream::new(send_up, response.into_body()))
}

async fn mux_link(dir: &std::path::Path) -> ClientEnd {
    let (agent_tls, server_tls) = tls_pair(dir, mux::ALPN).await;
    let (server, server_driver) = mux::link(server_tls, Role::Opener, mux::Config::default());
    let (agent, agent_driver) = mux::link(agent_tls, Role::Acceptor, mux::Config::default());
    tokio::spawn(async move { drop(server_driver.await) });
    tokio::spawn(async move { drop(agent_driver.await) });
    let (up, down) =
        tokio::join!(server.open("10.0.0.1:80"), async { agent.accept().await.map(mux::Incoming::accept) });
    answer(down.unwrap());
    Box::new(up.unwrap())
}

async fn tls_only(dir: &std::path::Path) -> ClientEnd {
    let (agent_tls, server_tls) = tls_pair(dir, tls::ALPN_TUNNEL).await;
    answer(agent_tls);
    Box::new(server_tls)
}

fn bench(c: &mut Criterion) {
    let dir = certificates();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut group = c.benchmark_group("link");
    group.measurement_time(Duration::from_secs(5));
    for way in ["h2", "mux", "tls"] {
        let mut end = runtime.block_on(async {
            match way {
                "h2" => h2_link(dir.path()).await,
                "mux" => mux_link(dir.path()).await,
                _ => tls_only(dir.path()).await,
            }
        });
        group.bench_function(way, |b| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let (request, mut response) = ([0x47_u8; REQUEST], [0_u8; RESPONSE]);
                    let started = Instant::now();
                    for _ in 0..iters {
                        end.write_all(&request).await.unwrap();
                        end.flush().await.unwrap();
                        end.read_exact(&mut response).await.unwrap();
                    }
                    started.elapsed()
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
