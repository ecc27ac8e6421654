//! `netd-join` as a user runs it: bad input is refused with a message
//! naming the field, before anything is contacted (a listener standing in
//! for the API server sees no connection) and before anything is written.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::TcpListener;
use std::process::Command;

const TOKEN: &str = "abcdef.0123456789abcdef";
const PIN: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

struct Run {
    code: Option<i32>,
    stderr: String,
}

fn join(server: &str, config_dir: &std::path::Path, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_netd-join"))
        .args(["--registry", &format!("kubernetes:{server}"), "--config-dir", config_dir.to_str().unwrap()])
        .args(args)
        .env_remove("NETD_JOIN_TOKEN")
        .env_remove("NETD_REGISTRY")
        .output()
        .unwrap();
    Run { code: out.status.code(), stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
}

#[test]
fn malformed_specs_and_tokens_are_refused_before_any_contact_and_nothing_is_written() {
    // Stands in for the API server: any connection to it is a failure.
    let api = TcpListener::bind("127.0.0.1:0").unwrap();
    api.set_nonblocking(true).unwrap();
    let server = format!("https://{}", api.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let config_dir = dir.path().join("etc-netd");
    let cases: &[(&[&str], &str)] = &[
        (
            &["--token", TOKEN, "--node-spec", "{\"flannelface\":", "--discovery-token-ca-cert-hash", PIN],
            "not a JSON object",
        ),
        (
            &["--token", TOKEN, "--node-spec", "{\"enableIpTables\":\"on\"}", "--discovery-token-ca-cert-hash", PIN],
            "enableIptables: expected true or false, got \"on\"",
        ),
        (
            &["--token", TOKEN, "--node-spec", "{\"gpuversion\":\"T4\"}", "--discovery-token-ca-cert-hash", PIN],
            "gpuVersion: expected \"\" or one of",
        ),
        (
            &["--token", TOKEN, "--node-spec", "{\"nodeNameOverrides\":\"*\"}", "--discovery-token-ca-cert-hash", PIN],
            "did you mean \"nodeNameOverride\"",
        ),
        (
            &[
                "--token",
                TOKEN,
                "--node-spec",
                "{\"nodeNameOverride\":\"EDGE 1\"}",
                "--discovery-token-ca-cert-hash",
                PIN,
            ],
            "nodeNameOverride: expected",
        ),
        (
            &[
                "--token",
                TOKEN,
                "--node-spec",
                "{\"flannelface\":\"no-such-if0\"}",
                "--discovery-token-ca-cert-hash",
                PIN,
            ],
            "flannelface: no interface \"no-such-if0\"",
        ),
        (&["--token", "abcdef-0123456789abcdef", "--node-spec", "{}"], "the bootstrap token must be"),
        (
            &["--token", TOKEN, "--node-spec", "{}", "--discovery-token-ca-cert-hash", "sha256:abc"],
            "is not sha256:<64 hex digits>",
        ),
        (&["--token", TOKEN, "--node-spec", "{\"quiet\":true}"], "no --discovery-token-ca-cert-hash"),
        (&["--token", TOKEN], "--node-spec"),
    ];
    for (args, wanted) in cases {
        let run = join(&server, &config_dir, args);
        assert_ne!(run.code, Some(0), "{args:?} succeeded");
        assert!(run.stderr.contains(wanted), "{args:?}\n  stderr: {}\n  wanted: {wanted}", run.stderr);
        assert!(!run.stderr.contains("0123456789abcdef"), "the token's secret was printed: {}", run.stderr);
        assert!(api.accept().is_err(), "{args:?}: the API server was contacted");
        assert!(!config_dir.exists(), "{args:?}: something was written");
    }
    // A well-formed join does contact the server: refused at once once nothing listens.
    drop(api);
    let run = join(
        &server,
        &config_dir,
        &["--token", TOKEN, "--node-spec", "{\"quiet\":true}", "--discovery-token-ca-cert-hash", PIN],
    );
    assert_ne!(run.code, Some(0));
    assert!(run.stderr.contains("fetching cluster-info"), "{}", run.stderr);
    assert!(!config_dir.exists());
}

#[test]
fn a_recorded_join_with_the_same_spec_is_a_no_op_and_another_spec_needs_force() {
    let dir = tempfile::tempdir().unwrap();
    let config_dir = dir.path().join("etc-netd");
    std::fs::create_dir_all(&config_dir).unwrap();
    let api = TcpListener::bind("127.0.0.1:0").unwrap();
    api.set_nonblocking(true).unwrap();
    let server = format!("https://{}", api.local_addr().unwrap());
    let record = serde_json::json!({
        "version": 1,
        "nodeName": "k3x9q2.edge",
        "registry": format!("kubernetes:{server}"),
        "server": server,
        "spec": { "quiet": true, "nodeNameOverride": "*.edge" },
    });
    std::fs::write(config_dir.join("join.json"), record.to_string()).unwrap();
    // Same spec, other spelling and key order: nothing to do, no contact.
    let same = join(
        &server,
        &config_dir,
        &[
            "--token",
            TOKEN,
            "--node-spec",
            r#"{"NodeNameOverride":"*.edge","QUIET":true}"#,
            "--discovery-token-ca-cert-hash",
            PIN,
        ],
    );
    assert_eq!(same.code, Some(0), "{}", same.stderr);
    assert!(api.accept().is_err(), "a no-op re-run contacted the server");
    let other = join(
        &server,
        &config_dir,
        &[
            "--token",
            TOKEN,
            "--node-spec",
            r#"{"quiet":true,"gpuVersion":"Nvidia_Tesla_T4"}"#,
            "--discovery-token-ca-cert-hash",
            PIN,
        ],
    );
    assert_ne!(other.code, Some(0));
    assert!(other.stderr.contains("already joined as k3x9q2.edge with another node-spec"), "{}", other.stderr);
    assert!(other.stderr.contains("--force"), "{}", other.stderr);
    assert!(api.accept().is_err());
    // With --force it goes on to discovery (refused: nothing listens any more).
    drop(api);
    let forced = join(
        &server,
        &config_dir,
        &[
            "--token",
            TOKEN,
            "--node-spec",
            r#"{"quiet":true,"gpuVersion":"Nvidia_Tesla_T4"}"#,
            "--discovery-token-ca-cert-hash",
            PIN,
            "--force",
        ],
    );
    assert!(forced.stderr.contains("fetching cluster-info"), "{}", forced.stderr);
    // The record is untouched by the failed attempt.
    let kept: serde_json::Value =
        serde_json::from_slice(&std::fs::read(config_dir.join("join.json")).unwrap()).unwrap();
    assert_eq!(kept, record);
}

/// `manageRuntime`: the runtime's socket must be there, be a socket and
/// answer; each failure says which, before anything is contacted or
/// written. A runtime that answers lets the join go on to the cluster.
#[test]
fn manage_runtime_needs_a_runtime_that_answers() {
    let api = TcpListener::bind("127.0.0.1:0").unwrap();
    api.set_nonblocking(true).unwrap();
    let server = format!("https://{}", api.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let config_dir = dir.path().join("etc-netd");
    let socket = dir.path().join("containerd.sock");
    let spec = r#"{"quiet":true,"manageRuntime":true}"#;
    let with_socket = |path: &str| {
        join(
            &server,
            &config_dir,
            &["--token", TOKEN, "--node-spec", spec, "--discovery-token-ca-cert-hash", PIN, "--cri-socket", path],
        )
    };
    let socket_arg = format!("unix://{}", socket.display());
    let refused = |run: Run, state: &str| {
        assert_ne!(run.code, Some(0));
        assert!(
            run.stderr.contains("manageRuntime: no container runtime answers (the --cri-socket runtime at")
                && run.stderr.contains(state),
            "wanted {state:?}: {}",
            run.stderr
        );
        assert!(api.accept().is_err(), "the API server was contacted");
        assert!(!config_dir.exists(), "something was written");
    };
    refused(with_socket(&socket_arg), "containerd.sock: absent");
    std::fs::write(&socket, "").unwrap();
    refused(with_socket(&socket_arg), "containerd.sock: not a socket");
    std::fs::remove_file(&socket).unwrap();
    // A socket left behind by a runtime that is gone.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    refused(with_socket(&socket_arg), "containerd.sock: nothing answers: Connection refused");
    std::fs::remove_file(&socket).unwrap();
    let run = with_socket("containerd.sock");
    assert!(run.stderr.contains("is not an absolute path (or unix:///path)"), "{}", run.stderr);

    // A runtime listening: the checks pass and the join contacts the cluster.
    let _runtime = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    api.set_nonblocking(false).unwrap();
    // The stand-in takes the connection and hangs up: the join fails there.
    let contacted = std::thread::spawn(move || api.accept().map(drop).is_ok());
    let run = with_socket(socket.to_str().unwrap());
    assert!(contacted.join().unwrap(), "the join went on to the API server");
    assert_ne!(run.code, Some(0), "the stand-in API server speaks no TLS");
    assert!(!run.stderr.contains("manageRuntime"), "{}", run.stderr);
    assert!(run.stderr.contains("fetching cluster-info"), "{}", run.stderr);
    assert!(!config_dir.exists());
}
