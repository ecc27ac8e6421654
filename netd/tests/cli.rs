//! The `netd` command line, through the built binary: clap's help, errors
//! and version, and the settings layers (defaults < config file < `NETD_*`
//! environment < flags) with a real environment, seen through
//! `netd run --print-config`; the tunnel processes' stop on SIGTERM and
//! SIGINT, and their log lines with `--log-format json`. Unprivileged:
//! nothing here touches the kernel.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::BufRead as _;
use std::path::Path;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

const NETD: &str = env!("CARGO_BIN_EXE_netd");
const NETD_CLOUD: &str = env!("CARGO_BIN_EXE_netd-cloud");

/// `program args…` with `env` and none of the caller's `NETD_*` or
/// `NODE_NAME` variables, so the test's own environment cannot leak in.
fn command(program: &str, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(program);
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(|n| n.starts_with("NETD_") || n == "NODE_NAME") {
            command.env_remove(name);
        }
    }
    command.args(args).envs(env.iter().copied());
    command
}

/// `netd args…` ([`command`]), run to its end.
fn netd(args: &[&str], env: &[(&str, &str)]) -> Output {
    command(NETD, args, env).output().unwrap()
}

/// `netd-cloud args…` ([`command`]), run to its end.
fn netd_cloud(args: &[&str], env: &[(&str, &str)]) -> Output {
    command(NETD_CLOUD, args, env).output().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The effective configuration `netd run --print-config` prints.
fn effective(args: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let mut all = vec!["run", "--print-config"];
    all.extend_from_slice(args);
    let out = netd(&all, env);
    assert!(out.status.success(), "netd {all:?} failed: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e} in {}", stdout(&out)))
}

#[test]
fn help_is_clap_generated_with_commands_env_vars_and_examples() {
    let out = netd(&["--help"], &[]);
    assert!(out.status.success());
    let help = stdout(&out);
    for expected in ["Usage: netd <COMMAND>", "run", "cleanup", "registry", "restore", "Examples:", "--version"] {
        assert!(help.contains(expected), "{expected:?} missing from\n{help}");
    }

    let out = netd(&["run", "--help"], &[]);
    assert!(out.status.success());
    let help = stdout(&out);
    let options = [
        ("--config <FILE>", "NETD_CONFIG"),
        ("--node-name <NAME>", "NETD_NODE_NAME"),
        ("--registry <SPEC>", "NETD_REGISTRY"),
        ("--iface <NAME>", "NETD_IFACE"),
        ("--public-ip <IP>", "NETD_PUBLIC_IP"),
        ("--network <CIDR>", "NETD_NETWORK"),
        ("--masquerade[=<BOOL>]", "NETD_MASQUERADE"),
        ("--direct-routing[=<BOOL>]", "NETD_DIRECT_ROUTING"),
        ("--state-dir <DIR>", "NETD_STATE_DIR"),
        ("--subnet-env <FILE>", "NETD_SUBNET_ENV"),
        ("--health-addr <ADDR>", "NETD_HEALTH_ADDR"),
        ("--token-file <FILE>", "NETD_TOKEN_FILE"),
        ("--ca-file <FILE>", "NETD_CA_FILE"),
        ("--log <LEVEL>", "NETD_LOG"),
    ];
    for (flag, variable) in options {
        let line = help.lines().find(|l| l.trim_start().starts_with(flag));
        let line = line.unwrap_or_else(|| panic!("{flag} missing from\n{help}"));
        assert!(line.contains(&format!("[env: {variable}=]")), "{line}");
    }
    assert!(help.contains("--print-config") && help.contains("Examples:"), "{help}");

    let help = stdout(&netd(&["cleanup", "--help"], &[]));
    assert!(help.contains("--purge-state") && help.contains("[env: NETD_IFACE=]"), "{help}");
    let help = stdout(&netd(&["registry", "init", "--help"], &[]));
    for flag in ["--db <PATH>", "--network <CIDR>", "--subnet-len <N>", "--vni <N>"] {
        assert!(help.contains(flag), "{flag} missing from\n{help}");
    }
    let help = stdout(&netd(&["restore", "--help"], &[]));
    assert!(help.contains("--snapshot <PATH>") && help.contains("--json"), "{help}");
}

