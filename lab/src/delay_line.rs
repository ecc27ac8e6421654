//! An emulated WAN between two namespaces for kernels without `sch_netem`
//! (this machine's has none, nor `fq`, so neither netem nor EDT pacing can
//! delay packets): a TUN device in each namespace and this process in
//! between, holding every packet for a fixed one-way delay behind a rate
//! limit — what `tc qdisc add … netem delay D rate R limit L` does, per
//! direction.
//!
//! The TUN devices speak virtio-net headers with TSO on (`IFF_VNET_HDR`,
//! `TUNSETOFFLOAD`), so TCP hands over 64 KiB segments, not 1 500-byte
//! packets, and the relay moves ~2 000 packets/s at 1 Gbit/s instead of
//! ~80 000: on two shared cores the relay stays far from being the
//! bottleneck. Each buffer read from one device (header + packet) is
//! written unchanged to the other, where the kernel takes it as a
//! received, checksum-offloaded GSO packet, as from a VM's NIC.
//!
//! Traffic is steered through it with /32 routes between the two link
//! addresses, which apply to established connections too (route changes
//! invalidate cached routes); removing the routes returns to the direct
//! link.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use netd::testing::NetNs;

/// The TUN device's name in both namespaces.
const DEVICE: &str = "wan0";
/// virtio_net_hdr (without num_buffers), the TUN default with IFF_VNET_HDR.
const VNET_HDR: usize = 10;
/// Room for a 64 KiB GSO packet and its header.
const BUFFER: usize = 65_536 + VNET_HDR + 64;

/// How the emulated link behaves in each direction.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// One-way delay.
    pub delay: Duration,
    /// Bits per second.
    pub rate: u64,
    /// Packets queued at most (beyond: dropped, as netem's `limit`).
    pub limit: usize,
}

/// Packets waiting for their delivery time, oldest first.
#[derive(Default)]
struct Queue {
    packets: VecDeque<(Instant, Vec<u8>)>,
}

/// One direction: a reader thread timestamps, a writer thread delivers.
struct Direction {
    threads: Vec<JoinHandle<()>>,
    dropped: Arc<AtomicU64>,
}

/// The two TUN devices, their routes and the relay threads; removed on drop.
pub struct DelayLine {
    stop: Arc<AtomicBool>,
    directions: Vec<Direction>,
    routes: Vec<(String, String)>,
}

