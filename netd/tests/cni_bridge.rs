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
