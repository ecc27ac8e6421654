//! DNAT port rules: which dialled edge-node port goes to which tunnel-server
//! port (SPEC §3).
//!
//! Two sources produce the same [`PortRules`]:
//!
//! - the operator CLI (`netd-cloud dnat apply --ports "10250=10263,8080=10264"`),
//!   through [`PortRules`]'s `FromStr`: any `port=port` pairs;
//! - the ConfigMap `kube-system/edge-tunnel-server-cfg` shared with ACK@Edge
//!   and OpenYurt's yurt-tunnel, through [`from_tunnel_config`]: the fixed
//!   kubelet rules plus the extras of keys `dnat-ports-pair`,
//!   `http-proxy-ports` and `https-proxy-ports`.
//!
//! Parsing is strict where yurt-tunnel is lenient. yurt-tunnel skips a bad
//! token (a log line at best, often nothing) and lets a later key silently
//! override an earlier one, so a typo quietly leaves a port unredirected. Here
//! every bad token is an error that names the key, the token's 1-based
//! position and its text, so a caller can refuse the whole configuration and
//! keep the rules that work (issue 12: a bad config never clears working
//! rules). [`ConfigError::Invalid`] carries the first bad token of *every*
//! key, so an operator fixes everything in one edit.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// The kubelet's TLS port; always redirected to [`TUNNEL_TLS_PORT`].
pub const KUBELET_PORT: u16 = 10250;
/// The kubelet's read-only plain-HTTP port; always redirected to
/// [`TUNNEL_HTTP_PORT`].
pub const KUBELET_READONLY_PORT: u16 = 10255;
/// The tunnel server's TLS port (the target of 10250 and `https-proxy-ports`).
pub const TUNNEL_TLS_PORT: u16 = 10263;
/// The tunnel server's plain port (the target of 10255, `dnat-ports-pair` and
/// `http-proxy-ports`).
pub const TUNNEL_HTTP_PORT: u16 = 10264;

/// Namespace of the tunnel server's ConfigMap.
pub const CONFIG_MAP_NAMESPACE: &str = "kube-system";
/// Name of the tunnel server's ConfigMap (ACK@Edge's name; OpenYurt calls it
/// `yurt-tunnel-server-cfg`, same keys).
pub const CONFIG_MAP_NAME: &str = "edge-tunnel-server-cfg";
/// ConfigMap key: comma-separated `port=10264` pairs (the original key; yurt-tunnel
/// marks it "will be deprecated" in favour of the two below, but ACK@Edge
/// documents it and clusters carry it).
pub const DNAT_PORTS_PAIR_KEY: &str = "dnat-ports-pair";
/// ConfigMap key: comma-separated ports redirected to [`TUNNEL_HTTP_PORT`].
pub const HTTP_PROXY_PORTS_KEY: &str = "http-proxy-ports";
/// ConfigMap key: comma-separated ports redirected to [`TUNNEL_TLS_PORT`].
pub const HTTPS_PROXY_PORTS_KEY: &str = "https-proxy-ports";

/// What [`PortRules`]'s `FromStr` calls its input in error messages: it parses
/// the `--ports` value, but is not tied to that flag (clap already names the
/// flag in front of the message).
pub const PORT_RULES_LABEL: &str = "port rules";

/// The longest token text an error message quotes: a value can be anything an
/// operator pasted, and one error line should stay one readable line.
const MAX_QUOTED_CHARS: usize = 64;

/// An ordered map from dialled edge-node port to tunnel-server port.
///
/// Built by `FromStr` (the CLI syntax) or [`from_tunnel_config`] (the
/// ConfigMap). `Display` writes the CLI syntax sorted by dialled port, e.g.
/// `8080=10264,10250=10263,10255=10264`, and `FromStr` reads it back to an
/// equal value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct PortRules {
    // BTreeMap rather than HashMap: Display, iteration and the BPF map
    // updates built from them come out in one deterministic order.
    rules: BTreeMap<u16, u16>,
}

impl PortRules {
    /// The rules as `(dialled port, tunnel-server port)`, by dialled port.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (u16, u16)> + '_ {
        self.rules.iter().map(|(&dialled, &target)| (dialled, target))
    }

    /// The tunnel-server port for dialled port `port`, if it is redirected.
    pub fn get(&self, port: u16) -> Option<u16> {
        self.rules.get(&port).copied()
    }

    /// How many dialled ports are redirected.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether no port is redirected.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

impl fmt::Display for PortRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (dialled, target)) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{dialled}={target}")?;
        }
        Ok(())
    }
}

impl FromStr for PortRules {
    type Err = ConfigError;

    /// Parses the CLI syntax: comma-separated `dialled=target`, whitespace
    /// around tokens and around `=` ignored, each port 1–65535. The same pair
    /// twice is accepted (it says the same thing twice); one dialled port with
    /// two targets is an error. An empty (or all-blank) string is no rules.
    ///
    /// Unlike [`from_tunnel_config`] nothing is implied or forbidden: the
    /// operator states the kubelet rules too, and may pick any target.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut builder = Builder::default();
        let result = for_each_token(s, |position, token| {
            let (dialled, target) = parse_pair(token, "dialled=target")?;
            builder.insert(PORT_RULES_LABEL, position, dialled, target)
        });
        match result {
            Ok(()) => Ok(builder.finish()),
            Err(error) => Err(ConfigError::Invalid(vec![error.at(PORT_RULES_LABEL)])),
        }
    }
}

