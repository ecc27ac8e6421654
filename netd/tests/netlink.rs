//! The batching netlink client against a real kernel, in a fresh namespace.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::Ipv4Addr;

use netd::netlink::{Change, FdbEntry, Handle, Neighbour, Nexthop, Route};
use netd::testing::{self, NetNs};

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn batch_errors_map_to_their_requests_and_the_rest_applies() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let ns = NetNs::new().unwrap();
    ns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"]).unwrap();
    ns.ip(&["addr", "add", "172.16.0.1/12", "dev", "eth0"]).unwrap();
    ns.ip(&["link", "set", "eth0", "up"]).unwrap();
    ns.ip(&["link", "add", "vx", "type", "vxlan", "id", "7", "local", "172.16.0.1", "dev", "eth0", "dstport", "8472"])
        .unwrap();
    ns.ip(&["link", "set", "vx", "up"]).unwrap();
    ns.run(|| {
        let mut handle = Handle::new().unwrap();
        let vx = handle.link().get("vx").unwrap().unwrap();
        assert_eq!(vx.vxlan.map(|v| (v.vni, v.port)), Some((7, 8472)));
        assert!(handle.link().get("nope0").unwrap().is_none());
        let mac = [0x0e, 0, 0, 0, 0, 2];
        let mut changes = Vec::new();
        // 3 000 good changes around 2 bad ones: several sendmsg chunks.
        for i in 0..1_000u32 {
            let gw = Ipv4Addr::new(10, (i >> 8) as u8, i as u8, 0);
            changes.push(Change::SetNexthop(Nexthop { id: 1 + i, gateway: gw, oif: vx.index, onlink: true }));
            changes.push(Change::SetRoute(Route::via_nexthop(ipnet::Ipv4Net::new(gw, 24).unwrap(), 1 + i)));
            changes.push(Change::SetNeighbour(Neighbour::permanent(vx.index, gw, mac)));
            if i == 10 {
                // No such nexthop.
                changes.push(Change::SetRoute(Route::via_nexthop("10.200.0.0/24".parse().unwrap(), 999_999)));
            }
            if i == 900 {
                // No such device.
                changes.push(Change::SetFdb(FdbEntry { ifindex: 9_999, mac, dst: Ipv4Addr::new(172, 16, 0, 9) }));
            }
        }
        let failures = handle.apply(&changes).unwrap();
        assert_eq!(failures.len(), 2, "{failures:?}");
        let (first, second) = (&failures[0], &failures[1]);
        assert_eq!(first.0, 33);
        assert_eq!(changes[first.0], Change::SetRoute(Route::via_nexthop("10.200.0.0/24".parse().unwrap(), 999_999)));
        let text = first.1.to_string();
        assert!(text.contains("ip route replace 10.200.0.0/24 nhid 999999"), "{text}");
        assert!(first.1.errno().is_some());
        assert!(matches!(changes[second.0], Change::SetFdb(_)));
        assert!(second.1.to_string().contains("bridge fdb replace 0e:00:00:00:00:02 dev #9999"), "{}", second.1);

        assert_eq!(handle.nexthop().list().unwrap().len(), 1_000);
        let routes = handle.route().list().unwrap();
        assert_eq!(routes.iter().filter(|r| r.oif == Some(vx.index)).count(), 1_000);
        assert_eq!(handle.neighbour().list(vx.index).unwrap().len(), 1_000);
        // A single request reports its own error.
        let err =
            handle.nexthop().delete(Nexthop { id: 424_242, gateway: Ipv4Addr::UNSPECIFIED, oif: 0, onlink: false });
        let err = err.execute().unwrap_err();
        assert_eq!(err.errno(), Some(libc::ENOENT));
    })
    .unwrap();
}
