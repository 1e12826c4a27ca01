//! The egress policy: the admin's `allow_network` entries, parsed, and the decision whether one
//! connection (the name the guest asked for, the port, the address the host resolved) may go.
//!
//! Pure: no I/O, no resolution (the proxy resolves and asks [`Policy::check`] about each address
//! before it connects to exactly that address).
//!
//! Entries (`c.MicroVMKernel.allow_network`):
//! * `pypi.org`, `pypi.org:443` — that name (any port, or that port). Names are compared
//!   lowercase, without a trailing dot.
//! * `*.example.com`, `*.example.com:443` — any name strictly under `example.com` (not
//!   `example.com` itself). `*` alone allows every name (the refused ranges below still apply).
//! * `10.1.0.0/16`, `10.1.0.0/16:5432`, `192.0.2.7`, `192.0.2.7:80`, `fd00::/8`,
//!   `[fd00::/8]:443`, `[2001:db8::1]:80` — addresses (an IPv6 entry with a port is bracketed).
//!
//! A connection is allowed when
//! * the guest asked for a name: a name entry matches it and its port, and the resolved address
//!   is not in [`ALWAYS_REFUSED`] — or an address entry contains the resolved address and port;
//! * the guest asked for an address literal: an address entry contains it and the port (name
//!   entries, `*` included, never match a literal).
//!
//! [`ALWAYS_REFUSED`] (loopback, link-local with the cloud metadata addresses, unspecified,
//! multicast, broadcast) is allowed only by an address entry that contains the address; a
//! wildcard never opens it. IPv4-mapped IPv6 addresses are judged as the IPv4 address.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// Ranges refused unless an address entry (IP or CIDR, not a name or wildcard) contains the
/// address: the host's loopback services, link-local (169.254.169.254 and fd00:ec2::254 are the
/// cloud metadata services), unspecified (connecting to 0.0.0.0 reaches the host's loopback),
/// multicast and broadcast.
pub const ALWAYS_REFUSED: &[(&str, &str)] = &[
    ("127.0.0.0/8", "the host's loopback"),
    ("::1/128", "the host's loopback"),
    ("169.254.169.254/32", "the cloud metadata service"),
    ("fd00:ec2::254/128", "the cloud metadata service"),
    ("169.254.0.0/16", "a link-local address"),
    ("fe80::/10", "a link-local address"),
    ("0.0.0.0/8", "an unspecified address"),
    ("::/128", "an unspecified address"),
    ("224.0.0.0/4", "a multicast address"),
    ("ff00::/8", "a multicast address"),
    ("255.255.255.255/32", "the broadcast address"),
];

/// What an entry matches besides the port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One name, lowercase, without a trailing dot.
    Name(String),
    /// Names strictly under this suffix (stored without the `*.`); empty = every name.
    Wildcard(String),
    /// Addresses in this network (a single address is a /32 or /128).
    Net(IpNet),
}

/// One parsed `allow_network` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub target: Target,
    /// None = any port.
    pub port: Option<u16>,
}

/// A bad `allow_network` entry; the message says what is wrong and what is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub entry: String,
    pub reason: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bad allow_network entry {:?}: {}; entries look like \"pypi.org\", \"*.example.com:443\", \
             \"10.1.0.0/16:5432\" or \"[2001:db8::/32]:443\"",
            self.entry, self.reason
        )
    }
}

impl std::error::Error for PolicyError {}

/// Why a connection was refused (its `Display` is the message the client gets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub host: String,
    pub port: u16,
    /// Set when the name was allowed but resolved to an address the policy refuses.
    pub address: Option<(IpAddr, &'static str)>,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(_)) => format!("[{}]:{}", self.host, self.port),
            _ => format!("{}:{}", self.host, self.port),
        };
        match self.address {
            None => write!(
                f,
                "network access to {shown} is not allowed by this kernel's policy; an admin can allow it \
                 with c.MicroVMKernel.allow_network = [\"{shown}\"]"
            ),
            Some((addr, what)) => {
                let net = IpNet::from(addr);
                let entry = match addr {
                    IpAddr::V4(_) => format!("{net}:{}", self.port),
                    IpAddr::V6(_) => format!("[{net}]:{}", self.port),
                };
                write!(
                    f,
                    "network access to {shown} is not allowed by this kernel's policy: it resolves to {addr}, \
                     {what}, which is refused unless listed as an address; an admin can allow it with \
                     c.MicroVMKernel.allow_network = [\"{entry}\"]"
                )
            }
        }
    }
}