/// The DNAT rules from the data of ConfigMap `kube-system/edge-tunnel-server-cfg`
/// (SPEC §3).
///
/// Always [`KUBELET_PORT`]`=`[`TUNNEL_TLS_PORT`] and
/// [`KUBELET_READONLY_PORT`]`=`[`TUNNEL_HTTP_PORT`], plus:
///
/// - `dnat-ports-pair`: comma-separated `port=10264`;
/// - `http-proxy-ports`: comma-separated ports, each redirected to 10264;
/// - `https-proxy-ports`: comma-separated ports, each redirected to 10263.
///
/// Each port is 1–65535; whitespace around tokens and around `=` is ignored;
/// an absent key, an empty or all-blank value means no extras from that key.
/// 10250 and 10255 are never extras, in any key (they are fixed). A port
/// listed again with the same target is accepted (say in `dnat-ports-pair` and
/// `http-proxy-ports`, both meaning 10264); with another target it is an error
/// naming both places.
///
/// # Why `dnat-ports-pair` targets must be 10264
///
/// The SPEC says `port=10264`, and both systems that define this key accept
/// nothing else: ACK@Edge documents the format as `port 1=10264, port
/// 2=10264` and notes that extra ports are carried over HTTP only; OpenYurt's
/// yurt-tunnel (`pkg/yurttunnel/util/util.go`, `resolvePorts`) keeps a pair
/// only if its right side equals the server's insecure port (10264) and drops
/// any other pair without a word, and its design notes say forwarding through
/// anything but 10264 is unsupported. Rather than dropping such a pair
/// silently, netd rejects it, and the message points at `https-proxy-ports`,
/// the key that does reach 10263. (yurt-tunnel also takes a `dnat-ports-pair`
/// value with no `=` at all as bare ports — a side effect of how it detects
/// pairs, documented nowhere; netd reports it as a malformed pair instead of
/// guessing.)
///
/// # Other keys
///
/// Every other key is ignored: the ConfigMap is shared with the tunnel server
/// and other components. yurt-tunnel's own manifest ships
/// `localhost-proxy-ports: "10266, 10267"` in it, which its tunnel server
/// reads to send requests for those ports to the edge node's 127.0.0.1
/// instead of its node IP: a proxy-side setting, not a DNAT rule, so not ours
/// to parse.
///
/// # Errors
///
/// [`ConfigError::Invalid`] with the first bad token of each key (all three
/// keys are checked), keys in the order above.
pub fn from_tunnel_config(data: &BTreeMap<String, String>) -> Result<PortRules, ConfigError> {
    let mut builder = Builder::default();
    builder.fixed(KUBELET_PORT, TUNNEL_TLS_PORT);
    builder.fixed(KUBELET_READONLY_PORT, TUNNEL_HTTP_PORT);

    let mut errors = Vec::new();
    for (key, form) in [
        (DNAT_PORTS_PAIR_KEY, Form::Pairs),
        (HTTP_PROXY_PORTS_KEY, Form::PortsTo(TUNNEL_HTTP_PORT)),
        (HTTPS_PROXY_PORTS_KEY, Form::PortsTo(TUNNEL_TLS_PORT)),
    ] {
        let value = data.get(key).map_or("", String::as_str);
        let result = for_each_token(value, |position, token| {
            let (dialled, target) = match form {
                Form::Pairs => parse_pair(token, DNAT_PAIR_FORM)?,
                Form::PortsTo(target) => (parse_bare_port(token)?, target),
            };
            // Kubelet ports first: "10250=10264" is better told "10250 is
            // fixed" than "10264 conflicts with the fixed 10263".
            if let Some(problem) = kubelet_port(dialled) {
                return Err(problem);
            }
            if matches!(form, Form::Pairs) && target != TUNNEL_HTTP_PORT {
                return Err(Problem::TargetNotHttp(target));
            }
            builder.insert(key, position, dialled, target)
        });
        // Keep going after a bad key: the operator gets every key's first
        // problem from one read of the ConfigMap.
        if let Err(error) = result {
            errors.push(error.at(key));
        }
    }

    if errors.is_empty() {
        Ok(builder.finish())
    } else {
        Err(ConfigError::Invalid(errors))
    }
}

/// The syntax of a ConfigMap key's value.
#[derive(Clone, Copy)]
enum Form {
    /// `port=10264,...` (`dnat-ports-pair`).
    Pairs,
    /// `port,...`, each redirected to the given tunnel-server port.
    PortsTo(u16),
}

/// The expected form of a `dnat-ports-pair` token, with where bare ports go
/// instead.
const DNAT_PAIR_FORM: &str = "port=10264 (bare ports belong in http-proxy-ports or https-proxy-ports)";

