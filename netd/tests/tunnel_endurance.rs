//! The edge tunnel over time, on the stage of `common/tunnel_stage.rs`: a
//! session held open for minutes, and a link that goes dead for a minute
//! and comes back. Minutes each by nature; the quick tests are in
//! `tunnel.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/tunnel_stage.rs"]
mod tunnel_stage;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use netd::testing;
use netd::tunnel::agent::BACKOFF_CAP;
use netd::tunnel::transport::{PING_INTERVAL, PING_TIMEOUT};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tunnel_stage::{connect, wait_for, Background, Linked, Stage, NODE, NODE_IP};

/// How long the exec-like session is held: "works for minutes".
const EXEC_SESSION: Duration = Duration::from_secs(120);
/// Each end writes a line this often, like a shell's stdin and its output.
const EXEC_TICK: Duration = Duration::from_millis(250);
/// The longest silence allowed between two lines arriving at either end:
/// many ticks (a loaded machine), well under a dead-link verdict.
const MAX_GAP: Duration = Duration::from_secs(5);
/// kubelet's port, where exec sessions go.
const KUBELET_PORT: u16 = 10250;

/// What one end of a session saw.
struct SessionEnd {
    started: Instant,
    /// Lines written.
    sent: usize,
    /// Lines that arrived, and when.
    arrivals: Vec<(String, Instant)>,
}

/// Plays one end of an exec-like session: writes `"<name> <n>"` every tick
/// and records each line from the other end, both at once. With `hold`, it
/// stops writing after that long and half-closes, as a client whose user
/// typed `exit`; either way it returns when the other end has closed.
async fn play_session_end<S: AsyncRead + AsyncWrite>(stream: S, name: &str, hold: Option<Duration>) -> SessionEnd {
    let started = Instant::now();
    let (read, mut write) = tokio::io::split(stream);
    let mut lines = BufReader::new(read).lines();
    let mut tick = tokio::time::interval(EXEC_TICK);
    let (mut sent, mut writing, mut arrivals) = (0, true, Vec::new());
    loop {
        tokio::select! {
            // Cancel-safe: a line cut short by a tick is finished next time.
            line = lines.next_line() => match line.unwrap() {
                Some(line) => arrivals.push((line, Instant::now())),
                None => break,
            },
            _ = tick.tick(), if writing => {
                if hold.is_some_and(|hold| started.elapsed() >= hold) {
                    write.shutdown().await.unwrap();
                    writing = false;
                } else {
                    write.write_all(format!("{name} {sent}\n").as_bytes()).await.unwrap();
                    sent += 1;
                }
            }
        }
    }
    if writing {
        // The other end ended the session: end ours.
        write.shutdown().await.unwrap();
    }
    SessionEnd { started, sent, arrivals }
}