#[test]
fn version_prints_the_crate_version() {
    let out = netd(&["--version"], &[]);
    assert!(out.status.success());
    assert_eq!(stdout(&out).trim(), format!("netd {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn a_wrong_flag_is_named_with_the_nearest_one() {
    let out = netd(&["run", "--ifaec", "eth0"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("unknown option --ifaec"), "{err}");
    assert!(err.contains("similar argument exists: '--iface'"), "{err}");
    assert!(stdout(&out).is_empty());

    let err = stderr(&netd(&["cleanup", "--purge-sate"], &[]));
    assert!(err.contains("--purge-sate") && err.contains("'--purge-state'"), "{err}");
}

#[test]
fn an_unknown_subcommand_suggests_the_nearest() {
    let out = netd(&["rum"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("'rum'") && err.contains("similar subcommand exists: 'run'"), "{err}");
    let err = stderr(&netd(&["cleanpu"], &[]));
    assert!(err.contains("'cleanup'"), "{err}");
}

#[test]
fn bad_values_name_their_flag_or_variable() {
    let err = stderr(&netd(&["run", "--iface"], &[]));
    assert!(err.contains("--iface <NAME> needs a value"), "{err}");
    let err = stderr(&netd(&["run", "--public-ip", "300.1.1.1"], &[]));
    assert!(err.contains("'--public-ip <IP>': not an IPv4 address"), "{err}");
    let err = stderr(&netd(&["run", "--print-config"], &[("NETD_PUBLIC_IP", "300.1.1.1")]));
    assert!(err.contains("NETD_PUBLIC_IP: invalid value '300.1.1.1'"), "{err}");
    let err = stderr(&netd(&["run", "--print-config"], &[("NETD_MASQUERADE", "maybe")]));
    assert!(err.contains("NETD_MASQUERADE:") && err.contains("not a boolean"), "{err}");
    let err = stderr(&netd(&["run", "--print-config", "--registry", "kubernetes"], &[]));
    assert!(err.contains("needs --network"), "{err}");
}

#[test]
fn flags_override_env_override_file_override_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("netd.json");
    std::fs::write(
        &file,
        r#"{"nodeName":"from-file","iface":"eth9","masquerade":true,"stateDir":"/file/state","futureKey":1}"#,
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let env = [("NETD_CONFIG", file), ("NETD_IFACE", "eth1"), ("NETD_MASQUERADE", "false"), ("NODE_NAME", "n")];

    let c = effective(&["--iface", "eth2", "--direct-routing"], &env);
    assert_eq!(c["iface"], "eth2", "flag over env");
    assert_eq!(c["masquerade"], false, "env over file");
    assert_eq!(c["stateDir"], "/file/state", "file over default");
    assert_eq!(c["nodeName"], "from-file", "file over NODE_NAME");
    assert_eq!(c["directRouting"], true);
    assert_eq!(c["subnetEnv"], "/run/flannel/subnet.env", "default");
    assert_eq!(c["healthAddr"], "127.0.0.1:9617", "default");
    assert_eq!(c["registry"], "embedded:/var/lib/netd/registry.db", "default");

    let c = effective(&[], &env);
    assert_eq!(c["iface"], "eth1", "env over file");
    let c = effective(&["--masquerade"], &env);
    assert_eq!(c["masquerade"], true, "flag over env");
    let c = effective(&["--masquerade=no"], &[("NETD_MASQUERADE", "yes")]);
    assert_eq!(c["masquerade"], false, "a switch's =value over env");
    assert_eq!(c["iface"], serde_json::Value::Null);

    // A --config flag beats NETD_CONFIG; NODE_NAME is the fallback below the file.
    let other = dir.path().join("other.json");
    std::fs::write(&other, r#"{"iface":"eth7"}"#).unwrap();
    let c = effective(&["--config", other.to_str().unwrap()], &env);
    assert_eq!(c["iface"], "eth1", "env over the flag-named file");
    assert_eq!(c["nodeName"], "n");
    assert_eq!(c["stateDir"], "/var/lib/netd");
}

#[test]
fn printed_config_is_a_config_file_that_reads_back_the_same() {
    let args = [
        "--node-name=edge-7",
        "--registry=etcd:http://127.0.0.1:2379,http://127.0.0.2:2379",
        "--iface",
        "eth3",
        "--public-ip",
        "192.0.2.7",
        "--network",
        "10.244.0.0/16",
        "--masquerade",
        "--direct-routing=true",
        "--state-dir",
        "/tmp/netd-state",
        "--subnet-env",
        "/tmp/netd-state/subnet.env",
        "--health-addr",
        "127.0.0.1:19617",
        "--token-file",
        "/run/token",
        "--ca-file",
        "/run/ca.crt",
    ];
    let printed = effective(&args, &[]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("printed.json");
    std::fs::write(&file, printed.to_string()).unwrap();
    let read_back = effective(&["--config", file.to_str().unwrap()], &[]);
    assert_eq!(read_back, printed);
    assert_eq!(printed["publicIp"], "192.0.2.7");
    assert_eq!(printed["network"], "10.244.0.0/16");
}

#[test]
fn a_wrong_type_in_the_config_file_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.json");
    std::fs::write(&file, r#"{"masquerade":"yes"}"#).unwrap();
    let out = netd(&["run", "--print-config"], &[("NETD_CONFIG", file.to_str().unwrap())]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("at `masquerade`"), "{}", stderr(&out));
}

#[test]
fn registry_init_and_restore_parse_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("registry.db");
    let db = db.to_str().unwrap();
    let out =
        netd(&["registry", "init", "--db", db, "--network", "10.244.0.0/16", "--subnet-len", "24", "--vni", "4"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("network 10.244.0.0/16, /24 subnets, VNI 4"), "{}", stdout(&out));
    assert!(Path::new(db).exists());
    let err = stderr(&netd(&["registry", "init", "--network", "10.244.0.0/16"], &[]));
    assert!(err.contains("--db <PATH>"), "{err}");

    let missing = dir.path().join("no-snapshot.json");
    let out = netd(&["restore", "--json", "--snapshot", missing.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no snapshot at"), "{}", stderr(&out));
}

#[test]
fn certs_make_a_ca_and_certificates_that_load_and_name_the_node() {
    use netd::tunnel::certs::{ip_sans_of, node_name_of, CertFiles};
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let ok = |args: &[&str], env: &[(&str, &str)]| {
        let out = netd_cloud(args, env);
        assert!(out.status.success(), "netd-cloud {args:?} failed: {}", stderr(&out));
        stdout(&out)
    };
    let ca = path("ca");
    let said = ok(&["certs", "ca", "--out", &ca, "--cn", "test CA", "--days", "10"], &[]);
    assert!(said.contains("ca.key") && said.contains("CN=test CA"), "{said}");
    let mode = |file: &str| std::fs::metadata(dir.path().join(file)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("ca/ca.key"), 0o600);
    let out = netd_cloud(&["certs", "ca", "--out", &ca], &[]);
    assert!(!out.status.success() && stderr(&out).contains("not replacing a CA"), "{}", stderr(&out));

    ok(
        &["certs", "node", "--ca-dir", &ca, "--name", "edge-1", "--ip", "10.0.5.7,fd00::7", "--out", &path("node")],
        &[],
    );
    let node = CertFiles::in_dir(&dir.path().join("node"), "node").load().unwrap();
    assert_eq!(node_name_of(&node.chain[0]).unwrap(), "edge-1");
    let ips: Vec<std::net::IpAddr> = vec!["10.0.5.7".parse().unwrap(), "fd00::7".parse().unwrap()];
    assert_eq!(ip_sans_of(&node.chain[0]).unwrap(), ips);
    assert_eq!(mode("node/node.key"), 0o600);

    let env = [("NETD_CERTS_CA_DIR", ca.as_str()), ("NETD_CERTS_DNS", "tunnel.example,tunnel")];
    ok(&["certs", "server", "--ip", "127.0.0.1", "--out", &path("server")], &env);
    let server = CertFiles::in_dir(&dir.path().join("server"), "server").load().unwrap();
    assert_eq!(ip_sans_of(&server.chain[0]).unwrap(), ["127.0.0.1".parse::<std::net::IpAddr>().unwrap()]);
    ok(&["certs", "client", "--ca-dir", &ca, "--cn", "kube-apiserver", "--out", &path("client")], &[]);
    let client = CertFiles::in_dir(&dir.path().join("client"), "client").load().unwrap();
    let error = node_name_of(&client.chain[0]).unwrap_err().to_string();
    assert_eq!(error, "certificate CN \"kube-apiserver\" is not system:node:<name>");

    let out = netd_cloud(
        &["certs", "node", "--ca-dir", &ca, "--name", "Edge_1", "--ip", "10.0.5.7", "--out", &path("x")],
        &[],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).starts_with("netd-cloud: invalid node name \"Edge_1\": character 1 'E'"), "{}", stderr(&out));
    let out =
        netd_cloud(&["certs", "server", "--ca-dir", &path("node"), "--ip", "127.0.0.1", "--out", &path("x")], &[]);
    assert!(stderr(&out).contains("ca.key: No such file"), "{}", stderr(&out));
    let out = netd_cloud(&["certs", "node", "--ca-dir", &ca, "--name", "edge-1", "--out", &path("x")], &[]);
    assert!(stderr(&out).contains("--ip <IP,...>"), "{}", stderr(&out));

    let help = stdout(&netd_cloud(&["certs", "node", "--help"], &[]));
    for expected in ["[env: NETD_CERTS_NODE=]", "[env: NETD_CERTS_IP=]", "[env: NETD_CERTS_CA_DIR=]", "Example:"] {
        assert!(help.contains(expected), "{expected:?} missing from\n{help}");
    }
}

#[test]
fn install_cni_installs_once_refuses_a_bad_conflist_and_says_what_it_did() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    std::fs::create_dir_all(dir.path().join("src")).unwrap();
    std::fs::create_dir_all(dir.path().join("host/net.d")).unwrap();
    std::fs::write(dir.path().join("src/netd-ipam"), "plugin").unwrap();
    let good = r#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"bridge","ipam":{"type":"netd-ipam"}}]}"#;
    std::fs::write(dir.path().join("src/cni-conf.json"), good).unwrap();
    std::fs::write(dir.path().join("host/net.d/10-flannel.conflist"), "flannel").unwrap();
    let (plugin, conflist) = (path("src/netd-ipam"), path("src/cni-conf.json"));
    // Directories by variable, sources by flag; --remove left at its default.
    let env = [("NETD_CNI_BIN_DIR", path("host/bin")), ("NETD_CNI_CONF_DIR", path("host/net.d"))];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let args = ["install-cni", "--plugin", &plugin, "--conflist", &conflist];

    let out = netd(&args, &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = stdout(&out);
    let lines: Vec<&str> = said.lines().collect();
    assert_eq!(lines.len(), 3, "{said}");
    assert!(lines[0].starts_with(&format!("installed {} (0755, 6 bytes) from {plugin}", path("host/bin/netd-ipam"))));
    assert!(lines[1].starts_with(&format!("installed {} (0644,", path("host/net.d/10-netd.conflist"))), "{said}");
    assert_eq!(lines[2], format!("removed {}", path("host/net.d/10-flannel.conflist")));
    let mode = |name: &str| std::fs::metadata(dir.path().join(name)).unwrap().permissions().mode() & 0o7777;
    assert_eq!((mode("host/bin/netd-ipam"), mode("host/net.d/10-netd.conflist")), (0o755, 0o644));
    assert_eq!(std::fs::read_to_string(dir.path().join("host/net.d/10-netd.conflist")).unwrap(), good);
    let inode = |name: &str| std::fs::metadata(dir.path().join(name)).unwrap().ino();
    let before = (inode("host/bin/netd-ipam"), inode("host/net.d/10-netd.conflist"));

    // Again: nothing is touched.
    let out = netd(&args, &env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).lines().take(2).all(|l| l.starts_with("unchanged ")), "{}", stdout(&out));
    assert_eq!((inode("host/bin/netd-ipam"), inode("host/net.d/10-netd.conflist")), before);

    // A ConfigMap that lost its netd-ipam: refused, exit 1, the good conflist stays.
    std::fs::write(dir.path().join("src/cni-conf.json"), r#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[]}"#)
        .unwrap();
    let out = netd(&args, &env);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out).trim(),
        format!(
            "netd: refusing to install {conflist}: no plugin has \"ipam\": {{\"type\": \"netd-ipam\"}} \
             (IPAM types found: none); the installed conflist is left as it is"
        )
    );
    assert_eq!(std::fs::read_to_string(dir.path().join("host/net.d/10-netd.conflist")).unwrap(), good);

    // A missing plugin is named.
    let missing = path("src/nothing");
    let out = netd(&["install-cni", "--plugin", &missing, "--conflist", &conflist], &env);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(&format!("cannot read plugin {missing}: No such file")), "{}", stderr(&out));

    let help = stdout(&netd(&["install-cni", "--help"], &[]));
    for expected in [
        "--plugin <SRC>",
        "[default: /usr/local/bin/netd-ipam]",
        "[env: NETD_CNI_BIN_DIR=]",
        "[default: /host/opt/cni/bin]",
        "[default: /etc/netd/cni-conf.json]",
        "[env: NETD_CNI_CONF_DIR=]",
        "[default: /host/etc/cni/net.d]",
        "[default: 10-netd.conflist]",
        "[default: 10-flannel.conflist]",
    ] {
        assert!(help.contains(expected), "{expected:?} missing from\n{help}");
    }
}

/// Starts `netd args…`, waits until its log says `ready` (the signal
/// handlers are in place by then), sends it `signal` and returns how it
/// exited and everything it logged; a process still running a few seconds
/// later is killed and the test fails.
fn stopped_by(program: &str, args: &[&str], ready: &str, signal: libc::c_int) -> (ExitStatus, String) {
    stopped_by_with(program, args, &[], ready, signal)
}

/// [`stopped_by`] with `env` in the program's environment.
fn stopped_by_with(
    program: &str,
    args: &[&str],
    env: &[(&str, &str)],
    ready: &str,
    signal: libc::c_int,
) -> (ExitStatus, String) {
    let mut child = command(program, args, env).stdin(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let (lines, log) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !seen.contains(ready) {
        let left = deadline.saturating_duration_since(Instant::now());
        match log.recv_timeout(left) {
            Ok(line) => seen.push_str(&(line + "\n")),
            Err(_) => {
                let _ = child.kill();
                panic!("netd {args:?} never said {ready:?}; exit {:?}, log:\n{seen}", child.wait().unwrap());
            }
        }
    }
    let sent = Instant::now();
    // SAFETY: kill(2) on the child we spawned and have not reaped yet.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, signal) }, 0);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if sent.elapsed() > Duration::from_secs(5) {
            child.kill().unwrap();
            child.wait().unwrap();
            reader.join().unwrap();
            seen.extend(log.try_iter().map(|line| line + "\n"));
            panic!("netd {args:?} still ran 5 s after signal {signal}; log:\n{seen}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    reader.join().unwrap();
    seen.extend(log.try_iter().map(|line| line + "\n"));
    (status, seen)
}

/// A tunnel CA under `dir`, and a node (`node/`) and server (`server/`)
/// certificate of it, as `netd-cloud certs` writes them.
fn tunnel_certs(dir: &Path) {
    let path = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    for args in [
        &["certs", "ca", "--out", &path("ca")][..],
        &["certs", "node", "--ca-dir", &path("ca"), "--name", "edge-1", "--ip", "127.0.0.1", "--out", &path("node")],
        &["certs", "server", "--ca-dir", &path("ca"), "--ip", "127.0.0.1", "--out", &path("server")],
    ] {
        let out = netd_cloud(args, &[]);
        assert!(out.status.success(), "netd-cloud {args:?} failed: {}", stderr(&out));
    }
}

/// A port on 127.0.0.1 where nothing listens (bound, then let go).
fn closed_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port().to_string()
}

/// `netd-cloud tunnel-server` with its certificates in `certs`, every door
/// on an ephemeral loopback port and no DNAT doors (no bpffs, no privilege).
fn loopback_tunnel_server(certs: &str) -> [&str; 15] {
    [
        "tunnel-server",
        "--cert-dir",
        certs,
        "--address",
        "127.0.0.1",
        "--agents-listen",
        "127.0.0.1:0",
        "--connect-listen",
        "127.0.0.1:0",
        "--dnat-listen",
        "",
        "--http-listen",
        "",
        "--metrics-listen",
        "127.0.0.1:0",
    ]
}

#[test]
fn tunnel_agent_and_server_stop_cleanly_on_sigterm_and_sigint() {
    let dir = tempfile::tempdir().unwrap();
    tunnel_certs(dir.path());
    let cert_dir = |stem: &str| dir.path().join(stem).to_str().unwrap().to_owned();
    // The agent with a server that never answers: it keeps retrying, and a
    // pod deletion (SIGTERM; the kubelet's signal to a container's PID 1)
    // must still end it at once and cleanly.
    let server = format!("127.0.0.1:{}", closed_port());
    let node = cert_dir("node");
    let agent = [
        "tunnel-agent",
        "--server",
        &server,
        "--cert-dir",
        &node,
        "--node-ip",
        "127.0.0.1",
        "--pod-subnet",
        "10.244.9.0/24",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    for (signal, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        let (status, log) = stopped_by(NETD, &agent, "tunnel agent: servers", signal);
        assert!(status.success(), "the agent's exit on {name}: {status:?}; log:\n{log}");
        assert!(log.contains(&format!("tunnel agent: {name}, stopping")), "{log}");
    }
    // The server on loopback only, no DNAT doors (no bpffs, no privilege).
    let certs = cert_dir("server");
    let server = loopback_tunnel_server(&certs);
    let (status, log) = stopped_by(NETD_CLOUD, &server, "tunnel server: agents link in", libc::SIGTERM);
    assert!(status.success(), "the server's exit on SIGTERM: {status:?}; log:\n{log}");
    assert!(log.contains("tunnel server: SIGTERM, stopping"), "{log}");
    // The same on a multi-thread runtime (the default is one thread).
    let (status, log) = stopped_by_with(
        NETD_CLOUD,
        &server,
        &[("NETD_RUNTIME_THREADS", "3")],
        "tunnel server: agents link in",
        libc::SIGINT,
    );
    assert!(status.success(), "the 3-thread server's exit on SIGINT: {status:?}; log:\n{log}");
    assert!(log.contains("tunnel server: SIGINT, stopping"), "{log}");
}

#[test]
fn runtime_threads_default_to_one_and_refuse_zero() {
    for args in [&["hub", "--help"][..], &["tunnel-agent", "--help"]] {
        let help = stdout(&netd(args, &[]));
        assert!(help.contains("--threads <N>"), "{args:?}:\n{help}");
        assert!(help.contains("[env: NETD_RUNTIME_THREADS=]") && help.contains("[default: 1]"), "{args:?}:\n{help}");
    }
    let out = netd(&["tunnel-agent", "--server", "127.0.0.1:1", "--threads", "0"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("invalid value '0' for '--threads <N>'"), "{}", stderr(&out));
    let out = netd_cloud(&["tunnel-server"], &[("NETD_RUNTIME_THREADS", "many")]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("many"), "{}", stderr(&out));
}

/// Every line of `log` as a JSON object with a timestamp, a level and the
/// message among its fields, as `--log-format json` promises.
fn json_lines(log: &str) -> Vec<serde_json::Value> {
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}\nlog:\n{log}")))
        .collect();
    assert!(!lines.is_empty(), "nothing logged");
    for line in &lines {
        let timestamp = line["timestamp"].as_str().unwrap_or_else(|| panic!("no timestamp: {line}"));
        // RFC 3339: 2026-12-07T09:15:02.123456Z
        assert!(timestamp.len() >= 20 && timestamp.as_bytes()[10] == b'T', "timestamp {timestamp:?}");
        let level = line["level"].as_str().unwrap_or_else(|| panic!("no level: {line}"));
        assert!(["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&level), "level {level:?}");
        assert!(line["fields"]["message"].is_string(), "no fields.message: {line}");
    }
    lines
}

/// The messages of [`json_lines`], in order.
fn messages(lines: &[serde_json::Value]) -> Vec<&str> {
    lines.iter().filter_map(|line| line["fields"]["message"].as_str()).collect()
}

#[test]
fn long_running_commands_take_log_format() {
    const NETD_CONTROLLER: &str = env!("CARGO_BIN_EXE_netd-controller");
    for (program, args) in [
        (NETD, &["run", "--help"][..]),
        (NETD, &["hub", "--help"]),
        (NETD, &["tunnel-agent", "--help"]),
        (NETD_CLOUD, &["tunnel-server", "--help"]),
        (NETD_CONTROLLER, &["run", "--help"]),
    ] {
        let out = command(program, args, &[]).output().unwrap();
        assert!(out.status.success(), "{program} {args:?}: {}", stderr(&out));
        let help = stdout(&out);
        assert!(help.contains("--log-format <FORMAT>"), "{program} {args:?}:\n{help}");
        assert!(help.contains("[env: NETD_LOG_FORMAT=]"), "{program} {args:?}:\n{help}");
        assert!(help.contains("[possible values: text, json]"), "{program} {args:?}:\n{help}");
    }
    let out = netd(&["tunnel-agent", "--server", "127.0.0.1:1", "--log-format", "yaml"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--log-format"), "{}", stderr(&out));
}

#[test]
fn log_format_json_writes_one_object_per_line_up_to_the_stop() {
    let dir = tempfile::tempdir().unwrap();
    tunnel_certs(dir.path());
    let cert_dir = |stem: &str| dir.path().join(stem).to_str().unwrap().to_owned();
    let server = format!("127.0.0.1:{}", closed_port());
    let node = cert_dir("node");
    let agent = |format: &'static str| {
        [
            "tunnel-agent",
            "--server",
            &server,
            "--cert-dir",
            &node,
            "--node-ip",
            "127.0.0.1",
            "--pod-subnet",
            "10.244.9.0/24",
            "--metrics-listen",
            "127.0.0.1:0",
            "--log-format",
            format,
        ]
        .map(str::to_owned)
    };
    let json_agent = agent("json");
    let args: Vec<&str> = json_agent.iter().map(String::as_str).collect();
    let (status, log) = stopped_by(NETD, &args, "tunnel agent: servers", libc::SIGTERM);
    assert!(status.success(), "{status:?}; log:\n{log}");
    let lines = json_lines(&log);
    let said = messages(&lines);
    assert!(said.first().is_some_and(|m| m.starts_with("tunnel agent: servers")), "{said:?}");
    assert!(said.contains(&"tunnel agent: SIGTERM, stopping"), "{said:?}");
    assert!(lines.iter().all(|line| line.get("target").is_none()), "targets are off, as in text: {log}");

    // The variable does the same, here for the tunnel server.
    let certs = cert_dir("server");
    let tunnel_server = loopback_tunnel_server(&certs);
    let (status, log) = stopped_by_with(
        NETD_CLOUD,
        &tunnel_server,
        &[("NETD_LOG_FORMAT", "JSON")],
        "tunnel server: agents link in",
        libc::SIGTERM,
    );
    assert!(status.success(), "{status:?}; log:\n{log}");
    assert!(messages(&json_lines(&log)).contains(&"tunnel server: SIGTERM, stopping"), "{log}");

    // Text stays the default and stays text.
    let text_agent = agent("text");
    let args: Vec<&str> = text_agent.iter().map(String::as_str).collect();
    let (status, log) = stopped_by(NETD, &args, "tunnel agent: servers", libc::SIGTERM);
    assert!(status.success(), "{status:?}; log:\n{log}");
    assert!(log.lines().all(|line| serde_json::from_str::<serde_json::Value>(line).is_err()), "{log}");
    assert!(log.contains(" INFO tunnel agent: SIGTERM, stopping"), "{log}");
}