/// A DNAT port configuration that cannot be used as a whole.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// One or more bad tokens: the first of each key (or of the CLI value).
    /// Displayed joined with `"; "`.
    #[error("{}", join(.0))]
    Invalid(Vec<TokenError>),
}

impl ConfigError {
    /// The bad tokens, in the order the keys are read.
    pub fn tokens(&self) -> &[TokenError] {
        match self {
            ConfigError::Invalid(errors) => errors,
        }
    }
}

fn join(errors: &[TokenError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// One bad token: where it is, what it says and what is wrong with it.
///
/// Displayed as `KEY: token N "TEXT": PROBLEM`, e.g.
/// `dnat-ports-pair: token 2 "80x=10264": "80x" is not a port (1-65535)`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: token {position} {}: {problem}", quote(.token))]
pub struct TokenError {
    /// The ConfigMap key, or [`PORT_RULES_LABEL`] for the CLI syntax.
    pub key: &'static str,
    /// 1-based position among the value's comma-separated tokens.
    pub position: usize,
    /// The token, whitespace around it removed.
    pub token: String,
    /// What is wrong with it.
    pub problem: Problem,
}

/// What is wrong with a token.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// Nothing between two commas, or a comma at the start or the end.
    Empty,
    /// Not exactly one `=` where a pair is expected; holds the expected form.
    NotAPair(&'static str),
    /// A pair where a bare port is expected.
    NotABarePort,
    /// Nothing on one side of `=`: `true` before it, `false` after it.
    MissingPort {
        /// Whether the dialled (left) side is the one missing.
        dialled: bool,
    },
    /// Text that is not a decimal port 1–65535 (holds the text).
    NotAPort(String),
    /// 10250 or 10255 in the ConfigMap: fixed rules, never extras.
    KubeletPort(u16),
    /// A `dnat-ports-pair` target other than 10264.
    TargetNotHttp(u16),
    /// The dialled port already has another target.
    Conflict {
        /// The target it already has.
        target: u16,
        /// The key that gave it that target.
        key: &'static str,
        /// The 1-based position of that token in its key.
        position: usize,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Empty => f.write_str("empty token (two commas in a row, or a comma at the start or end)"),
            Problem::NotAPair(expected) => write!(f, "expected {expected}"),
            Problem::NotABarePort => f.write_str("expected a bare port; port=port pairs belong in dnat-ports-pair"),
            Problem::MissingPort { dialled: true } => f.write_str("no port before \"=\""),
            Problem::MissingPort { dialled: false } => f.write_str("no port after \"=\""),
            Problem::NotAPort(text) => write!(f, "{} is not a port (1-65535)", quote(text)),
            Problem::KubeletPort(port) if *port == KUBELET_READONLY_PORT => write!(
                f,
                "{port} is the kubelet read-only port, always redirected to \
                 {TUNNEL_HTTP_PORT}, never an extra"
            ),
            Problem::KubeletPort(port) => {
                write!(f, "{port} is the kubelet port, always redirected to {TUNNEL_TLS_PORT}, never an extra")
            }
            Problem::TargetNotHttp(target) => write!(
                f,
                "target {target} is not {TUNNEL_HTTP_PORT}: dnat-ports-pair redirects only to \
                 the tunnel server's plain port {TUNNEL_HTTP_PORT}; list ports for \
                 {TUNNEL_TLS_PORT} in https-proxy-ports"
            ),
            Problem::Conflict { target, key, position } => {
                write!(f, "already mapped to {target} by {key} token {position}")
            }
        }
    }
}

/// A [`Problem`] not yet told which key it belongs to.
struct Located {
    position: usize,
    token: String,
    problem: Problem,
}

impl Located {
    fn at(self, key: &'static str) -> TokenError {
        TokenError { key, position: self.position, token: self.token, problem: self.problem }
    }
}

/// Calls `f` with each comma-separated token (1-based position, trimmed) of
/// `value`, stopping at the first error. A blank value has no tokens.
fn for_each_token(value: &str, mut f: impl FnMut(usize, &str) -> Result<(), Problem>) -> Result<(), Located> {
    if value.trim().is_empty() {
        return Ok(());
    }
    for (index, token) in value.split(',').enumerate() {
        let token = token.trim();
        let position = index + 1;
        let outcome = if token.is_empty() { Err(Problem::Empty) } else { f(position, token) };
        if let Err(problem) = outcome {
            return Err(Located { position, token: excerpt(token), problem });
        }
    }
    Ok(())
}

/// `dialled=target`, whitespace around either side ignored.
fn parse_pair(token: &str, expected: &'static str) -> Result<(u16, u16), Problem> {
    let mut sides = token.split('=');
    let (Some(dialled), Some(target), None) = (sides.next(), sides.next(), sides.next()) else {
        return Err(Problem::NotAPair(expected));
    };
    Ok((parse_side(dialled, true)?, parse_side(target, false)?))
}

fn parse_side(text: &str, dialled: bool) -> Result<u16, Problem> {
    let text = text.trim();
    if text.is_empty() {
        return Err(Problem::MissingPort { dialled });
    }
    parse_port(text)
}

/// A token of `http-proxy-ports` / `https-proxy-ports`.
fn parse_bare_port(token: &str) -> Result<u16, Problem> {
    if token.contains('=') {
        return Err(Problem::NotABarePort);
    }
    parse_port(token)
}

/// A decimal port 1–65535. ASCII digits only: `u16::from_str` would also take
/// a leading `+`, and a port written any other way is more likely a typo than
/// an intent.
fn parse_port(text: &str) -> Result<u16, Problem> {
    let not_a_port = || Problem::NotAPort(excerpt(text));
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(not_a_port());
    }
    match text.parse::<u16>() {
        Ok(0) | Err(_) => Err(not_a_port()),
        Ok(port) => Ok(port),
    }
}

