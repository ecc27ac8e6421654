//! `netd-mux/1` over what it will run on: TLS 1.3 with the tunnel's own
//! settings and certificates, over a loopback TCP connection.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use netd_tunnel::certs::{CertFiles, CertificateAuthority};
use netd_tunnel::mux::{self, MuxError, Role};
use netd_tunnel::tls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A linked pair over TLS on loopback, drivers spawned: (opener, acceptor).
async fn tls_link() -> (tempfile::TempDir, mux::Link, mux::Link) {
    let dir = tempfile::tempdir().unwrap();
    let day = Duration::from_secs(86_400);
    let ca = CertificateAuthority::generate("mux test CA", day).unwrap();
    ca.write_cert(dir.path()).unwrap();
    let server_ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    ca.issue_server("tunnel-server", &[], &[server_ip], day).unwrap().write(dir.path(), "server").unwrap();
    ca.issue_node("edge-1", &[], day).unwrap().write(dir.path(), "node").unwrap();
    let server_tls = tls::server(&CertFiles::in_dir(dir.path(), "server").load().unwrap(), mux::ALPN).unwrap();
    // The agent's settings, offering the mux's ALPN name (the server's
    // requires it: an agent offering only h2 is refused).
    let mut agent_tls = (*tls::agent(&CertFiles::in_dir(dir.path(), "node").load().unwrap()).unwrap()).clone();
    agent_tls.alpn_protocols = vec![mux::ALPN.to_vec()];
    let agent_tls = std::sync::Arc::new(agent_tls);
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let address = listener.local_addr().unwrap();
    let (accepted, dialled) = tokio::join!(listener.accept(), TcpStream::connect(address));
    let (accepted, dialled) = (accepted.unwrap().0, dialled.unwrap());
    accepted.set_nodelay(true).unwrap();
    dialled.set_nodelay(true).unwrap();
    let (agent_io, server_io) = tokio::join!(
        tokio_rustls::TlsConnector::from(agent_tls).connect(server_ip.into(), dialled),
        tokio_rustls::TlsAcceptor::from(server_tls).accept(accepted),
    );
    let (opener, opener_driver) = mux::link(server_io.unwrap(), Role::Opener, mux::Config::default());
    let (acceptor, acceptor_driver) = mux::link(agent_io.unwrap(), Role::Acceptor, mux::Config::default());
    tokio::spawn(opener_driver);
    tokio::spawn(acceptor_driver);
    (dir, opener, acceptor)
}

/// An acceptor that echoes every stream it accepts, each in its own task.
fn echo_all(acceptor: mux::Link) {
    tokio::spawn(async move {
        while let Some(incoming) = acceptor.accept().await {
            let mut stream = incoming.accept();
            tokio::spawn(async move {
                let mut buf = vec![0_u8; 64 << 10];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = stream.shutdown().await;
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_at_once_over_tls_each_get_their_own_bytes_back() {
    let (_certs, opener, acceptor) = tls_link().await;
    echo_all(acceptor);
    let mut clients = Vec::new();
    for i in 0..32_u32 {
        let opener = opener.clone();
        clients.push(tokio::spawn(async move {
            let stream = opener.open(&format!("127.0.0.1:{}", 1000 + i)).await.unwrap();
            let (mut read, mut write) = tokio::io::split(stream);
            // 4 MiB each way, written and read at once (an echo needs both).
            let sent: Vec<u8> = (0..(4_u32 << 20)).map(|b| (b % 253) as u8 ^ i as u8).collect();
            let expected = sent.clone();
            let writer = tokio::spawn(async move {
                write.write_all(&sent).await.unwrap();
                write.shutdown().await.unwrap();
                write
            });
            let mut back = Vec::new();
            read.read_to_end(&mut back).await.unwrap();
            assert!(back == expected, "stream {i}: the echo differs");
            drop(writer.await.unwrap());
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
    // Small messages one at a time, as a request and its answer.
    let mut stream = opener.open("127.0.0.1:80").await.unwrap();
    for round in 0..100_u8 {
        stream.write_all(&[round; 120]).await.unwrap();
        let mut back = [0_u8; 120];
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(back, [round; 120]);
    }
    drop(stream);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(opener.open_streams(), 0, "every stream's state is gone");
}

#[tokio::test]
async fn the_opener_refuses_to_accept_and_the_acceptor_to_open() {
    let (_certs, opener, acceptor) = tls_link().await;
    assert!(matches!(acceptor.open("127.0.0.1:80").await, Err(MuxError::NotOpener)));
    echo_all(acceptor);
    let err = opener.open("").await.err().unwrap();
    assert_eq!(err.to_string(), "Open frame of 0 bytes: its payload is 1 to 16 KiB");
}
