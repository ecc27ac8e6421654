//! Optional masquerade: flannel's `FLANNEL-POSTRTG` rule set, programmed in
//! nftables through `nft -j`.
//!
//! # Why a table of its own
//!
//! netd keeps its rules in `table ip netd-masq` and touches nothing else:
//! no other table, no other chain, not iptables' `nat` table. That makes
//! every operation whole and safe next to kube-proxy, iptables-nft, firewalld
//! or flannel itself:
//!
//! - [`Masquerade::apply`] is one nft transaction that replaces the whole
//!   table (`add table`, `delete table`, `add table`, `add chain`, `add rule`
//!   ×6): the kernel never sees a half-written rule set, and whatever the
//!   table held before (an older rule set, a rule someone added) is gone;
//! - [`Masquerade::remove`] is one `delete table` (preceded by `add table` in
//!   the same transaction, so an absent table is not an error);
//! - [`Masquerade::installed`] reads back only that table, so drift (someone
//!   flushed it, deleted a rule, made it dormant) is detectable by
//!   [`Masquerade::is_current`] and repaired by [`Masquerade::ensure`].
//!
//! # The rules
//!
//! For cluster network `N` (e.g. `10.244.0.0/16`) and this node's subnet `S`
//! (e.g. `10.244.1.0/24`), in chain `postrouting` (`type nat hook postrouting
//! priority srcnat` — 100 — `policy accept`), in this order, each with a
//! `counter`:
//!
//! | # | nftables | flannel's iptables (`-t nat -A FLANNEL-POSTRTG`) |
//! | - | -------- | ------------------------------------------------ |
//! | 1 | `meta mark & 0x4000 == 0x4000 return` | `-m mark --mark 0x4000/0x4000 -j RETURN` |
//! | 2 | `ip saddr S ip daddr N return` | `-s S -d N -j RETURN` |
//! | 3 | `ip saddr N ip daddr S return` | `-s N -d S -j RETURN` |
//! | 4 | `ip saddr != N ip daddr S return` | `! -s N -d S -j RETURN` |
//! | 5 | `ip saddr N ip daddr != 224.0.0.0/4 masquerade fully-random` | `-s N ! -d 224.0.0.0/4 -j MASQUERADE --random-fully` |
//! | 6 | `ip saddr != N ip daddr N masquerade fully-random` | `! -s N -d N -j MASQUERADE --random-fully` |
//!
//! Rule 1 leaves packets kube-proxy marked for masquerade to kube-proxy's own
//! chain (masquerading twice trips a conntrack bug on some kernels). Rules
//! 2–4 keep pod↔cluster traffic untouched, also traffic from outside the
//! cluster that a node forwards to its own pods. Rule 5 masquerades cluster
//! traffic leaving the cluster (multicast excepted), rule 6 host traffic
//! entering it. `return` in a base chain ends this chain only: other nat
//! chains on the hook (kube-proxy's) still run.
//!
//! # Namespaces
//!
//! `nft` is run as a child process, which inherits the network namespace of
//! the calling *thread*. To program a namespace, call these functions on a
//! thread that has `setns(2)`'d into it (see `NetNs::run` in the test
//! harness).
//!
//! IPv6 is not programmed yet; [`Family`] and the read-back types already
//! carry the family and [`ipnet::IpNet`] addresses so an `ip6 netd-masq`
//! table can follow.

use std::fmt;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};

use ipnet::{IpNet, Ipv4Net};
use serde_json::{json, Value};

/// Name of netd's masquerade table (in family [`Family::Ip`]).
pub const TABLE: &str = "netd-masq";

/// Name of the base chain inside [`TABLE`].
pub const CHAIN: &str = "postrouting";

/// nftables' `srcnat` priority, the priority of [`CHAIN`].
pub const SRCNAT_PRIORITY: i64 = 100;

/// kube-proxy's masquerade mark bit: packets carrying it are left alone.
pub const KUBE_PROXY_MARK: u32 = 0x4000;

/// IPv4 multicast, never masqueraded.
pub const MULTICAST: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(224, 0, 0, 0), 4);

/// Where `nft` is looked for: `PATH` first, then Debian's location (root's
/// `PATH` has it; a service manager's may not).
const NFT_CANDIDATES: &[&str] = &["nft", "/usr/sbin/nft"];