fn kubelet_port(port: u16) -> Option<Problem> {
    (port == KUBELET_PORT || port == KUBELET_READONLY_PORT).then_some(Problem::KubeletPort(port))
}

/// `text` cut to [`MAX_QUOTED_CHARS`] characters, `…` marking a cut.
fn excerpt(text: &str) -> String {
    match text.char_indices().nth(MAX_QUOTED_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// Quotes operator text with Rust's string escaping, so a control character or
/// a newline in a ConfigMap value cannot break or forge a log line.
fn quote(text: &str) -> String {
    format!("{text:?}")
}

/// Collects rules, remembering where each came from to name it in a conflict.
#[derive(Default)]
struct Builder {
    /// dialled port -> (target, key, 1-based position); position 0 marks a
    /// fixed rule, which no token can conflict with (kubelet ports are
    /// rejected before they get here).
    rules: BTreeMap<u16, (u16, &'static str, usize)>,
}

impl Builder {
    fn fixed(&mut self, dialled: u16, target: u16) {
        self.rules.insert(dialled, (target, "", 0));
    }

    fn insert(&mut self, key: &'static str, position: usize, dialled: u16, target: u16) -> Result<(), Problem> {
        match self.rules.get(&dialled) {
            Some(&(existing, _, _)) if existing == target => Ok(()),
            Some(&(existing, key, position)) => Err(Problem::Conflict { target: existing, key, position }),
            None => {
                self.rules.insert(dialled, (target, key, position));
                Ok(())
            }
        }
    }

    fn finish(self) -> PortRules {
        PortRules { rules: self.rules.into_iter().map(|(dialled, (target, _, _))| (dialled, target)).collect() }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn rules(pairs: &[(u16, u16)]) -> PortRules {
        PortRules { rules: pairs.iter().copied().collect() }
    }

    /// The message `from_tunnel_config` gives for `pairs`.
    fn config_error(pairs: &[(&str, &str)]) -> String {
        from_tunnel_config(&config(pairs)).unwrap_err().to_string()
    }

    fn cli_error(s: &str) -> String {
        s.parse::<PortRules>().unwrap_err().to_string()
    }

    const KUBELET_ONLY: &[(u16, u16)] = &[(10250, 10263), (10255, 10264)];

    // --- the ConfigMap: accepted values ---

    #[test]
    fn spec_example() {
        let got = from_tunnel_config(&config(&[("dnat-ports-pair", "8080=10264,9051=10264")])).unwrap();
        assert_eq!(got, rules(&[(8080, 10264), (9051, 10264), (10250, 10263), (10255, 10264)]));
        assert_eq!(got.to_string(), "8080=10264,9051=10264,10250=10263,10255=10264");
    }

    #[test]
    fn ack_edge_documented_examples() {
        // ACK@Edge's docs: dnat-ports-pair '9051=10264,9052=10264', and for
        // Prometheus http-proxy-ports 9445 / https-proxy-ports 9100.
        let got = from_tunnel_config(&config(&[
            ("dnat-ports-pair", "9051=10264,9052=10264"),
            ("http-proxy-ports", "9445"),
            ("https-proxy-ports", "9100"),
        ]))
        .unwrap();
        assert_eq!(got.get(9051), Some(10264));
        assert_eq!(got.get(9052), Some(10264));
        assert_eq!(got.get(9445), Some(10264));
        assert_eq!(got.get(9100), Some(10263));
        assert_eq!(got.len(), 6);
    }

    #[test]
    fn openyurt_shaped_config_map() {
        // yurt-tunnel's manifest and tests: blank keys, ", "-separated lists,
        // and localhost-proxy-ports (not a DNAT key, ignored).
        let got = from_tunnel_config(&config(&[
            ("localhost-proxy-ports", "10266, 10267"),
            ("dnat-ports-pair", "1234=10264"),
            ("http-proxy-ports", "1235, 1236"),
            ("https-proxy-ports", "1237, 1238"),
        ]))
        .unwrap();
        assert_eq!(got.to_string(), "1234=10264,1235=10264,1236=10264,1237=10263,1238=10263,10250=10263,10255=10264");
        assert_eq!(got.get(10266), None);
    }

    #[test]
    fn kubelet_rules_always_present() {
        for data in [
            config(&[]),
            config(&[("dnat-ports-pair", "")]),
            config(&[("dnat-ports-pair", ""), ("http-proxy-ports", ""), ("https-proxy-ports", "")]),
            config(&[("dnat-ports-pair", "  "), ("http-proxy-ports", "\t"), ("https-proxy-ports", " \n ")]),
        ] {
            assert_eq!(from_tunnel_config(&data).unwrap(), rules(KUBELET_ONLY), "{data:?}");
        }
    }

    #[test]
    fn unknown_keys_ignored_whatever_they_hold() {
        let got = from_tunnel_config(&config(&[
            ("localhost-proxy-ports", "=,=="),
            ("dnat-ports-pairs", "not even close"),
            ("DNAT-PORTS-PAIR", "8080=1"),
        ]))
        .unwrap();
        assert_eq!(got, rules(KUBELET_ONLY));
    }

    #[test]
    fn whitespace_around_tokens_and_equals() {
        let got = from_tunnel_config(&config(&[
            ("dnat-ports-pair", " 8080 = 10264 ,\t9051=10264\n"),
            ("http-proxy-ports", "  9445 ,9446  "),
            ("https-proxy-ports", "\u{3000}9100\u{a0}"),
        ]))
        .unwrap();
        assert_eq!(
            got,
            rules(&[
                (8080, 10264),
                (9051, 10264),
                (9100, 10263),
                (9445, 10264),
                (9446, 10264),
                (10250, 10263),
                (10255, 10264),
            ])
        );
    }

    #[test]
    fn same_rule_twice_is_fine() {
        // Within a key and across keys: dnat-ports-pair and http-proxy-ports
        // both mean "to 10264", and a cluster moving from one to the other
        // may list a port in both for a while.
        let got = from_tunnel_config(&config(&[
            ("dnat-ports-pair", "8080=10264,8080=10264"),
            ("http-proxy-ports", "8080,8080"),
            ("https-proxy-ports", "9100,9100"),
        ]))
        .unwrap();
        assert_eq!(got, rules(&[(8080, 10264), (9100, 10263), (10250, 10263), (10255, 10264)]));
    }

    #[test]
    fn leading_zeros_are_the_same_port() {
        let got = from_tunnel_config(&config(&[("dnat-ports-pair", "08080=010264")])).unwrap();
        assert_eq!(got.get(8080), Some(10264));
    }

    #[test]
    fn extras_may_be_the_tunnel_ports_themselves() {
        // Dialling an edge node's 10264 is a port like any other.
        let got =
            from_tunnel_config(&config(&[("dnat-ports-pair", "10264=10264"), ("https-proxy-ports", "10263")])).unwrap();
        assert_eq!(got.get(10264), Some(10264));
        assert_eq!(got.get(10263), Some(10263));
    }

    #[test]
    fn port_bounds() {
        let got = from_tunnel_config(&config(&[
            ("dnat-ports-pair", "1=10264,65535=10264"),
            ("https-proxy-ports", "2,65534"),
        ]))
        .unwrap();
        assert_eq!(got.get(1), Some(10264));
        assert_eq!(got.get(65535), Some(10264));
        assert_eq!(got.get(2), Some(10263));
        assert_eq!(got.get(65534), Some(10263));
    }

    // --- the ConfigMap: every error, with its exact message ---

    #[test]
    fn error_not_a_port() {
        assert_eq!(
            config_error(&[("dnat-ports-pair", "8080=10264,80x=10264")]),
            r#"dnat-ports-pair: token 2 "80x=10264": "80x" is not a port (1-65535)"#
        );
        assert_eq!(
            config_error(&[("http-proxy-ports", "9445,abc")]),
            r#"http-proxy-ports: token 2 "abc": "abc" is not a port (1-65535)"#
        );
        assert_eq!(
            config_error(&[("dnat-ports-pair", "8080=1O264")]),
            r#"dnat-ports-pair: token 1 "8080=1O264": "1O264" is not a port (1-65535)"#
        );
    }

    #[test]
    fn error_kubelet_ports() {
        assert_eq!(
            config_error(&[("dnat-ports-pair", "10250=10264")]),
            r#"dnat-ports-pair: token 1 "10250=10264": 10250 is the kubelet port, always redirected to 10263, never an extra"#
        );
        assert_eq!(
            config_error(&[("dnat-ports-pair", "8080=10264, 10255=10264")]),
            r#"dnat-ports-pair: token 2 "10255=10264": 10255 is the kubelet read-only port, always redirected to 10264, never an extra"#
        );
        // Not even where the target would agree with the fixed rule: the
        // fixed rules are not configurable, and saying so beats a silent no-op.
        assert_eq!(
            config_error(&[("https-proxy-ports", "10250")]),
            r#"https-proxy-ports: token 1 "10250": 10250 is the kubelet port, always redirected to 10263, never an extra"#
        );
        assert_eq!(
            config_error(&[("http-proxy-ports", "10255")]),
            r#"http-proxy-ports: token 1 "10255": 10255 is the kubelet read-only port, always redirected to 10264, never an extra"#
        );
    }

    #[test]
    fn error_conflict_across_keys() {
        assert_eq!(
            config_error(&[("http-proxy-ports", "8443"), ("https-proxy-ports", "9100, 9101, 8443"),]),
            r#"https-proxy-ports: token 3 "8443": already mapped to 10264 by http-proxy-ports token 1"#
        );
        assert_eq!(
            config_error(&[("dnat-ports-pair", "8080=10264,9100=10264"), ("https-proxy-ports", "9100"),]),
            r#"https-proxy-ports: token 1 "9100": already mapped to 10264 by dnat-ports-pair token 2"#
        );
    }

    #[test]
    fn error_dnat_target_not_10264() {
        assert_eq!(
            config_error(&[("dnat-ports-pair", "8080=10263")]),
            r#"dnat-ports-pair: token 1 "8080=10263": target 10263 is not 10264: dnat-ports-pair redirects only to the tunnel server's plain port 10264; list ports for 10263 in https-proxy-ports"#
        );
        assert_eq!(
            config_error(&[("dnat-ports-pair", "8080=10264,9051=9051")]),
            r#"dnat-ports-pair: token 2 "9051=9051": target 9051 is not 10264: dnat-ports-pair redirects only to the tunnel server's plain port 10264; list ports for 10263 in https-proxy-ports"#
        );
    }

    #[test]
    fn error_not_a_pair() {
        let expected = "expected port=10264 (bare ports belong in http-proxy-ports or https-proxy-ports)";
        assert_eq!(
            config_error(&[("dnat-ports-pair", "9051")]),
            format!(r#"dnat-ports-pair: token 1 "9051": {expected}"#)
        );
        assert_eq!(
            config_error(&[("dnat-ports-pair", "8080=10264=10264")]),
            format!(r#"dnat-ports-pair: token 1 "8080=10264=10264": {expected}"#)
        );
    }

    #[test]
    fn error_pair_in_a_port_list() {
        assert_eq!(
            config_error(&[("http-proxy-ports", "8080=10264")]),
            r#"http-proxy-ports: token 1 "8080=10264": expected a bare port; port=port pairs belong in dnat-ports-pair"#
        );
    }

    #[test]
    fn error_missing_side() {
        assert_eq!(
            config_error(&[("dnat-ports-pair", "=10264")]),
            r#"dnat-ports-pair: token 1 "=10264": no port before "=""#
        );
        assert_eq!(
            config_error(&[("dnat-ports-pair", "8080 = ")]),
            r#"dnat-ports-pair: token 1 "8080 =": no port after "=""#
        );
    }

    #[test]
    fn error_empty_token() {
        let why = "empty token (two commas in a row, or a comma at the start or end)";
        assert_eq!(
            config_error(&[("dnat-ports-pair", "8080=10264,,9051=10264")]),
            format!(r#"dnat-ports-pair: token 2 "": {why}"#)
        );
        assert_eq!(config_error(&[("http-proxy-ports", "9445,")]), format!(r#"http-proxy-ports: token 2 "": {why}"#));
        assert_eq!(
            config_error(&[("https-proxy-ports", " , 9100")]),
            format!(r#"https-proxy-ports: token 1 "": {why}"#)
        );
    }

    #[test]
    fn every_key_checked_first_bad_token_each() {
        let err = from_tunnel_config(&config(&[
            ("dnat-ports-pair", "8080=10264,80x=10264,90y=10264"),
            ("http-proxy-ports", "9445,,"),
            ("https-proxy-ports", "10250,0"),
        ]))
        .unwrap_err();
        let tokens = err.tokens();
        assert_eq!(tokens.len(), 3);
        assert_eq!(
            tokens.iter().map(|t| (t.key, t.position)).collect::<Vec<_>>(),
            [("dnat-ports-pair", 2), ("http-proxy-ports", 2), ("https-proxy-ports", 1)]
        );
        assert_eq!(tokens[0].problem, Problem::NotAPort("80x".to_owned()));
        assert_eq!(tokens[2].problem, Problem::KubeletPort(10250));
        assert_eq!(
            err.to_string(),
            concat!(
                r#"dnat-ports-pair: token 2 "80x=10264": "80x" is not a port (1-65535); "#,
                r#"http-proxy-ports: token 2 "": empty token (two commas in a row, or a comma at the start or end); "#,
                r#"https-proxy-ports: token 1 "10250": 10250 is the kubelet port, always redirected to 10263, never an extra"#
            )
        );
    }

    #[test]
    fn rules_of_a_bad_key_still_count_for_conflicts() {
        // dnat-ports-pair is bad at token 2, yet its token 1 (9100 -> 10264)
        // was read, so https-proxy-ports' 9100 is reported too: fixing the
        // typo alone would not make the config valid.
        let err = from_tunnel_config(&config(&[("dnat-ports-pair", "9100=10264,x"), ("https-proxy-ports", "9100")]))
            .unwrap_err();
        assert_eq!(err.tokens().len(), 2);
        assert_eq!(
            err.tokens()[1].to_string(),
            r#"https-proxy-ports: token 1 "9100": already mapped to 10264 by dnat-ports-pair token 1"#
        );
    }

    // --- garbage ---

    #[test]
    fn garbage() {
        let cases = [
            ("=,==", r#"token 1 "=": no port before "=""#),
            ("==", r#"token 1 "==": expected port=10264"#),
            (",", r#"token 1 "": empty token"#),
            ("65536=10264", r#"token 1 "65536=10264": "65536" is not a port (1-65535)"#),
            ("8080=65536", r#"token 1 "8080=65536": "65536" is not a port (1-65535)"#),
            ("0=10264", r#"token 1 "0=10264": "0" is not a port (1-65535)"#),
            ("00=10264", r#"token 1 "00=10264": "00" is not a port (1-65535)"#),
            ("-1=10264", r#"token 1 "-1=10264": "-1" is not a port (1-65535)"#),
            ("+80=10264", r#"token 1 "+80=10264": "+80" is not a port (1-65535)"#),
            ("8 0=10264", r#"token 1 "8 0=10264": "8 0" is not a port (1-65535)"#),
            ("0x50=10264", r#"token 1 "0x50=10264": "0x50" is not a port (1-65535)"#),
            (
                "99999999999999999999999=10264",
                r#"token 1 "99999999999999999999999=10264": "99999999999999999999999" is not a port (1-65535)"#,
            ),
            // Arabic-Indic and full-width digits: numeric to Unicode, not ASCII, not ports.
            ("٨٠٨٠=10264", r#"token 1 "٨٠٨٠=10264": "٨٠٨٠" is not a port (1-65535)"#),
            ("８０８０=10264", r#"token 1 "８０８０=10264": "８０８０" is not a port (1-65535)"#),
            ("8080;9051=10264", r#"token 1 "8080;9051=10264": "8080;9051" is not a port (1-65535)"#),
        ];
        for (value, want) in cases {
            let got = config_error(&[("dnat-ports-pair", value)]);
            assert!(got.starts_with(&format!("dnat-ports-pair: {want}")), "{value:?}: {got}");
        }
    }

    #[test]
    fn control_characters_are_escaped_in_messages() {
        assert_eq!(
            config_error(&[("dnat-ports-pair", "80\u{1b}[2J=10264")]),
            r#"dnat-ports-pair: token 1 "80\u{1b}[2J=10264": "80\u{1b}[2J" is not a port (1-65535)"#
        );
        // A newline inside a token stays inside the quoted, escaped text, so
        // the message is one line.
        let got = config_error(&[("http-proxy-ports", "9445,94\n46")]);
        assert!(!got.contains('\n'), "{got}");
        assert!(got.contains(r#""94\n46""#), "{got}");
    }

    #[test]
    fn long_token_is_cut_in_the_message() {
        let token = "9".repeat(100_000);
        let got = config_error(&[("http-proxy-ports", &token)]);
        let quoted = format!("\"{}…\"", "9".repeat(64));
        assert_eq!(got, format!("http-proxy-ports: token 1 {quoted}: {quoted} is not a port (1-65535)"));
        // Cutting respects character boundaries.
        let got = config_error(&[("http-proxy-ports", &"٨".repeat(1_000))]);
        assert!(got.contains(&format!("\"{}…\"", "٨".repeat(64))), "{got}");
    }

    #[test]
    fn ten_thousand_tokens() {
        let value = (20_000u16..30_000).map(|p| format!("{p}=10264")).collect::<Vec<_>>().join(",");
        let got = from_tunnel_config(&config(&[("dnat-ports-pair", &value)])).unwrap();
        assert_eq!(got.len(), 10_002);
        assert_eq!(got.get(29_999), Some(10264));

        let ports = (20_000u16..30_000).map(|p| p.to_string()).collect::<Vec<_>>().join(", ");
        let got = from_tunnel_config(&config(&[("https-proxy-ports", &ports)])).unwrap();
        assert_eq!(got.len(), 10_002);
        assert_eq!(got.get(20_000), Some(10263));

        // 10 000 bad tokens: one error, at the first, and a short message.
        let garbage = vec!["=="; 10_000].join(",");
        let err = from_tunnel_config(&config(&[("dnat-ports-pair", &garbage)])).unwrap_err();
        assert_eq!(err.tokens().len(), 1);
        assert_eq!(err.tokens()[0].position, 1);
        assert!(err.to_string().len() < 200, "{err}");

        // The bad one last: its position is counted right.
        let value = format!("{value},oops");
        let err = from_tunnel_config(&config(&[("dnat-ports-pair", &value)])).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"dnat-ports-pair: token 10001 "oops": expected port=10264 (bare ports belong in http-proxy-ports or https-proxy-ports)"#
        );
    }

    // --- the CLI syntax ---

    #[test]
    fn cli_issue_example() {
        let got: PortRules = "10250=10263,10255=10264,8080=10264".parse().unwrap();
        assert_eq!(got, rules(&[(8080, 10264), (10250, 10263), (10255, 10264)]));
        // Display sorts by dialled port.
        assert_eq!(got.to_string(), "8080=10264,10250=10263,10255=10264");
        assert_eq!(got.iter().collect::<Vec<_>>(), [(8080, 10264), (10250, 10263), (10255, 10264)]);
        assert_eq!(got.get(10250), Some(10263));
        assert_eq!(got.get(9051), None);
        assert_eq!(got.len(), 3);
        assert!(!got.is_empty());
    }

    #[test]
    fn cli_empty_is_no_rules() {
        for s in ["", " ", "\t\n"] {
            let got: PortRules = s.parse().unwrap();
            assert!(got.is_empty());
            assert_eq!(got.len(), 0);
            assert_eq!(got.iter().count(), 0);
            assert_eq!(got.to_string(), "");
        }
        assert_eq!(PortRules::default().to_string(), "");
    }

    #[test]
    fn cli_any_target_and_no_implied_rules() {
        // The CLI states every rule itself: no kubelet rules added, none
        // forbidden, any target port.
        let got: PortRules = " 10250 = 10263 , 9000=1 ,65535=65535".parse().unwrap();
        assert_eq!(got, rules(&[(9000, 1), (10250, 10263), (65535, 65535)]));
    }

    #[test]
    fn cli_same_pair_twice_fine_other_target_not() {
        let got: PortRules = "8080=10264,8080=10264".parse().unwrap();
        assert_eq!(got, rules(&[(8080, 10264)]));
        assert_eq!(
            cli_error("8080=10264, 9051=10264, 8080=10263"),
            r#"port rules: token 3 "8080=10263": already mapped to 10264 by port rules token 1"#
        );
    }

    #[test]
    fn cli_errors() {
        let cases = [
            ("8080", r#"port rules: token 1 "8080": expected dialled=target"#),
            ("1=2=3", r#"port rules: token 1 "1=2=3": expected dialled=target"#),
            (
                "8080=10264,",
                r#"port rules: token 2 "": empty token (two commas in a row, or a comma at the start or end)"#,
            ),
            ("=", r#"port rules: token 1 "=": no port before "=""#),
            ("8080=", r#"port rules: token 1 "8080=": no port after "=""#),
            ("8080=0", r#"port rules: token 1 "8080=0": "0" is not a port (1-65535)"#),
            ("x=1,y=2", r#"port rules: token 1 "x=1": "x" is not a port (1-65535)"#),
        ];
        for (s, want) in cases {
            assert_eq!(cli_error(s), want, "{s:?}");
            // The CLI reports one error: its first bad token.
            assert_eq!(s.parse::<PortRules>().unwrap_err().tokens().len(), 1);
        }
    }

    /// splitmix64: a deterministic generator, so a failure reproduces.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn port(&mut self) -> u16 {
            // Bias towards the edges of the range and the well-known ports
            // the parser treats specially.
            match self.below(8) {
                0 => [1, 2, 65534, 65535, 10250, 10255, 10263, 10264][self.below(8) as usize],
                _ => 1 + self.below(65535) as u16,
            }
        }

        fn blank(&mut self) -> &'static str {
            ["", "", " ", "\t", "  "][self.below(5) as usize]
        }
    }

    #[test]
    fn round_trip_random_rule_sets() {
        let mut rng = Rng(0x6e65_7464);
        for _ in 0..2_000 {
            let size = rng.below(40) as usize;
            let original = PortRules { rules: (0..size).map(|_| (rng.port(), rng.port())).collect() };
            let text = original.to_string();
            let parsed: PortRules = text.parse().unwrap();
            assert_eq!(parsed, original, "{text}");
            assert_eq!(parsed.to_string(), text);

            // The same rules written by a person: shuffled, spaced, some
            // repeated, leading zeros.
            let mut tokens: Vec<String> = original
                .iter()
                .flat_map(|(d, t)| {
                    let copies = 1 + rng.below(2) as usize;
                    (0..copies)
                        .map(|_| {
                            let zeros = "0".repeat(rng.below(2) as usize);
                            format!("{}{zeros}{d}{}={}{t}{}", rng.blank(), rng.blank(), rng.blank(), rng.blank())
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            for i in (1..tokens.len()).rev() {
                tokens.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let messy = tokens.join(",");
            assert_eq!(messy.parse::<PortRules>().unwrap(), original, "{messy:?}");
        }
    }

    #[test]
    fn random_config_maps_agree_with_a_model() {
        // Valid ConfigMaps built from random extras: the parsed rules are the
        // kubelet rules plus exactly the extras.
        let mut rng = Rng(0x7475_6e6e);
        for _ in 0..1_000 {
            let mut want: BTreeMap<u16, u16> = KUBELET_ONLY.iter().copied().collect();
            let mut keys: [Vec<String>; 3] = Default::default();
            for _ in 0..rng.below(30) {
                let port = rng.port();
                if port == KUBELET_PORT || port == KUBELET_READONLY_PORT {
                    continue;
                }
                let which = rng.below(3) as usize;
                let target = if which == 2 { TUNNEL_TLS_PORT } else { TUNNEL_HTTP_PORT };
                if *want.entry(port).or_insert(target) != target {
                    continue; // would conflict; this test is about valid maps
                }
                keys[which].push(match which {
                    0 => format!("{port}=10264"),
                    _ => port.to_string(),
                });
            }
            let data = config(&[
                ("dnat-ports-pair", &keys[0].join(", ")),
                ("http-proxy-ports", &keys[1].join(",")),
                ("https-proxy-ports", &keys[2].join(" ,")),
            ]);
            let got = from_tunnel_config(&data).unwrap();
            assert_eq!(got.rules, want, "{data:?}");
        }
    }
}
