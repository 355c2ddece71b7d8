//! Simulated hosts: one network namespace per node on a Linux bridge, each with its own
//! address in 198.18.<k>.0/24 (RFC 2544 benchmarking space), where `k` numbers the cluster,
//! and an IPv6 one in fd00:198:18:<k>::/64 (unique local).
//! Clusters are claimed by creating their bridge (atomic in the kernel) and swept by
//! naming convention, so nothing outlives a test run, even one that was killed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::process::{run, run_quiet};

/// Where cluster directories live.
pub const BASE_DIR: &str = "/tmp/mirrorlet-e2e";

/// A claimed cluster slot: its number, bridge and working directory.
#[derive(Debug)]
pub struct Slot {
    /// The cluster number `k`.
    pub k: u8,
    /// The working directory (`/tmp/mirrorlet-e2e/c<k>`).
    pub dir: PathBuf,
}

impl Slot {
    /// Sweeps stale clusters, then claims a free slot and brings its bridge up.
    pub fn claim() -> Result<Self> {
        sweep_stale();
        for k in 0..=200u8 {
            let bridge = bridge_name(k);
            if run("ip", &["link", "add", &bridge, "type", "bridge"]).is_err() {
                continue;
            }
            let dir = cluster_dir(k);
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::write(dir.join("owner.pid"), std::process::id().to_string())?;
            let gw = format!("{}/24", gateway(k));
            run("ip", &["addr", "add", &gw, "dev", &bridge])?;
            let gw6 = format!(
                "{}/64",
                Ipv6Addr::new(0xfd00, 0x198, 0x18, k.into(), 0, 0, 0, 1)
            );
            run("ip", &["addr", "add", &gw6, "dev", &bridge, "nodad"])?;
            run("ip", &["link", "set", &bridge, "up"])?;
            return Ok(Self { k, dir });
        }
        anyhow::bail!("no free cluster slot (are 200 clusters running?)")
    }

    /// The bridge's name.
    pub fn bridge(&self) -> String {
        bridge_name(self.k)
    }

    /// Creates a host: namespace `ml<k>-<name>`, veth to the bridge, address `.<octet>`.
    pub fn add_host(&self, name: &str, octet: u8) -> Result<Host> {
        let netns = format!("ml{}-{name}", self.k);
        let veth = format!("ml{}{name}", self.k);
        anyhow::ensure!(veth.len() <= 15, "interface name {veth} too long");
        run("ip", &["netns", "add", &netns])?;
        run(
            "ip",
            &[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ],
        )?;
        run(
            "ip",
            &["link", "set", &veth, "master", &self.bridge(), "up"],
        )?;
        let addr = Ipv4Addr::new(198, 18, self.k, octet);
        let addr6 = Ipv6Addr::new(0xfd00, 0x198, 0x18, self.k.into(), 0, 0, 0, octet.into());
        // The IPv6 address is usable at once (no duplicate address detection).
        for (cidr, extra) in [
            (format!("{addr}/24"), None),
            (format!("{addr6}/64"), Some("nodad")),
        ] {
            let mut args = vec!["-n", &netns, "addr", "add", &cidr, "dev", "eth0"];
            args.extend(extra);
            run("ip", &args)?;
        }
        run("ip", &["-n", &netns, "link", "set", "eth0", "up"])?;
        run("ip", &["-n", &netns, "link", "set", "lo", "up"])?;
        Ok(Host {
            netns,
            veth,
            addr,
            addr6,
        })
    }

    /// Gives every listed namespace an /etc/hosts (bind-mounted by `ip netns exec`) in
    /// which `name` resolves to all of `addrs`.
    pub fn set_hosts(&self, namespaces: &[&str], name: &str, addrs: &[IpAddr]) -> Result<()> {
        let mut text = String::from("127.0.0.1 localhost\n");
        for a in addrs {
            text.push_str(&format!("{a} {name}\n"));
        }
        for ns in namespaces {
            let dir = Path::new("/etc/netns").join(ns);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("hosts"), &text)?;
        }
        Ok(())
    }

    /// Tears down everything of this slot.
    pub fn teardown(&self) {
        teardown(self.k);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        teardown(self.k);
    }
}

/// A simulated host on the bridge.
#[derive(Debug, Clone)]
pub struct Host {
    /// Network namespace name.
    pub netns: String,
    /// The bridge-side veth (set it down to cut the host off).
    pub veth: String,
    /// The host's address.
    pub addr: Ipv4Addr,
    /// Its IPv6 address.
    pub addr6: Ipv6Addr,
}

impl Host {
    /// Its IPv6 address if `ipv6`, else its IPv4 one.
    pub fn ip(&self, ipv6: bool) -> IpAddr {
        if ipv6 {
            self.addr6.into()
        } else {
            self.addr.into()
        }
    }
}

impl Host {
    /// Cuts the host off the network.
    pub fn link_down(&self) -> Result<()> {
        run("ip", &["link", "set", &self.veth, "down"]).map(drop)
    }

    /// Takes the host's IPv4 address away: an IPv6-only host.
    pub fn drop_ipv4(&self) -> Result<()> {
        let addr = format!("{}/24", self.addr);
        run(
            "ip",
            &["-n", &self.netns, "addr", "del", &addr, "dev", "eth0"],
        )
        .map(drop)
    }