/// Errors of the masquerade module.
#[derive(Debug, thiserror::Error)]
pub enum MasqueradeError {
    /// The node subnet is not part of the cluster network.
    #[error("node subnet {subnet} is not inside cluster network {network}: masquerade rules would be meaningless")]
    SubnetOutsideNetwork {
        /// The cluster network.
        network: Ipv4Net,
        /// The node subnet.
        subnet: Ipv4Net,
    },
    /// No `nft` binary was found.
    #[error("`nft` not found (looked in PATH and /usr/sbin): install the Debian package `nftables`")]
    NftMissing,
    /// `nft` exists but could not be started or talked to.
    #[error("could not run `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `nft` ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    NftFailed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// `nft` printed something that is not JSON.
    #[error("`{command}` printed invalid JSON")]
    BadJson {
        /// The command line.
        command: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// `nft` printed JSON of an unexpected shape.
    #[error("`{command}` printed JSON netd does not understand: {why}")]
    UnexpectedJson {
        /// The command line.
        command: String,
        /// What is wrong with it.
        why: String,
    },
}

/// An nftables address family netd may own a masquerade table in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// `ip`: IPv4 (the only family programmed today).
    Ip,
    /// `ip6`: IPv6 (reserved for the IPv6 rule set).
    Ip6,
}

impl Family {
    /// The family as nft spells it (`ip`, `ip6`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ip => "ip",
            Self::Ip6 => "ip6",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "ip" => Some(Self::Ip),
            "ip6" => Some(Self::Ip6),
            _ => None,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One match of a masquerade rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// `meta mark & M == M`: every bit of `M` is set.
    MarkSet(u32),
    /// `ip saddr NET` (or `!= NET` when `negated`).
    Source {
        /// `!=` instead of `==`.
        negated: bool,
        /// The prefix (a single address is a /32).
        net: IpNet,
    },
    /// `ip daddr NET` (or `!= NET` when `negated`).
    Destination {
        /// `!=` instead of `==`.
        negated: bool,
        /// The prefix (a single address is a /32).
        net: IpNet,
    },
}

/// What a masquerade rule does when all its matches hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `return`: leave the packet alone (end this chain).
    Return,
    /// `masquerade fully-random` (iptables' `MASQUERADE --random-fully`).
    MasqueradeFullyRandom,
}

/// A rule of the shape netd installs: matches, then an action. (Every rule
/// netd installs also has a `counter`; see [`InstalledRule::counter`].)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// All must hold, in this order.
    pub matches: Vec<Match>,
    /// The verdict.
    pub action: Action,
}

/// A rule's packet and byte counter as read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counter {
    /// Packets that hit the rule (in a nat chain: connections, since only a
    /// connection's first packet traverses it).
    pub packets: u64,
    /// Bytes of those packets.
    pub bytes: u64,
}

/// The hook part of a base chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseChain {
    /// Chain type (`nat`).
    pub kind: String,
    /// Hook (`postrouting`).
    pub hook: String,
    /// Priority (`srcnat` is 100).
    pub priority: i64,
    /// Policy (`accept`), if nft printed one.
    pub policy: Option<String>,
}

/// A rule as read back from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstalledRule {
    /// The kernel's rule handle (for `nft delete rule … handle N`).
    pub handle: u64,
    /// The rule, or `None` when it has a shape netd never installs.
    pub rule: Option<Rule>,
    /// Its counter, if it has one.
    pub counter: Option<Counter>,
}

/// A chain as read back from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstalledChain {
    /// Chain name.
    pub name: String,
    /// Kernel handle.
    pub handle: u64,
    /// Type, hook, priority and policy; `None` for a regular (jump-target) chain.
    pub base: Option<BaseChain>,
    /// Its rules, in evaluation order.
    pub rules: Vec<InstalledRule>,
}

/// netd's masquerade table as read back from the kernel
/// (`nft -j list table <family> netd-masq`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstalledTable {
    /// Its family.
    pub family: Family,
    /// Kernel handle (changes every time [`Masquerade::apply`] replaces it).
    pub handle: u64,
    /// The table has flags (e.g. `dormant`, which disables every rule).
    /// netd never sets any.
    pub has_flags: bool,
    /// Its chains, in listing order.
    pub chains: Vec<InstalledChain>,
    /// Objects other than chains and rules (sets, maps, named counters…).
    /// netd never creates any.
    pub other_objects: usize,
}

