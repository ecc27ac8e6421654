//! Our IPAM as the IPAM of Debian's real `bridge` plugin, in namespaces:
//! pods get working addresses, and a re-created sandbox keeps its address.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;

use netd::testing::{self, plugin_dir_of, CniCall, CniRunner, NetNs, DEBIAN_CNI_DIR};
use serde_json::Value;

fn config(data_dir: &std::path::Path) -> String {
    format!(
        r#"{{"cniVersion":"1.0.0","name":"podnet","type":"bridge","bridge":"cni0","isGateway":true,
            "ipam":{{"type":"netd-ipam","subnet":"10.61.0.0/24","dataDir":"{}","routes":[{{"dst":"0.0.0.0/0"}}]}}}}"#,
        data_dir.display()
    )
}

fn pod_ip(pod: &NetNs) -> String {
    let out = pod.ip(&["-4", "-o", "addr", "show", "dev", "eth0"]).unwrap();
    out.split_whitespace().skip_while(|w| *w != "inet").nth(1).unwrap().to_string()
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn bridge_with_netd_ipam_pins_ips_across_sandbox_recreation() {
    let Some(_kernel) = testing::privileged().unwrap() else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let conf = config(data.path());
    let node = NetNs::new().unwrap();
    let runner =
        CniRunner::new(&node, vec![PathBuf::from(DEBIAN_CNI_DIR), plugin_dir_of(env!("CARGO_BIN_EXE_netd-ipam"))]);

    let web = NetNs::new().unwrap();
    let client = NetNs::new().unwrap();
    let add = |container: &str, netns: &NetNs, pod: &str| -> String {
        let out = runner
            .call_ok(
                "bridge",
                &CniCall { command: "ADD", container_id: container, pod_netns: netns, ifname: "eth0", pod: Some(pod) },
                &conf,
            )
            .unwrap();
        let result: Value = serde_json::from_slice(&out.stdout).unwrap();
        result["ips"][0]["address"].as_str().unwrap().to_string()
    };
    let del = |container: &str, netns: &NetNs| {
        runner
            .call_ok(
                "bridge",
                &CniCall { command: "DEL", container_id: container, pod_netns: netns, ifname: "eth0", pod: None },
                &conf,
            )
            .unwrap();
    };

    let web_ip = add("web-sandbox-1", &web, "default/web");
    let client_ip = add("client-sandbox-1", &client, "default/client");
    assert_ne!(web_ip, client_ip);
    assert_eq!(pod_ip(&web), web_ip, "the bridge plugin configured what our IPAM returned");
    let gw_route = web.ip(&["route", "show", "default"]).unwrap();
    assert!(gw_route.contains("via 10.61.0.1"), "{gw_route}");

    // Pod-to-pod traffic through the node's bridge.
    let web_addr = web_ip.split('/').next().unwrap().to_string();
    let listener = web.run(|| TcpListener::bind((web_addr.as_str(), 0)).unwrap()).unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut conn, peer) = listener.accept().unwrap();
        conn.write_all(b"hi").unwrap();
        peer.ip().to_string()
    });
    let got = client
        .run(|| {
            let mut s = TcpStream::connect((web_addr.as_str(), port)).unwrap();
            let mut buf = [0u8; 2];
            s.read_exact(&mut buf).unwrap();
            buf
        })
        .unwrap();
    assert_eq!(&got, b"hi");
    assert_eq!(format!("{}/24", server.join().unwrap()), client_ip);

    // Sandbox re-created: DEL, a brand-new namespace, a new container ID.
    del("web-sandbox-1", &web);
    drop(web);
    let web2 = NetNs::new().unwrap();
    assert_eq!(add("web-sandbox-2", &web2, "default/web"), web_ip);
    assert_eq!(pod_ip(&web2), web_ip);
    // A different pod name gets a different address.
    let other = NetNs::new().unwrap();
    let other_ip = add("other-sandbox", &other, "default/other");
    assert!(other_ip != web_ip && other_ip != client_ip);

    del("web-sandbox-2", &web2);
    del("client-sandbox-1", &client);
    del("other-sandbox", &other);
}

/// A full pool through the real `bridge` plugin: a new pod reclaims the
/// address released longest ago, the bridge configures it, the reason
/// reaches the runtime on stderr, and a pod that is still attached keeps
/// its address.
#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn bridge_with_netd_ipam_reclaims_the_oldest_released_pin_when_the_pool_is_full() {
    let Some(_kernel) = testing::privileged().unwrap() else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    // 10.62.0.0/29: .1 is the bridge's gateway, .2-.6 go to pods.
    let conf = format!(
        r#"{{"cniVersion":"1.0.0","name":"podnet","type":"bridge","bridge":"cni1","isGateway":true,
            "ipam":{{"type":"netd-ipam","subnet":"10.62.0.0/29","dataDir":"{}"}}}}"#,
        data.path().display()
    );
    let node = NetNs::new().unwrap();
    let runner =
        CniRunner::new(&node, vec![PathBuf::from(DEBIAN_CNI_DIR), plugin_dir_of(env!("CARGO_BIN_EXE_netd-ipam"))]);
    let call = |command, container: &str, netns: &NetNs, pod: Option<&str>| {
        let call = CniCall { command, container_id: container, pod_netns: netns, ifname: "eth0", pod };
        runner.call_ok("bridge", &call, &conf).unwrap()
    };
    let address = |out: &std::process::Output| -> String {
        let result: Value = serde_json::from_slice(&out.stdout).unwrap();
        result["ips"][0]["address"].as_str().unwrap().to_string()
    };
    let running = NetNs::new().unwrap();
    let running_ip = address(&call("ADD", "running", &running, Some("default/running")));
    let mut gone = Vec::new();
    for i in 0..4 {
        let netns = NetNs::new().unwrap();
        let ip = address(&call("ADD", &format!("gone-{i}"), &netns, Some(&format!("default/gone-{i}"))));
        call("DEL", &format!("gone-{i}"), &netns, None);
        gone.push(ip);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }

    let fresh = NetNs::new().unwrap();
    let out = call("ADD", "fresh", &fresh, Some("default/fresh"));
    assert_eq!(address(&out), gone[0], "the pin released longest ago is reclaimed");
    assert_eq!(pod_ip(&fresh), gone[0], "the bridge plugin configured the reclaimed address");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ip0 = gone[0].split('/').next().unwrap();
    assert!(stderr.contains(&format!("reclaimed {ip0} from pod default/gone-0 (eth0)")), "stderr: {stderr}");
    assert_eq!(pod_ip(&running), running_ip);

    // The reclaimed pod comes back: it takes the next-oldest released pin, never the running pod's.
    let back = NetNs::new().unwrap();
    let out = call("ADD", "gone-0-again", &back, Some("default/gone-0"));
    assert_eq!(address(&out), gone[1]);
    assert_ne!(address(&out), running_ip);
    let stats = netd_ipam::Store::open(data.path().join("podnet/netd-ipam.db")).unwrap().stats().unwrap();
    assert_eq!((stats.attached, stats.released, stats.freed.pressure), (3, 2, 2));

    for (container, netns) in [("running", &running), ("fresh", &fresh), ("gone-0-again", &back)] {
        call("DEL", container, netns, None);
    }
}