/// Every line the `sender` end (`from`) wrote arrived at the `receiver` end, in order, none after a silence
/// longer than [`MAX_GAP`]; returns the longest silence.
fn assert_all_in_order_without_gaps(from: &str, sender: &SessionEnd, receiver: &SessionEnd) -> Duration {
    let got: Vec<&str> = receiver.arrivals.iter().map(|(line, _)| line.as_str()).collect();
    let expected: Vec<String> = (0..sender.sent).map(|n| format!("{from} {n}")).collect();
    assert_eq!(got, expected, "the lines {from} sent did not all arrive, in order");
    let mut previous = receiver.started;
    let mut longest = Duration::ZERO;
    for (line, at) in &receiver.arrivals {
        let gap = at.duration_since(previous);
        assert!(gap <= MAX_GAP, "{line:?} arrived {gap:?} after the line before it");
        longest = longest.max(gap);
        previous = *at;
    }
    longest
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn an_exec_like_session_runs_both_ways_for_minutes_on_one_link() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let stage = Stage::new();
    // The exec stand-in on kubelet's port: its end of the session.
    let (edge_tx, edge_rx) = std::sync::mpsc::channel();
    let exec = Background::start(&stage.edge.path(), move || async move {
        let listener = TcpListener::bind((NODE_IP, KUBELET_PORT)).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        edge_tx.send(play_session_end(stream, "stdout", None).await).unwrap();
    });
    let Linked { router, metrics, client, agent: _agent, kubelet: _exec, server: _server } =
        stage.linked_with(stage.agent_config(NODE), exec);

    let (watcher_router, watcher_metrics) = (router.clone(), metrics.clone());
    let client_end = stage.in_cloud(|| async move {
        // A reconnect would reset the session's stream anyway; the samples
        // say which link state it was.
        let link_watch = tokio::spawn(async move {
            let started = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let links = watcher_metrics.links_up.load(Ordering::Relaxed);
                let agents = watcher_router.metrics.agents.load(Ordering::Relaxed);
                if links != 1 || agents != 1 {
                    let after = started.elapsed();
                    return format!(
                        "after {after:?}: {links} link(s) up at the agent, {agents} agent(s) at the server"
                    );
                }
            }
        });
        let (code, session) = connect(client, &format!("{NODE_IP}:{KUBELET_PORT}")).await;
        assert_eq!(code, 200);
        let client_end = play_session_end(session.unwrap(), "stdin", Some(EXEC_SESSION)).await;
        if link_watch.is_finished() {
            panic!("the link did not stay up: {}", link_watch.await.unwrap());
        }
        link_watch.abort();
        client_end
    });
    let edge_end = edge_rx.recv_timeout(Duration::from_secs(5)).unwrap();

    let upstream = assert_all_in_order_without_gaps("stdin", &client_end, &edge_end);
    let downstream = assert_all_in_order_without_gaps("stdout", &edge_end, &client_end);
    // The edge end talked for the whole session, not only at its start.
    let ticks = (EXEC_SESSION.as_millis() / EXEC_TICK.as_millis()) as usize;
    assert!(edge_end.sent >= ticks * 9 / 10, "the edge sent {} lines in {EXEC_SESSION:?}", edge_end.sent);
    eprintln!(
        "    {EXEC_SESSION:?} session: {} lines up (longest silence {upstream:?}), {} down (longest {downstream:?})",
        client_end.sent, edge_end.sent
    );
    // One stream, on the one link the agent made.
    assert_eq!(metrics.streams_total.load(Ordering::Relaxed), 1);
    assert_eq!(metrics.handshake_failures.load(Ordering::Relaxed), 0);
    assert_eq!(router.metrics.streams_total.load(Ordering::Relaxed), 1);
}

/// How long the link stays cut: long enough for the agent's backoff to
/// have grown well past its first steps.
const CUT: Duration = Duration::from_secs(60);
/// Either end declares the link dead within a ping interval and a ping
/// timeout of the cut; this much more for a busy machine.
const VERDICT_SLACK: Duration = Duration::from_secs(2);
/// After the link is back, the agent relinks within one backoff wait, at
/// most [`BACKOFF_CAP`], plus the rest of a dial begun during the cut: its
/// SYN may be waiting out a retransmission until the agent's 10 s dial
/// timeout.
const RELINK_BOUND: Duration = BACKOFF_CAP.saturating_add(Duration::from_secs(10));