impl InstalledTable {
    /// Number of rules in all chains.
    pub fn rule_count(&self) -> usize {
        self.chains.iter().map(|c| c.rules.len()).sum()
    }

    /// The chain called `name`, if present.
    pub fn chain(&self, name: &str) -> Option<&InstalledChain> {
        self.chains.iter().find(|c| c.name == name)
    }
}

/// flannel's masquerade rule set for one node: cluster network and the
/// node's own subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Masquerade {
    network: Ipv4Net,
    subnet: Ipv4Net,
}

impl Masquerade {
    /// Validates and builds the rule set. Host bits are cleared (so
    /// `10.244.3.1/24`, as `subnet.env` spells the subnet, is
    /// `10.244.3.0/24`); the subnet must lie inside the network.
    ///
    /// ```
    /// use netd_dataplane::masquerade::{Masquerade, MasqueradeError};
    /// let m = Masquerade::new("10.244.0.0/16".parse().unwrap(), "10.244.3.1/24".parse().unwrap()).unwrap();
    /// assert_eq!(m.subnet().to_string(), "10.244.3.0/24");
    /// let err = Masquerade::new("10.244.0.0/16".parse().unwrap(), "10.99.0.0/24".parse().unwrap());
    /// assert!(matches!(err, Err(MasqueradeError::SubnetOutsideNetwork { .. })));
    /// ```
    pub fn new(network: Ipv4Net, subnet: Ipv4Net) -> Result<Self, MasqueradeError> {
        let network = network.trunc();
        let subnet = subnet.trunc();
        if !network.contains(&subnet) {
            return Err(MasqueradeError::SubnetOutsideNetwork { network, subnet });
        }
        Ok(Self { network, subnet })
    }

    /// The cluster network `N`.
    pub fn network(&self) -> Ipv4Net {
        self.network
    }

    /// This node's subnet `S`.
    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    /// The six rules of the chain, in order (see the module documentation).
    pub fn rules(&self) -> Vec<Rule> {
        let n = IpNet::V4(self.network);
        let s = IpNet::V4(self.subnet);
        let multicast = IpNet::V4(MULTICAST);
        let src = |negated, net| Match::Source { negated, net };
        let dst = |negated, net| Match::Destination { negated, net };
        vec![
            Rule { matches: vec![Match::MarkSet(KUBE_PROXY_MARK)], action: Action::Return },
            Rule { matches: vec![src(false, s), dst(false, n)], action: Action::Return },
            Rule { matches: vec![src(false, n), dst(false, s)], action: Action::Return },
            Rule { matches: vec![src(true, n), dst(false, s)], action: Action::Return },
            Rule { matches: vec![src(false, n), dst(true, multicast)], action: Action::MasqueradeFullyRandom },
            Rule { matches: vec![src(true, n), dst(false, n)], action: Action::MasqueradeFullyRandom },
        ]
    }

    /// The nft JSON batch [`apply`](Self::apply) feeds to `nft -j -f -`: one
    /// transaction that creates (if needed) and deletes the table, then
    /// creates it afresh with its chain and rules.
    pub fn ruleset_json(&self) -> Value {
        let family = Family::Ip;
        let table = json!({"family": family.as_str(), "name": TABLE});
        let mut batch = vec![
            json!({"add": {"table": table}}),
            json!({"delete": {"table": table}}),
            json!({"add": {"table": table}}),
            json!({"add": {"chain": {
                "family": family.as_str(),
                "table": TABLE,
                "name": CHAIN,
                "type": "nat",
                "hook": "postrouting",
                "prio": SRCNAT_PRIORITY,
                "policy": "accept",
            }}}),
        ];
        for rule in self.rules() {
            let mut expr: Vec<Value> = rule.matches.iter().map(|m| match_json(family, m)).collect();
            expr.push(json!({"counter": null}));
            expr.push(match rule.action {
                Action::Return => json!({"return": null}),
                Action::MasqueradeFullyRandom => json!({"masquerade": {"flags": "fully-random"}}),
            });
            batch.push(json!({"add": {"rule": {
                "family": family.as_str(),
                "table": TABLE,
                "chain": CHAIN,
                "expr": expr,
            }}}));
        }
        json!({ "nftables": batch })
    }