impl std::error::Error for Refusal {}

/// The parsed policy. The default (no entries) refuses everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub rules: Vec<Rule>,
}

/// `::ffff:a.b.c.d` is judged as `a.b.c.d`.
pub fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => addr,
        },
        v4 => v4,
    }
}

/// The always-refused range holding `addr`, described; None for an ordinary address.
pub fn refused_range(addr: IpAddr) -> Option<&'static str> {
    let addr = canonical(addr);
    ALWAYS_REFUSED.iter().find_map(|(net, what)| {
        let net: IpNet = net.parse().expect("ALWAYS_REFUSED holds valid CIDRs");
        net.contains(&addr).then_some(*what)
    })
}

/// Lowercase, no trailing dot; None unless every label is 1-63 of `[a-z0-9-_]` not starting or
/// ending with `-`, and the whole is at most 253 characters.
pub fn normalize_name(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if name.is_empty() || name.len() > 253 {
        return None;
    }
    let ok = name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    // An all-numeric dotted name is an address written oddly (`127.1`); refuse it as a name.
    let numeric = name.split('.').all(|l| l.bytes().all(|b| b.is_ascii_digit()));
    (ok && !numeric).then_some(name)
}

fn parse_port(entry: &str, text: &str) -> Result<u16, PolicyError> {
    match text.parse::<u16>() {
        Ok(p) if p > 0 && text.bytes().all(|b| b.is_ascii_digit()) => Ok(p),
        _ => Err(PolicyError { entry: entry.into(), reason: format!("{text:?} is not a port (1-65535)") }),
    }
}

fn parse_net(text: &str) -> Option<IpNet> {
    if let Ok(net) = text.parse::<IpNet>() {
        // `10.1.2.3/16` names host bits: refuse it rather than guess which was meant.
        return (net.trunc() == net).then_some(net);
    }
    text.parse::<IpAddr>().ok().map(|a| IpNet::from(canonical(a)))
}

impl Rule {
    /// Parses one entry (see the module doc).
    pub fn parse(entry: &str) -> Result<Rule, PolicyError> {
        let bad = |reason: &str| PolicyError { entry: entry.into(), reason: reason.into() };
        let text = entry.trim();
        if text.is_empty() {
            return Err(bad("it is empty"));
        }
        if text.contains("://") || text.contains('/') && text.contains(|c: char| c.is_ascii_alphabetic() && !c.is_ascii_hexdigit()) {
            return Err(bad("it looks like a URL; give a host name, address or CIDR with an optional :port"));
        }
        // `[v6 or v6/len]` with an optional `:port`.
        if let Some(rest) = text.strip_prefix('[') {
            let (inside, after) = rest.split_once(']').ok_or_else(|| bad("'[' without ']'"))?;
            let net = match inside.parse::<IpAddr>() {
                Ok(IpAddr::V6(_)) | Err(_) => parse_net(inside)
                    .filter(|n| matches!(n, IpNet::V6(_)) || inside.contains(':'))
                    .ok_or_else(|| bad("the part in brackets is not an IPv6 address or network"))?,
                Ok(IpAddr::V4(_)) => return Err(bad("brackets are for IPv6 addresses")),
            };
            let port = match after {
                "" => None,
                p => Some(parse_port(entry, p.strip_prefix(':').ok_or_else(|| bad("expected ':port' after ']'"))?)?),
            };
            return Ok(Rule { target: Target::Net(net), port });
        }
        // Unbracketed IPv6 (two or more colons): an address or network, no port.
        if text.matches(':').count() >= 2 {
            let net = parse_net(text).ok_or_else(|| {
                bad("not an IPv6 address or network (an IPv6 entry with a port is written [addr]:port)")
            })?;
            return Ok(Rule { target: Target::Net(net), port: None });
        }
        let (host, port) = match text.rsplit_once(':') {
            Some((h, p)) => (h, Some(parse_port(entry, p)?)),
            None => (text, None),
        };
        if host.is_empty() {
            return Err(bad("no host before the port"));
        }
        if host.bytes().next().is_some_and(|b| b.is_ascii_digit()) && (host.contains('/') || host.parse::<IpAddr>().is_ok()) {
            let net = parse_net(host).ok_or_else(|| bad("not an IPv4 address or network (a CIDR's host bits must be zero)"))?;
            return Ok(Rule { target: Target::Net(net), port });
        }
        if host.contains('/') {
            return Err(bad("not an IPv4 network"));
        }
        if host == "*" {
            return Ok(Rule { target: Target::Wildcard(String::new()), port });
        }
        if let Some(suffix) = host.strip_prefix("*.") {
            let suffix = normalize_name(suffix).ok_or_else(|| bad("the part after '*.' is not a host name"))?;
            return Ok(Rule { target: Target::Wildcard(suffix), port });
        }
        if host.contains('*') {
            return Err(bad("'*' is allowed only as the whole first label ('*.example.com')"));
        }
        let name = normalize_name(host).ok_or_else(|| bad("not a host name, an address or a CIDR"))?;
        Ok(Rule { target: Target::Name(name), port })
    }