    /// Reconnects the host.
    pub fn link_up(&self) -> Result<()> {
        run("ip", &["link", "set", &self.veth, "up"]).map(drop)
    }

    /// Gives the host a second address, `.octet` on the same network (another "host" for
    /// servers that must look like a different machine, e.g. a CDN).
    pub fn add_addr(&self, octet: u8) -> Result<Ipv4Addr> {
        let [a, b, c, _] = self.addr.octets();
        let addr = Ipv4Addr::new(a, b, c, octet);
        run(
            "ip",
            &[
                "-n",
                &self.netns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ],
        )?;
        Ok(addr)
    }

    /// Caps what the host sends at `rate` (tc's notation, e.g. `200mbit`), like a
    /// realistic internet registry.
    pub fn cap_upload(&self, rate: &str) -> Result<()> {
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.netns,
                "tc",
                "qdisc",
                "replace",
                "dev",
                "eth0",
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "256kb",
                "latency",
                "400ms",
            ],
        )
        .map(drop)
    }

    /// Removes the cap.
    pub fn uncap_upload(&self) -> Result<()> {
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.netns,
                "tc",
                "qdisc",
                "del",
                "dev",
                "eth0",
                "root",
            ],
        )
        .map(drop)
    }
}

fn bridge_name(k: u8) -> String {
    format!("mlbr{k}")
}

/// The bridge's own address in slot `k` (the test process reaches hosts through it).
pub fn gateway(k: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, k, 1)
}

fn cluster_dir(k: u8) -> PathBuf {
    Path::new(BASE_DIR).join(format!("c{k}"))
}

fn pid_alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

/// Tears down clusters whose owning test process is gone.
pub fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(BASE_DIR) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(k) = name.strip_prefix('c').and_then(|n| n.parse::<u8>().ok()) else {
            continue;
        };
        let owner = std::fs::read_to_string(e.path().join("owner.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        if owner.is_none_or(|pid| !pid_alive(pid)) {
            teardown(k);
        }
    }
}

/// Processes whose command line mentions `dir`.
fn processes_under(dir: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == std::process::id() as i32 {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline)
            .replace('\0', " ")
            .contains(dir)
        {
            out.push(pid);
        }
    }
    out
}

fn mounts_under(dir: &str) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<String> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(ToOwned::to_owned))
        .filter(|m| m.starts_with(dir))
        .collect();
    // Deepest first.
    out.sort_by_key(|m| std::cmp::Reverse(m.len()));
    out
}

/// Host-side veths of slot `k` (`ml<k><letter>...`).
fn veths_of(k: u8) -> Vec<String> {
    let prefix = format!("ml{k}");
    std::fs::read_dir("/sys/class/net")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    n.strip_prefix(&prefix)
                        .and_then(|rest| rest.chars().next())
                        .is_some_and(|c| c.is_ascii_lowercase())
                })
                .collect()
        })
        .unwrap_or_default()
}

fn namespaces_of(k: u8) -> Vec<String> {
    let prefix = format!("ml{k}-");
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Kills processes, unmounts, deletes namespaces, the bridge and the directory of slot `k`.
pub fn teardown(k: u8) {
    let dir = cluster_dir(k);
    let dir_s = format!("{}/", dir.display());
    for sig in [Signal::SIGTERM, Signal::SIGKILL] {
        let pids = processes_under(&dir_s);
        if pids.is_empty() {
            break;
        }
        for pid in &pids {
            let _ = kill(Pid::from_raw(*pid), sig);
        }
        for _ in 0..100 {
            if processes_under(&dir_s).is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    for m in mounts_under(&dir_s) {
        run_quiet("umount", &["-l", &m]);
    }
    for ns in namespaces_of(k) {
        run_quiet("ip", &["netns", "del", &ns]);
    }
    // A namespace lives on while sockets in it wait out TCP timers (after a cut link, say);
    // deleting the host side of each veth frees the names at once.
    for veth in veths_of(k) {
        run_quiet("ip", &["link", "del", &veth]);
    }
    let prefix = format!("ml{k}-");
    if let Ok(entries) = std::fs::read_dir("/etc/netns") {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    run_quiet("ip", &["link", "del", &bridge_name(k)]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// What slot `k` left behind: processes, mounts, namespaces, the bridge, the directory.
pub fn leftovers(k: u8) -> Vec<String> {
    let dir = cluster_dir(k);
    let dir_s = format!("{}/", dir.display());
    let mut out: Vec<String> = processes_under(&dir_s)
        .into_iter()
        .map(|p| format!("process {p}"))
        .collect();
    out.extend(
        mounts_under(&dir_s)
            .into_iter()
            .map(|m| format!("mount {m}")),
    );
    out.extend(namespaces_of(k).into_iter().map(|n| format!("netns {n}")));
    out.extend(veths_of(k).into_iter().map(|n| format!("veth {n}")));
    let prefix = format!("ml{k}-");
    if let Ok(entries) = std::fs::read_dir("/etc/netns") {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                out.push(format!("/etc/netns entry {}", e.path().display()));
            }
        }
    }
    if Path::new("/sys/class/net").join(bridge_name(k)).exists() {
        out.push(format!("bridge {}", bridge_name(k)));
    }
    if dir.exists() {
        out.push(format!("directory {}", dir.display()));
    }
    out
}