    /// Installs the rule set, replacing `table ip netd-masq` whole in one
    /// nft transaction (counters restart at zero). Idempotent.
    pub fn apply(&self) -> Result<(), MasqueradeError> {
        run_nft(NFT_CANDIDATES, &["-j", "-f", "-"], Some(&self.ruleset_json())).map(drop)
    }

    /// Deletes `table ip netd-masq` and everything in it; an absent table is
    /// not an error. Never touches any other table.
    pub fn remove() -> Result<(), MasqueradeError> {
        let table = json!({"family": Family::Ip.as_str(), "name": TABLE});
        let batch = json!({"nftables": [
            {"add": {"table": table}},
            {"delete": {"table": table}},
        ]});
        run_nft(NFT_CANDIDATES, &["-j", "-f", "-"], Some(&batch)).map(drop)
    }

    /// Reads back `table ip netd-masq`; `None` when it does not exist.
    pub fn installed() -> Result<Option<InstalledTable>, MasqueradeError> {
        read_table(NFT_CANDIDATES, Family::Ip)
    }

    /// Whether `installed` is exactly what [`apply`](Self::apply) installs:
    /// no table flags, no objects besides one chain `postrouting` of type
    /// nat, hook postrouting, priority 100, policy accept, holding exactly
    /// [`rules`](Self::rules) in order, each with a counter. Handles and
    /// counter values are ignored.
    pub fn matches(&self, installed: &InstalledTable) -> bool {
        let expected_base = BaseChain {
            kind: "nat".into(),
            hook: "postrouting".into(),
            priority: SRCNAT_PRIORITY,
            policy: Some("accept".into()),
        };
        let [chain] = installed.chains.as_slice() else {
            return false;
        };
        let expected = self.rules();
        installed.family == Family::Ip
            && !installed.has_flags
            && installed.other_objects == 0
            && chain.name == CHAIN
            && chain.base.as_ref() == Some(&expected_base)
            && chain.rules.len() == expected.len()
            && chain
                .rules
                .iter()
                .zip(&expected)
                .all(|(got, want)| got.counter.is_some() && got.rule.as_ref() == Some(want))
    }

    /// Whether the kernel's `table ip netd-masq` is exactly what
    /// [`apply`](Self::apply) would install (see [`matches`](Self::matches)).
    /// `false` when the table is absent or drifted, and also when nft prints
    /// unreadable JSON for it: nft 1.0.6 (Debian 12) emits broken JSON for a
    /// table with flags such as `dormant`, which is drift as well; applying
    /// replaces the table either way.
    pub fn is_current(&self) -> Result<bool, MasqueradeError> {
        match Self::installed() {
            Ok(Some(table)) => Ok(self.matches(&table)),
            Ok(None) => Ok(false),
            Err(MasqueradeError::BadJson { .. } | MasqueradeError::UnexpectedJson { .. }) => Ok(false),
            Err(other) => Err(other),
        }
    }

    /// Re-applies the rule set unless it [`is_current`](Self::is_current);
    /// returns whether it had to. What a reconciler calls periodically.
    pub fn ensure(&self) -> Result<bool, MasqueradeError> {
        if self.is_current()? {
            return Ok(false);
        }
        self.apply()?;
        Ok(true)
    }
}

/// The nft JSON expression of one match.
fn match_json(family: Family, m: &Match) -> Value {
    match m {
        Match::MarkSet(mark) => json!({"match": {
            "op": "==",
            "left": {"&": [{"meta": {"key": "mark"}}, mark]},
            "right": mark,
        }}),
        Match::Source { negated, net } => addr_match_json(family, "saddr", *negated, net),
        Match::Destination { negated, net } => addr_match_json(family, "daddr", *negated, net),
    }
}

fn addr_match_json(family: Family, field: &str, negated: bool, net: &IpNet) -> Value {
    json!({"match": {
        "op": if negated { "!=" } else { "==" },
        "left": {"payload": {"protocol": family.as_str(), "field": field}},
        "right": {"prefix": {"addr": net.network().to_string(), "len": net.prefix_len()}},
    }})
}