/// Polls every check until each has held once, failing `bound` after
/// `since`; when each first held, after `since`. Polled together, so that
/// one check's wait does not hide when the other held.
fn when_each_holds<const N: usize>(
    since: Instant,
    bound: Duration,
    checks: [(&str, &dyn Fn() -> bool); N],
) -> [Duration; N] {
    let mut held = [None; N];
    while held.iter().any(Option::is_none) {
        for ((what, check), held) in checks.iter().zip(&mut held) {
            if held.is_none() && check() {
                *held = Some(since.elapsed());
            }
            assert!(held.is_some() || since.elapsed() < bound, "not within {bound:?}: {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    held.map(Option::unwrap)
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn a_link_cut_for_a_minute_is_declared_dead_and_traffic_resumes_by_itself() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let stage = Stage::new();
    let Linked { router, metrics, client, agent: _agent, kubelet: _kubelet, server: _server } = stage.linked();
    let echo = |payload: &'static [u8]| {
        let client = client.clone();
        stage.in_cloud(|| async move {
            let (code, stream) = connect(client, &format!("{NODE_IP}:{KUBELET_PORT}")).await;
            assert_eq!(code, 200, "CONNECT while sending {payload:?}");
            let mut stream = stream.unwrap();
            stream.write_all(payload).await.unwrap();
            let mut back = vec![0; payload.len()];
            stream.read_exact(&mut back).await.unwrap();
            assert_eq!(back, payload);
        })
    };
    echo(b"before the cut");
    let kubelet = format!("{NODE_IP}:{KUBELET_PORT}");
    let verdict = PING_INTERVAL + PING_TIMEOUT + VERDICT_SLACK;

    // Borrowed by the threads below, all of which end in the scope.
    let (stage, client, kubelet) = (&stage, &client, kubelet.as_str());
    let (cut, cut_at) = std::thread::scope(|scope| {
        // A session open across the cut, idle as an exec shell waiting for
        // input: it must end at the verdict, not hang for good.
        let (open_tx, open_rx) = std::sync::mpsc::channel();
        let session = scope.spawn(move || {
            stage.in_cloud(|| async {
                let (code, session) = connect(client.clone(), kubelet).await;
                assert_eq!(code, 200);
                let mut session = session.unwrap();
                session.write_all(b"ready").await.unwrap();
                session.read_exact(&mut [0; 5]).await.unwrap();
                open_tx.send(()).unwrap();
                let end = session.read(&mut [0; 1]).await;
                (end.map_err(|err| err.kind()), Instant::now())
            })
        });
        open_rx.recv().unwrap();

        let cut = stage.cut_link();
        let cut_at = Instant::now();
        // A CONNECT the server sends down the link before it knows it is
        // dead: answered once the open bound runs out (10 s, sooner than the
        // pings' verdict), not left waiting.
        let in_flight = scope
            .spawn(move || stage.in_cloud(|| async { (connect(client.clone(), kubelet).await.0, Instant::now()) }));
        let [server_verdict, agent_verdict] = when_each_holds(
            cut_at,
            verdict,
            [
                ("the server drops the dead link", &|| router.nodes().is_empty()),
                ("the agent drops the dead link", &|| metrics.links_up.load(Ordering::Relaxed) == 0),
            ],
        );
        let (session_end, session_ended_at) = session.join().unwrap();
        assert!(matches!(session_end, Ok(0) | Err(_)), "the session read {session_end:?} from a dead link");
        let (in_flight_code, answered_at) = in_flight.join().unwrap();
        assert_eq!(in_flight_code, 504, "a CONNECT sent down the link as it died");
        eprintln!(
            "    link cut: the server dropped the agent after {server_verdict:?}, the agent dropped the link after \
             {agent_verdict:?}; the open session ended after {:?}, the CONNECT in flight was answered after {:?}",
            session_ended_at - cut_at,
            answered_at - cut_at
        );
        for (what, at) in [("the session's end", session_ended_at), ("the CONNECT's answer", answered_at)] {
            assert!(at - cut_at <= verdict, "{what} came {:?} after the cut", at - cut_at);
        }
        // Both ends let go of the streams of the dead link.
        wait_for("the streams of the dead link closed", Duration::from_secs(2), || {
            router.metrics.streams_open.load(Ordering::Relaxed) == 0
                && metrics.streams_open.load(Ordering::Relaxed) == 0
        });
        (cut, cut_at)
    });
    // The server knows now: it fails fast instead of waiting on a dead link.
    let (code, _) = stage.in_cloud(|| async { connect(client.clone(), kubelet).await });
    assert_eq!(code, 503, "CONNECT to a node whose link is dead");
    std::thread::sleep(CUT.saturating_sub(cut_at.elapsed()));

    drop(cut);
    let restored_at = Instant::now();
    let [relinked] = when_each_holds(
        restored_at,
        RELINK_BOUND,
        [("the agent relinks by itself", &|| router.nodes() == vec![NODE.to_string()])],
    );
    echo(b"after the cut");
    let resumed = restored_at.elapsed();
    eprintln!("    link restored after {CUT:?}: relinked after {relinked:?}, traffic through after {resumed:?}");
    assert_eq!(router.metrics.agents.load(Ordering::Relaxed), 1, "{:?}", router.metrics);
    assert_eq!(metrics.links_up.load(Ordering::Relaxed), 1);
}
