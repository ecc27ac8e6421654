//! The success result of ADD, in the shape of the config's version.

use crate::{Allocation, RangeSet};
use ipnet::IpNet;
use serde_json::{json, Map, Value};

use super::config::{Dns, Route};
use super::version::CniVersion;

/// Builds the result JSON for the allocations (one per range set, in order).
pub fn render(
    version: CniVersion,
    sets: &[RangeSet],
    allocations: &[Allocation],
    routes: &[Route],
    dns: &Dns,
) -> String {
    let ips: Vec<Value> = allocations
        .iter()
        .map(|a| {
            let range = sets.iter().find_map(|set| set.range_of(a.ip));
            let prefix = range.map_or(if a.ip.is_ipv4() { 32 } else { 128 }, |r| r.subnet().prefix_len());
            let address = IpNet::new(a.ip, prefix).map(|n| n.to_string()).unwrap_or_else(|_| a.ip.to_string());
            let mut entry = Map::new();
            if version.ip_entries_have_version() {
                entry.insert("version".into(), json!(if a.ip.is_ipv4() { "4" } else { "6" }));
            }
            entry.insert("address".into(), json!(address));
            if let Some(gw) = range.and_then(|r| r.gateway()) {
                entry.insert("gateway".into(), json!(gw.to_string()));
            }
            Value::Object(entry)
        })
        .collect();
    let routes: Vec<Value> = routes
        .iter()
        .map(|r| match r.gw {
            Some(gw) => json!({"dst": r.dst.to_string(), "gw": gw.to_string()}),
            None => json!({"dst": r.dst.to_string()}),
        })
        .collect();
    let mut dns_json = Map::new();
    if !dns.nameservers.is_empty() {
        dns_json.insert("nameservers".into(), json!(dns.nameservers));
    }
    if let Some(domain) = &dns.domain {
        dns_json.insert("domain".into(), json!(domain));
    }
    if !dns.search.is_empty() {
        dns_json.insert("search".into(), json!(dns.search));
    }
    if !dns.options.is_empty() {
        dns_json.insert("options".into(), json!(dns.options));
    }
    let mut result = Map::new();
    result.insert("cniVersion".into(), json!(version.as_str()));
    result.insert("ips".into(), Value::Array(ips));
    if !routes.is_empty() {
        result.insert("routes".into(), Value::Array(routes));
    }
    result.insert("dns".into(), Value::Object(dns_json));
    Value::Object(result).to_string()
}