/// Runs nft (the first of `candidates` that exists) with `args`, feeding
/// `stdin` as JSON; returns stdout.
fn run_nft(candidates: &[&str], args: &[&str], stdin: Option<&Value>) -> Result<Vec<u8>, MasqueradeError> {
    for program in candidates {
        let command = format!("{program} {}", args.join(" "));
        let spawned = Command::new(program)
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(MasqueradeError::Spawn { command, source }),
        };
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            let written = serde_json::to_writer(&mut pipe, input).map_err(io::Error::from).and_then(|()| pipe.flush());
            // A broken pipe means nft exited early; its status and stderr say why.
            if let Err(source) = written {
                if source.kind() != io::ErrorKind::BrokenPipe {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(MasqueradeError::Spawn { command, source });
                }
            }
            // Dropping the pipe closes nft's stdin.
        }
        let output =
            child.wait_with_output().map_err(|source| MasqueradeError::Spawn { command: command.clone(), source })?;
        if !output.status.success() {
            return Err(MasqueradeError::NftFailed {
                command,
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        return Ok(output.stdout);
    }
    Err(MasqueradeError::NftMissing)
}

/// Runs an nft listing and parses its JSON.
fn list_json(candidates: &[&str], args: &[&str]) -> Result<Value, MasqueradeError> {
    let stdout = run_nft(candidates, args, None)?;
    serde_json::from_slice(&stdout)
        .map_err(|source| MasqueradeError::BadJson { command: format!("nft {}", args.join(" ")), source })
}

fn read_table(candidates: &[&str], family: Family) -> Result<Option<InstalledTable>, MasqueradeError> {
    let args = ["-j", "list", "table", family.as_str(), TABLE];
    match list_json(candidates, &args) {
        Ok(listing) => parse_table(&listing, family, TABLE)
            .map(Some)
            .map_err(|why| MasqueradeError::UnexpectedJson { command: format!("nft {}", args.join(" ")), why }),
        Err(err @ MasqueradeError::NftFailed { .. }) => {
            // nft says only "No such file or directory" for an absent table;
            // ask for the family's table names to tell that from real failures.
            if table_exists(candidates, family)? {
                Err(err)
            } else {
                Ok(None)
            }
        }
        Err(other) => Err(other),
    }
}

fn table_exists(candidates: &[&str], family: Family) -> Result<bool, MasqueradeError> {
    let args = ["-j", "list", "tables", family.as_str()];
    let listing = list_json(candidates, &args)?;
    let items = nftables_items(&listing)
        .map_err(|why| MasqueradeError::UnexpectedJson { command: format!("nft {}", args.join(" ")), why })?;
    Ok(items.iter().filter_map(|item| item.get("table")).any(|t| {
        t.get("name").and_then(Value::as_str) == Some(TABLE)
            && t.get("family").and_then(Value::as_str) == Some(family.as_str())
    }))
}

fn nftables_items(listing: &Value) -> Result<&Vec<Value>, String> {
    listing.get("nftables").and_then(Value::as_array).ok_or_else(|| "no top-level \"nftables\" array".to_string())
}

/// Parses `nft -j list table` output into the typed summary.
fn parse_table(listing: &Value, family: Family, name: &str) -> Result<InstalledTable, String> {
    let mut table: Option<InstalledTable> = None;
    let mut chains: Vec<InstalledChain> = Vec::new();
    let mut other_objects = 0;
    let mut rules: Vec<(String, InstalledRule)> = Vec::new();
    for item in nftables_items(listing)? {
        let Some((kind, body)) = item.as_object().and_then(|o| o.iter().next()) else {
            return Err(format!("list item is not an object with one key: {item}"));
        };
        match kind.as_str() {
            "metainfo" => {}
            "table" => {
                let fam = body.get("family").and_then(Value::as_str).and_then(Family::parse);
                let tname = body.get("name").and_then(Value::as_str);
                if fam != Some(family) || tname != Some(name) {
                    return Err(format!("listing holds a foreign table: {body}"));
                }
                table = Some(InstalledTable {
                    family,
                    handle: u64_field(body, "handle")?,
                    // nft 1.0.6 prints garbage as the value; its presence is what counts.
                    has_flags: body.get("flags").is_some_and(|f| !is_empty_flags(f)),
                    chains: Vec::new(),
                    other_objects: 0,
                });
            }
            "chain" => {
                let base = match body.get("hook") {
                    None => None,
                    Some(hook) => Some(BaseChain {
                        kind: str_field(body, "type")?.to_string(),
                        hook: hook.as_str().ok_or_else(|| format!("chain hook is not a string: {body}"))?.to_string(),
                        priority: body
                            .get("prio")
                            .and_then(Value::as_i64)
                            .ok_or_else(|| format!("chain prio is not an integer: {body}"))?,
                        policy: body.get("policy").and_then(Value::as_str).map(str::to_string),
                    }),
                };
                chains.push(InstalledChain {
                    name: str_field(body, "name")?.to_string(),
                    handle: u64_field(body, "handle")?,
                    base,
                    rules: Vec::new(),
                });
            }
            "rule" => {
                let chain = str_field(body, "chain")?.to_string();
                let expr =
                    body.get("expr").and_then(Value::as_array).ok_or_else(|| format!("rule has no expr: {body}"))?;
                let (rule, counter) = parse_rule(family, expr);
                rules.push((chain, InstalledRule { handle: u64_field(body, "handle")?, rule, counter }));
            }
            _ => other_objects += 1,
        }
    }
    let mut table = table.ok_or_else(|| format!("no {family} {name} table in the listing"))?;
    for (chain_name, rule) in rules {
        match chains.iter_mut().find(|c| c.name == chain_name) {
            Some(chain) => chain.rules.push(rule),
            None => other_objects += 1,
        }
    }
    table.chains = chains;
    table.other_objects = other_objects;
    Ok(table)
}

fn is_empty_flags(flags: &Value) -> bool {
    match flags {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::String(s) => s.is_empty(),
        _ => false,
    }
}

fn str_field<'a>(body: &'a Value, key: &str) -> Result<&'a str, String> {
    body.get(key).and_then(Value::as_str).ok_or_else(|| format!("\"{key}\" is missing or not a string in {body}"))
}