    fn port_ok(&self, port: u16) -> bool {
        self.port.is_none_or(|p| p == port)
    }

    fn matches_name(&self, name: &str, port: u16) -> bool {
        self.port_ok(port)
            && match &self.target {
                Target::Name(n) => n == name,
                Target::Wildcard(s) if s.is_empty() => true,
                Target::Wildcard(s) => name.len() > s.len() + 1 && name.ends_with(s.as_str()) && name.as_bytes()[name.len() - s.len() - 1] == b'.',
                Target::Net(_) => false,
            }
    }

    fn matches_addr(&self, addr: IpAddr, port: u16) -> bool {
        self.port_ok(port) && matches!(&self.target, Target::Net(n) if n.contains(&addr))
    }
}

impl Policy {
    /// Parses every entry; the first bad one is the error.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Policy, PolicyError> {
        let rules = entries.iter().map(|e| Rule::parse(e.as_ref())).collect::<Result<_, _>>()?;
        Ok(Policy { rules })
    }

    /// True when no connection can be allowed.
    pub fn is_deny_all(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether the guest's request for `host` (a name or an address literal, as it asked) at
    /// `port` may be connected to `addr` (what the host resolved `host` to).
    pub fn check(&self, host: &str, port: u16, addr: IpAddr) -> Result<(), Refusal> {
        let addr = canonical(addr);
        let literal = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().ok().map(canonical);
        let refuse = |address| Err(Refusal { host: host.to_string(), port, address });
        // An address entry that contains the address allows it, whatever the name.
        if self.rules.iter().any(|r| r.matches_addr(addr, port)) {
            return match literal {
                // A literal must be the address connected to (the proxy guarantees it).
                Some(l) if l != addr => refuse(None),
                _ => Ok(()),
            };
        }
        if literal.is_some() {
            return refuse(None);
        }
        let Some(name) = normalize_name(host) else { return refuse(None) };
        if !self.rules.iter().any(|r| r.matches_name(&name, port)) {
            return refuse(None);
        }
        match refused_range(addr) {
            Some(what) => refuse(Some((addr, what))),
            None => Ok(()),
        }
    }

    /// Whether any entry could allow `host:port` (before resolving): the proxy's early refusal.
    pub fn may_allow(&self, host: &str, port: u16) -> bool {
        if let Ok(addr) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            return self.check(host, port, addr).is_ok();
        }
        match normalize_name(host) {
            Some(name) => self.rules.iter().any(|r| r.matches_name(&name, port) || matches!(r.target, Target::Net(_)) && r.port_ok(port)),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn policy(entries: &[&str]) -> Policy {
        Policy::parse(entries).unwrap()
    }

    #[test]
    fn empty_policy_refuses_everything() {
        let p = policy(&[]);
        assert!(p.is_deny_all());
        assert!(p.check("pypi.org", 443, ip("151.101.0.223")).is_err());
        assert!(p.check("151.101.0.223", 443, ip("151.101.0.223")).is_err());
    }

    #[test]
    fn exact_names_with_and_without_port() {
        let p = policy(&["pypi.org", "files.pythonhosted.org:443"]);
        assert!(p.check("pypi.org", 443, ip("151.101.0.223")).is_ok());
        assert!(p.check("PyPI.org.", 80, ip("151.101.0.223")).is_ok());
        assert!(p.check("files.pythonhosted.org", 443, ip("151.101.1.63")).is_ok());
        assert!(p.check("files.pythonhosted.org", 80, ip("151.101.1.63")).is_err());
        assert!(p.check("evil-pypi.org", 443, ip("151.101.0.223")).is_err());
        assert!(p.check("pypi.org.evil.com", 443, ip("151.101.0.223")).is_err());
        assert!(p.check("www.pypi.org", 443, ip("151.101.0.223")).is_err());
    }

    #[test]
    fn wildcards_match_strict_subdomains_only() {
        let p = policy(&["*.example.com:443"]);
        assert!(p.check("a.example.com", 443, ip("93.184.216.34")).is_ok());
        assert!(p.check("a.b.example.com", 443, ip("93.184.216.34")).is_ok());
        assert!(p.check("example.com", 443, ip("93.184.216.34")).is_err());
        assert!(p.check("aexample.com", 443, ip("93.184.216.34")).is_err());
        assert!(p.check("a.example.com", 80, ip("93.184.216.34")).is_err());
        assert!(p.check("a.example.com.evil.org", 443, ip("93.184.216.34")).is_err());
    }

    #[test]
    fn star_allows_every_name_but_never_a_literal_or_refused_range() {
        let p = policy(&["*"]);
        assert!(p.check("anything.org", 1234, ip("198.51.100.1")).is_ok());
        assert!(p.check("198.51.100.1", 1234, ip("198.51.100.1")).is_err());
        assert!(p.check("localhost", 80, ip("127.0.0.1")).is_err());
        assert!(p.check("meta.internal", 80, ip("169.254.169.254")).is_err());
    }

    #[test]
    fn cidrs_v4_and_v6_with_ports() {
        let p = policy(&["10.1.0.0/16:5432", "2001:db8::/32", "[fd12::/16]:443", "192.0.2.7"]);
        assert!(p.check("10.1.2.3", 5432, ip("10.1.2.3")).is_ok());
        assert!(p.check("db.internal", 5432, ip("10.1.2.3")).is_ok(), "an address entry allows a name resolving into it");
        assert!(p.check("10.1.2.3", 5433, ip("10.1.2.3")).is_err());
        assert!(p.check("10.2.0.1", 5432, ip("10.2.0.1")).is_err());
        assert!(p.check("2001:db8::5", 80, ip("2001:db8::5")).is_ok());
        assert!(p.check("[2001:db8::5]", 80, ip("2001:db8::5")).is_ok());
        assert!(p.check("2001:db9::5", 80, ip("2001:db9::5")).is_err());
        assert!(p.check("fd12::1", 443, ip("fd12::1")).is_ok());
        assert!(p.check("fd12::1", 80, ip("fd12::1")).is_err());
        assert!(p.check("192.0.2.7", 1, ip("192.0.2.7")).is_ok());
        assert!(p.check("192.0.2.8", 1, ip("192.0.2.8")).is_err());
        // A literal must be what is connected to.
        assert!(p.check("10.1.2.3", 5432, ip("10.1.2.4")).is_err());
    }

    #[test]
    fn always_refused_ranges_for_names() {
        let p = policy(&["allowed.test"]);
        for a in ["127.0.0.1", "127.8.9.10", "::1", "169.254.169.254", "fd00:ec2::254", "169.254.1.1",
                  "fe80::1", "0.0.0.0", "::", "224.0.0.1", "ff02::1", "255.255.255.255", "::ffff:127.0.0.1",
                  "::ffff:169.254.169.254"] {
            let r = p.check("allowed.test", 80, ip(a)).unwrap_err();
            assert!(r.address.is_some(), "{a}");
            assert!(r.to_string().contains("refused unless listed as an address"), "{r}");
        }
        assert!(p.check("allowed.test", 80, ip("198.51.100.3")).is_ok());
        assert!(p.check("allowed.test", 80, ip("10.0.0.1")).is_ok(), "private ranges are not always refused");
    }

    #[test]
    fn explicit_loopback_cidr_allows_loopback() {
        let p = policy(&["127.0.0.0/8:8080", "[::1]:8080"]);
        assert!(p.check("127.0.0.1", 8080, ip("127.0.0.1")).is_ok());
        assert!(p.check("localhost", 8080, ip("127.0.0.1")).is_ok());
        assert!(p.check("::1", 8080, ip("::1")).is_ok());
        assert!(p.check("::ffff:127.0.0.1", 8080, ip("::ffff:127.0.0.1")).is_ok());
        assert!(p.check("127.0.0.1", 8081, ip("127.0.0.1")).is_err());
        assert!(p.check("169.254.169.254", 8080, ip("169.254.169.254")).is_err());
    }

    #[test]
    fn refusal_message_says_what_to_do() {
        let p = policy(&[]);
        let r = p.check("example.org", 443, ip("93.184.216.34")).unwrap_err();
        assert_eq!(
            r.to_string(),
            "network access to example.org:443 is not allowed by this kernel's policy; an admin can allow it \
             with c.MicroVMKernel.allow_network = [\"example.org:443\"]"
        );
        let r = p.check("::1", 80, ip("::1")).unwrap_err();
        assert!(r.to_string().starts_with("network access to [::1]:80 is not allowed"), "{r}");
        let r = policy(&["x.test"]).check("x.test", 80, ip("127.0.0.1")).unwrap_err();
        assert!(r.to_string().contains("[\"127.0.0.1/32:80\"]"), "{r}");
    }

    #[test]
    fn bad_entries_are_refused_with_a_reason() {
        for bad in ["", "  ", "http://pypi.org", "pypi.org/simple", "pypi.org:0", "pypi.org:65536", "pypi.org:x",
                    ":443", "10.1.2.3/16", "10.0.0.0/33", "*.", "a*.example.com", "foo.*.com", "-bad.org",
                    "under score..org", "[10.0.0.1]:80", "[::1", "[::1]443", "fd00::/129", "127.1", "1.2.3",
                    "a:b:c"] {
            let e = Rule::parse(bad).expect_err(bad);
            assert!(e.to_string().starts_with("bad allow_network entry"), "{e}");
        }
        let e = Policy::parse(&["pypi.org", "http://x"]).unwrap_err();
        assert_eq!(e.entry, "http://x");
    }

    #[test]
    fn parses_every_documented_form() {
        let p = policy(&["pypi.org", "files.pythonhosted.org", "*.example.com:443", "10.1.0.0/16:5432",
                         "[2001:db8::/32]:443", "::1", "*", "*:443", "my_host.lan"]);
        assert_eq!(p.rules[0], Rule { target: Target::Name("pypi.org".into()), port: None });
        assert_eq!(p.rules[2], Rule { target: Target::Wildcard("example.com".into()), port: Some(443) });
        assert_eq!(p.rules[3], Rule { target: Target::Net("10.1.0.0/16".parse().unwrap()), port: Some(5432) });
        assert_eq!(p.rules[4], Rule { target: Target::Net("2001:db8::/32".parse().unwrap()), port: Some(443) });
        assert_eq!(p.rules[5], Rule { target: Target::Net("::1/128".parse().unwrap()), port: None });
        assert_eq!(p.rules[7], Rule { target: Target::Wildcard(String::new()), port: Some(443) });
    }

    #[test]
    fn may_allow_is_a_superset_of_check() {
        let p = policy(&["a.test:80", "10.0.0.0/8:5432"]);
        assert!(p.may_allow("a.test", 80));
        assert!(!p.may_allow("a.test", 81));
        assert!(p.may_allow("b.test", 5432), "a name may resolve into an address entry");
        assert!(!p.may_allow("b.test", 81));
        assert!(p.may_allow("10.1.1.1", 5432));
        assert!(!p.may_allow("11.1.1.1", 5432));
        assert!(!p.may_allow("bad name", 80));
    }
}