fn open_tun(ns: &NetNs) -> Result<File> {
    let file = ns
        .run(|| -> Result<File> {
            // Opened from a thread inside `ns`: the device is created there.
            let file = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
            // SAFETY: ifreq is plain bytes and integers; all-zero is valid.
            let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
            for (slot, byte) in ifr.ifr_name.iter_mut().zip(DEVICE.bytes()) {
                *slot = byte as libc::c_char;
            }
            ifr.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
            // SAFETY: TUNSETIFF reads and writes one ifreq, which outlives the call.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
            ensure!(rc == 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
            let offload = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
            // SAFETY: TUNSETOFFLOAD takes the flags by value.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETOFFLOAD, offload as libc::c_ulong) };
            ensure!(rc == 0, "TUNSETOFFLOAD: {}", std::io::Error::last_os_error());
            Ok(file)
        })?
        .with_context(|| format!("creating TUN device {DEVICE} in {}", ns.name()))?;
    ns.ip(&["link", "set", DEVICE, "up"])?;
    Ok(file)
}

/// Waits up to 100 ms for `file` to be readable (so the reader sees `stop`).
fn readable(file: &File) -> bool {
    let mut poll = libc::pollfd { fd: file.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: poll reads and writes one pollfd, which outlives the call.
    unsafe { libc::poll(&mut poll, 1, 100) > 0 }
}

fn direction(from: File, to: File, shape: Shape, stop: Arc<AtomicBool>) -> Direction {
    let queue = Arc::new((Mutex::new(Queue::default()), Condvar::new()));
    let dropped = Arc::new(AtomicU64::new(0));
    let reader = {
        let (queue, stop, dropped) = (queue.clone(), stop.clone(), dropped.clone());
        let mut from = from;
        std::thread::spawn(move || {
            // When the link is next free: packets leave one after another at `rate`.
            let mut free_at = Instant::now();
            let mut buffer = vec![0u8; BUFFER];
            while !stop.load(Ordering::Relaxed) {
                if !readable(&from) {
                    continue;
                }
                let Ok(n) = from.read(&mut buffer) else { continue };
                let now = Instant::now();
                let bits = (n.saturating_sub(VNET_HDR) * 8) as u64;
                free_at = free_at.max(now) + Duration::from_nanos(bits * 1_000_000_000 / shape.rate);
                let (lock, wake) = &*queue;
                let mut waiting = lock.lock().unwrap_or_else(PoisonError::into_inner);
                if waiting.packets.len() >= shape.limit {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                waiting.packets.push_back((free_at + shape.delay, buffer[..n].to_vec()));
                wake.notify_one();
            }
            queue.1.notify_all();
        })
    };
    let writer = {
        let mut to = to;
        std::thread::spawn(move || {
            let (lock, wake) = &*queue;
            while !stop.load(Ordering::Relaxed) {
                let due = {
                    let mut waiting = lock.lock().unwrap_or_else(PoisonError::into_inner);
                    match waiting.packets.front().map(|(at, _)| *at) {
                        None => {
                            let _ = wake.wait_timeout(waiting, Duration::from_millis(100));
                            continue;
                        }
                        Some(at) if at > Instant::now() => {
                            drop(waiting);
                            std::thread::sleep(at.saturating_duration_since(Instant::now()));
                            continue;
                        }
                        Some(_) => {
                            let now = Instant::now();
                            let mut due = Vec::new();
                            while waiting.packets.front().is_some_and(|(at, _)| *at <= now) {
                                due.extend(waiting.packets.pop_front().map(|(_, packet)| packet));
                            }
                            due
                        }
                    }
                };
                for packet in due {
                    // A write fails only for a malformed packet: dropped, as a wire would.
                    let _ = to.write(&packet);
                }
            }
        })
    };
    Direction { threads: vec![reader, writer], dropped }
}

impl DelayLine {
    /// Puts the emulated link between `a` (link address `a_ip`) and `b`
    /// (`b_ip`): TUN devices, relay threads, then the routes.
    pub fn start(a: &NetNs, a_ip: Ipv4Addr, b: &NetNs, b_ip: Ipv4Addr, shape: Shape) -> Result<Self> {
        let (a_tun, b_tun) = (open_tun(a)?, open_tun(b)?);
        let stop = Arc::new(AtomicBool::new(false));
        let directions = vec![
            direction(a_tun.try_clone()?, b_tun.try_clone()?, shape, stop.clone()),
            direction(b_tun, a_tun, shape, stop.clone()),
        ];
        let mut line = Self { stop, directions, routes: Vec::new() };
        for (ns, src, dst) in [(a, a_ip, b_ip), (b, b_ip, a_ip)] {
            ns.ip(&["route", "add", &format!("{dst}/32"), "dev", DEVICE, "src", &src.to_string()])?;
            line.routes.push((ns.name().to_string(), format!("{dst}/32")));
        }
        Ok(line)
    }

    /// Packets dropped because a queue was full, both directions.
    pub fn dropped(&self) -> u64 {
        self.directions.iter().map(|d| d.dropped.load(Ordering::Relaxed)).sum()
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        // Routes first: traffic goes back to the direct link before the relay stops.
        for (ns, route) in &self.routes {
            let _ = netd::testing::run_command("ip", &["-n", ns, "route", "del", route, "dev", DEVICE]);
        }
        self.stop.store(true, Ordering::Relaxed);
        for direction in &mut self.directions {
            for thread in direction.threads.drain(..) {
                let _ = thread.join();
            }
        }
        // The last descriptor of each TUN device closes with its threads: the devices go.
    }
}
