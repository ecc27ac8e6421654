//! What netd's binaries share and only binaries use: command-line pieces
//! (log level, certificate directory, comma-separated lists), logging to
//! stderr, and running a long-lived process until SIGTERM or SIGINT.
//!
//! Library entry points never call these: an agent that embeds netd keeps
//! its own logging, runtime and signal handling.

use std::future::Future;
use std::io;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::tunnel::run::Listen;

/// Comma-separated values; "" is none.
#[derive(Debug, Clone)]
pub struct CommaList<T>(pub Vec<T>);

/// What a [`CommaList`] token must be, for its error message.
pub trait Noun {
    /// E.g. "an IPv4 address".
    const NOUN: &'static str;
}

impl Noun for Ipv4Addr {
    const NOUN: &'static str = "an IPv4 address";
}

impl Noun for ipnet::Ipv4Net {
    const NOUN: &'static str = "an IPv4 CIDR";
}

impl Noun for std::net::SocketAddr {
    const NOUN: &'static str = "an IP:PORT address";
}

impl Noun for Listen {
    const NOUN: &'static str = "IP:PORT or PORT";
}

impl Noun for ipnet::IpNet {
    const NOUN: &'static str = "a CIDR";
}

impl<T: FromStr + Noun> FromStr for CommaList<T> {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim().is_empty() {
            return Ok(Self(Vec::new()));
        }
        s.split(',')
            .enumerate()
            .map(|(i, token)| {
                let token = token.trim();
                token.parse().map_err(|_| format!("token {} {token:?} is not {}", i + 1, T::NOUN))
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

/// `--log LEVEL`: error, warn, info, debug or trace.
// Variant docs would become per-value help in clap, which turns every
// command's --help into its long, one-option-per-paragraph form.
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl From<LogLevel> for tracing::Level {
    fn from(level: LogLevel) -> Self {
        match level {
            LogLevel::Error => tracing::Level::ERROR,
            LogLevel::Warn => tracing::Level::WARN,
            LogLevel::Info => tracing::Level::INFO,
            LogLevel::Debug => tracing::Level::DEBUG,
            LogLevel::Trace => tracing::Level::TRACE,
        }
    }
}

/// `--log-format FORMAT`: text (one line per event, for people and
/// journald) or json (one object per line, for log collectors).
// No variant docs: they would turn --help into its long form (see LogLevel).
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The log format flag of every long-running command: flattened into
/// [`LogArgs`], and on its own where a command declares its level itself.
#[derive(Debug, Args)]
pub struct LogFormatArgs {
    /// Log line format: text, or json (one object per line: timestamp, level, fields with the message).
    #[arg(
        long,
        env = "NETD_LOG_FORMAT",
        value_name = "FORMAT",
        value_enum,
        ignore_case = true,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

/// The log flags of the long-running commands: level and format.
#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log level.
    #[arg(long, env = "NETD_LOG", value_name = "LEVEL", value_enum, ignore_case = true, default_value = "info")]
    pub log: LogLevel,
    /// The line format (`--log-format`).
    #[command(flatten)]
    pub format: LogFormatArgs,
}

/// Where a tunnel process finds its certificates.
#[derive(Debug, Args)]
#[allow(missing_docs)]
pub struct TunnelCertArgs {
    // The help text says <stem>, which rustdoc would take for an HTML tag.
    #[arg(
        long,
        env = "NETD_TUNNEL_CERT_DIR",
        value_name = "DIR",
        default_value = "/etc/netd/tunnel",
        help = "Directory with <stem>.crt, <stem>.key and ca.crt (as `netd-cloud certs` writes them); re-read when they change"
    )]
    pub cert_dir: PathBuf,
}

/// Logs at `level` and above to stderr, without colours or targets (the
/// kubelet and journald keep the lines), as text or as one JSON object per
/// line (`{"timestamp":…,"level":"INFO","fields":{"message":…}}`).
pub fn init_logging(level: impl Into<tracing::Level>, format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_max_level(level.into())
        .with_target(false)
        .with_ansi(false)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// How long a stopping process waits for its runtime's blocking tasks.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(1);

/// The async runtime of a long-running command: how many threads run its tasks.
#[derive(Debug, Clone, Copy, Args)]
pub struct RuntimeArgs {
    /// Threads running the process's tasks: 1 runs them all on one thread (the lowest latency per hop); more spreads them over that many.
    #[arg(long, env = "NETD_RUNTIME_THREADS", value_name = "N", default_value = "1", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: u16,
}

/// Runs a process's `work` on a runtime of `runtime.threads` threads,
/// handing it a future that completes at SIGTERM or SIGINT
/// ([`stop_signal`]), until it ends: its error is the process's.
///
/// One thread is the default. A tunnelled byte crosses several tasks (a
/// door's copy, the link's HTTP/2 connection, TLS), and on a multi-thread
/// runtime each hand-over may wake another thread through a futex; on one
/// thread it is a queue push. On the 2-core machine of `cargo xtask bench
/// tunnel` one thread added 14 % less latency per request and moved 12 %
/// more bytes than two workers. A cloud tunnel server with thousands of
/// agents may want more threads for their TLS handshakes.
pub fn until_terminated<F, Fut, E>(what: &'static str, runtime: RuntimeArgs, work: F) -> Result<(), E>
where
    F: FnOnce(Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: From<io::Error>,
{
    let runtime = match runtime.threads {
        0 | 1 => tokio::runtime::Builder::new_current_thread().enable_all().build()?,
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(usize::from(n)).enable_all().build()?,
    };
    let outcome = runtime.block_on(async {
        let stop = stop_signal(what)?;
        work(Box::pin(stop)).await
    });
    // Dropping a runtime waits for every blocking task without limit; a
    // stop the kubelet is waiting on should not (the kernel closes what is
    // left when the process exits).
    runtime.shutdown_timeout(STOP_TIMEOUT);
    outcome
}

/// A future that completes at the first SIGTERM or SIGINT, saying which
/// in the log. Both handlers are installed before it returns, so a signal
/// that arrives once the process says it is up is never lost to the
/// default action. Must be called on a runtime.
///
/// SIGTERM is what a pod deletion sends, and in a container the process is
/// PID 1, for which the kernel ignores a signal without a handler: without
/// one the kubelet would wait out the whole grace period and SIGKILL it.
pub fn stop_signal(what: &'static str) -> io::Result<impl Future<Output = ()> + Send> {
    use tokio::signal::unix::{signal, SignalKind};
    let installing = |name: &str, e: io::Error| io::Error::new(e.kind(), format!("installing the {name} handler: {e}"));
    let mut sigterm = signal(SignalKind::terminate()).map_err(|e| installing("SIGTERM", e))?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(|e| installing("SIGINT", e))?;
    Ok(async move {
        tokio::select! {
            _ = sigterm.recv() => tracing::info!("{what}: SIGTERM, stopping"),
            _ = sigint.recv() => tracing::info!("{what}: SIGINT, stopping"),
        }
    })
}