fn u64_field(body: &Value, key: &str) -> Result<u64, String> {
    body.get(key).and_then(Value::as_u64).ok_or_else(|| format!("\"{key}\" is missing or not an integer in {body}"))
}

/// Parses a rule's expressions; the rule is `None` unless it is matches,
/// optional counter, then one action and nothing after it.
fn parse_rule(family: Family, expr: &[Value]) -> (Option<Rule>, Option<Counter>) {
    let mut matches = Vec::new();
    let mut counter = None;
    let mut action = None;
    let mut recognised = true;
    for e in expr {
        if action.is_some() {
            recognised = false;
        }
        if let Some(body) = e.get("counter") {
            counter = Some(Counter {
                packets: body.get("packets").and_then(Value::as_u64).unwrap_or(0),
                bytes: body.get("bytes").and_then(Value::as_u64).unwrap_or(0),
            });
        } else if let Some(body) = e.get("match") {
            match parse_match(family, body) {
                Some(m) => matches.push(m),
                None => recognised = false,
            }
        } else if e.get("return").is_some() {
            action = Some(Action::Return);
        } else if let Some(body) = e.get("masquerade") {
            let flags = body.get("flags");
            let fully_random = match flags {
                Some(Value::String(s)) => s == "fully-random",
                Some(Value::Array(a)) => a.len() == 1 && a[0].as_str() == Some("fully-random"),
                _ => false,
            };
            if fully_random && body.get("port").is_none() {
                action = Some(Action::MasqueradeFullyRandom);
            } else {
                recognised = false;
            }
        } else {
            recognised = false;
        }
    }
    let rule = match (recognised, action) {
        (true, Some(action)) => Some(Rule { matches, action }),
        _ => None,
    };
    (rule, counter)
}

fn parse_match(family: Family, body: &Value) -> Option<Match> {
    let negated = match body.get("op")?.as_str()? {
        "==" => false,
        "!=" => true,
        _ => return None,
    };
    let left = body.get("left")?;
    let right = body.get("right")?;
    if let Some(and) = left.get("&").and_then(Value::as_array) {
        let [meta, mask] = and.as_slice() else { return None };
        let mask = u32::try_from(mask.as_u64()?).ok()?;
        let value = u32::try_from(right.as_u64()?).ok()?;
        let is_mark = meta.get("meta")?.get("key")?.as_str()? == "mark";
        return (is_mark && !negated && mask == value).then_some(Match::MarkSet(mask));
    }
    let payload = left.get("payload")?;
    if payload.get("protocol")?.as_str()? != family.as_str() {
        return None;
    }
    let net = parse_prefix(right)?;
    match payload.get("field")?.as_str()? {
        "saddr" => Some(Match::Source { negated, net }),
        "daddr" => Some(Match::Destination { negated, net }),
        _ => None,
    }
}

