//! An application that embeds netd's VXLAN overlay.
//!
//! It owns its process the way any host agent does: it builds its own
//! multi-thread tokio runtime, installs its own SIGTERM/SIGINT handling,
//! and runs its own work beside the data plane (here: waiting for the
//! overlay to be ready, then reporting it). netd's data plane is one
//! future on that runtime, [`netd_dataplane::daemon::run`], told to stop by
//! a future the application completes; the VXLAN device, routes and FDB
//! entries stay in the kernel after it stops, so pods keep talking while
//! the application restarts.
//!
//! ```text
//! embed-overlay --node-name edge-1 --registry embedded:/var/lib/app/registry.db \
//!     --state-dir /var/lib/app/netd --iface eth0
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Parser;
use netd_dataplane::daemon::{self, DaemonConfig};
use netd_registry::RegistrySpec;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Runs netd's overlay inside this application until SIGTERM or SIGINT.
#[derive(Debug, Parser)]
#[command(name = "embed-overlay")]
struct Cli {
    /// This node's name (its lease and VTEP MAC are pinned to it).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Where leases live: embedded:PATH, etcd:URL or kubernetes:URL.
    #[arg(long)]
    registry: RegistrySpec,
    /// The application's directory for netd's snapshot, MAC store and subnet.env.
    #[arg(long)]
    state_dir: PathBuf,
    /// Underlay interface (default: the one of the default route).
    #[arg(long)]
    iface: Option<String>,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_target(false).init();
    let cli = Cli::parse();
    let mut config = DaemonConfig::new(cli.node_name, cli.registry);
    config.iface = cli.iface;
    config.subnet_env = cli.state_dir.join("subnet.env");
    config.state_dir = cli.state_dir;
    // The application's runtime, shaped as it likes: netd adds one task
    // and uses the blocking pool for SQLite and netlink dumps.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let outcome = runtime.block_on(application(config));
    runtime.shutdown_timeout(daemon::SHUTDOWN_GRACE);
    outcome
}

async fn application(config: DaemonConfig) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let health = config.health_addr;
    let mut overlay = tokio::spawn(daemon::run(config, async move {
        let _ = stopped.await;
    }));

    // The application's own work: here, wait until the overlay is ready.
    let ready = async {
        while !is_ready(health).await {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::info!("app: overlay ready");
        std::future::pending::<()>().await
    };
    tokio::select! {
        ended = &mut overlay => {
            // The data plane only ends by itself on a local fault.
            ended.context("the overlay task")?.context("the overlay")?;
            anyhow::bail!("the overlay stopped on its own");
        }
        () = ready => unreachable!("the readiness wait never ends"),
        _ = sigterm.recv() => tracing::info!("app: SIGTERM"),
        _ = sigint.recv() => tracing::info!("app: SIGINT"),
    }
    let _ = stop.send(());
    overlay.await.context("the overlay task")?.context("the overlay")?;
    tracing::info!("app: overlay stopped, kernel state left in place");
    Ok(())
}

/// `GET /readyz` on netd's health endpoint answers 200.
async fn is_ready(addr: SocketAddr) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else { return false };
    let request = "GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    response.starts_with(b"HTTP/1.1 200")
}