/// `"10.0.0.1"` (nft prints a full-length prefix as a bare address) or
/// `{"prefix": {"addr": "10.0.0.0", "len": 8}}`.
fn parse_prefix(v: &Value) -> Option<IpNet> {
    if let Some(addr) = v.as_str() {
        return Some(IpNet::from(addr.parse::<IpAddr>().ok()?));
    }
    let prefix = v.get("prefix")?;
    let addr: IpAddr = prefix.get("addr")?.as_str()?.parse().ok()?;
    let len = u8::try_from(prefix.get("len")?.as_u64()?).ok()?;
    IpNet::new(addr, len).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn masq() -> Masquerade {
        Masquerade::new("10.244.0.0/16".parse().unwrap(), "10.244.1.0/24".parse().unwrap()).unwrap()
    }

    /// What `nft -j list table ip netd-masq` printed after `apply` (nft
    /// 1.0.6), with the rules' `add` bodies given handles and counters.
    fn listing_of(m: &Masquerade) -> Value {
        let batch = m.ruleset_json();
        let mut items = vec![
            json!({"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}),
            json!({"table": {"family": "ip", "name": "netd-masq", "handle": 7}}),
            json!({"chain": {"family": "ip", "table": "netd-masq", "name": "postrouting", "handle": 1,
                "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}}),
        ];
        let mut handle = 2;
        for op in batch["nftables"].as_array().unwrap() {
            if let Some(rule) = op.get("add").and_then(|a| a.get("rule")) {
                let mut rule = rule.clone();
                rule["handle"] = json!(handle);
                handle += 1;
                for e in rule["expr"].as_array_mut().unwrap() {
                    if e.get("counter").is_some() {
                        *e = json!({"counter": {"packets": 3, "bytes": 180}});
                    }
                }
                items.push(json!({ "rule": rule }));
            }
        }
        json!({ "nftables": items })
    }

    #[test]
    fn new_validates_and_truncates() {
        let m = Masquerade::new("10.244.7.7/16".parse().unwrap(), "10.244.3.1/24".parse().unwrap()).unwrap();
        assert_eq!(m.network().to_string(), "10.244.0.0/16");
        assert_eq!(m.subnet().to_string(), "10.244.3.0/24");
        let err = Masquerade::new("10.244.0.0/16".parse().unwrap(), "10.245.1.0/24".parse().unwrap()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "node subnet 10.245.1.0/24 is not inside cluster network 10.244.0.0/16: masquerade rules would be meaningless"
        );
        // A subnet larger than the network is outside it too.
        assert!(Masquerade::new("10.244.0.0/16".parse().unwrap(), "10.0.0.0/8".parse().unwrap()).is_err());
    }

    #[test]
    fn ruleset_is_one_replacing_transaction() {
        let batch = masq().ruleset_json();
        let ops = batch["nftables"].as_array().unwrap();
        let heads: Vec<String> = ops
            .iter()
            .map(|op| {
                let (verb, body) = op.as_object().unwrap().iter().next().unwrap();
                format!("{verb} {}", body.as_object().unwrap().keys().next().unwrap())
            })
            .collect();
        assert_eq!(
            heads,
            ["add table", "delete table", "add table", "add chain"]
                .into_iter()
                .chain(std::iter::repeat_n("add rule", 6))
                .collect::<Vec<_>>()
        );
        let chain = &ops[3]["add"]["chain"];
        assert_eq!(chain["type"], "nat");
        assert_eq!(chain["hook"], "postrouting");
        assert_eq!(chain["prio"], 100);
        let masquerades = ops
            .iter()
            .filter(|op| {
                op["add"]["rule"]["expr"].as_array().is_some_and(|e| e.iter().any(|x| x.get("masquerade").is_some()))
            })
            .count();
        assert_eq!(masquerades, 2);
        assert_eq!(ops[4]["add"]["rule"]["expr"][0]["match"]["left"]["&"][1], 0x4000);
        assert_eq!(ops[8]["add"]["rule"]["expr"][1]["match"]["right"]["prefix"]["addr"], "224.0.0.0");
        assert_eq!(ops[8]["add"]["rule"]["expr"][1]["match"]["op"], "!=");
    }

    #[test]
    fn readback_of_apply_matches() {
        let m = masq();
        let table = parse_table(&listing_of(&m), Family::Ip, TABLE).unwrap();
        assert_eq!(table.rule_count(), 6);
        assert_eq!(table.chain(CHAIN).unwrap().rules[4].counter, Some(Counter { packets: 3, bytes: 180 }));
        assert_eq!(table.chain(CHAIN).unwrap().rules.iter().map(|r| r.handle).collect::<Vec<_>>(), [2, 3, 4, 5, 6, 7]);
        assert!(m.matches(&table));
        let other = Masquerade::new("10.244.0.0/16".parse().unwrap(), "10.244.2.0/24".parse().unwrap()).unwrap();
        assert!(!other.matches(&table));
    }

    #[test]
    fn drift_is_detected() {
        let m = masq();
        let listing = listing_of(&m);

        let mut missing_rule = listing.clone();
        missing_rule["nftables"].as_array_mut().unwrap().remove(5);
        assert!(!m.matches(&parse_table(&missing_rule, Family::Ip, TABLE).unwrap()));

        let mut flushed = listing.clone();
        flushed["nftables"].as_array_mut().unwrap().truncate(3);
        let table = parse_table(&flushed, Family::Ip, TABLE).unwrap();
        assert_eq!(table.rule_count(), 0);
        assert!(!m.matches(&table));

        let mut dormant = listing.clone();
        dormant["nftables"][1]["table"]["flags"] = json!("dormant");
        assert!(!m.matches(&parse_table(&dormant, Family::Ip, TABLE).unwrap()));

        let mut no_counter = listing.clone();
        no_counter["nftables"][3]["rule"]["expr"].as_array_mut().unwrap().retain(|e| e.get("counter").is_none());
        assert!(!m.matches(&parse_table(&no_counter, Family::Ip, TABLE).unwrap()));

        let mut foreign = listing.clone();
        foreign["nftables"][3]["rule"]["expr"].as_array_mut().unwrap().insert(0, json!({"log": null}));
        let table = parse_table(&foreign, Family::Ip, TABLE).unwrap();
        assert_eq!(table.chain(CHAIN).unwrap().rules[0].rule, None);
        assert!(!m.matches(&table));

        let mut with_set = listing.clone();
        with_set["nftables"].as_array_mut().unwrap().push(
            json!({"set": {"family": "ip", "table": "netd-masq", "name": "s", "type": "ipv4_addr", "handle": 9}}),
        );
        assert!(!m.matches(&parse_table(&with_set, Family::Ip, TABLE).unwrap()));

        let mut priority = listing;
        priority["nftables"][2]["chain"]["prio"] = json!(99);
        assert!(!m.matches(&parse_table(&priority, Family::Ip, TABLE).unwrap()));
    }

    #[test]
    fn full_length_prefix_reads_back_as_bare_address() {
        let m = Masquerade::new("10.244.0.0/16".parse().unwrap(), "10.244.1.5/32".parse().unwrap()).unwrap();
        let mut listing = listing_of(&m);
        // nft prints `ip saddr 10.244.1.5`, a plain string, for a /32.
        listing["nftables"][4]["rule"]["expr"][0]["match"]["right"] = json!("10.244.1.5");
        assert!(m.matches(&parse_table(&listing, Family::Ip, TABLE).unwrap()));
    }

    #[test]
    fn nft_failure_carries_stderr_and_bad_output_is_reported() {
        // `sh` stands in for nft: these paths do not depend on nft being installed.
        let err = run_nft(&["sh"], &["-c", "echo 'Error: boom' >&2; exit 3"], None).unwrap_err();
        assert!(matches!(&err, MasqueradeError::NftFailed { stderr, .. } if stderr == "Error: boom"), "{err:?}");
        assert!(err.to_string().ends_with(": Error: boom"), "{err}");
        let err = list_json(&["sh"], &["-c", "echo '{\"nftables\": [{\"table\": {\"flags\": '"]).unwrap_err();
        assert!(matches!(err, MasqueradeError::BadJson { .. }), "{err:?}");
        // stdin reaches the program.
        let out = run_nft(&["sh"], &["-c", "cat"], Some(&json!({"nftables": []}))).unwrap();
        assert_eq!(out, br#"{"nftables":[]}"#);
    }

    #[test]
    fn missing_nft_names_the_debian_package() {
        let err = run_nft(&["/nonexistent/netd-test/nft"], &["--version"], None).unwrap_err();
        assert!(matches!(err, MasqueradeError::NftMissing));
        assert!(err.to_string().contains("`nftables`"), "{err}");
    }
}
