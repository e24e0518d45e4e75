//! IP networks in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`, or one address), for keys' IP
//! allowlists ([`KeyRecord::allowed_ips`](crate::store::KeyRecord::allowed_ips)) and the
//! trusted proxies in front of a server ([`TrustedProxies`](crate::ratelimit::TrustedProxies)).
//!
//! IPv4-mapped IPv6 addresses (`::ffff:10.1.2.3`, what a dual-stack socket reports for an IPv4
//! client) are the IPv4 address they carry, both in a network and in an address checked
//! against it.
//!
//! ```
//! use keywarden::net::IpNetwork;
//!
//! let private: IpNetwork = "10.0.0.0/8".parse().unwrap();
//! assert!(private.contains("10.1.2.3".parse().unwrap()));
//! assert!(private.contains("::ffff:10.1.2.3".parse().unwrap()));
//! assert!(!private.contains("192.0.2.1".parse().unwrap()));
//! assert_eq!("::1".parse::<IpNetwork>().unwrap().to_string(), "::1/128");
//! assert!("10.0.0.1/8".parse::<IpNetwork>().is_err()); // host bits set: say 10.0.0.0/8
//! ```

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// A block of IP addresses: an address and a prefix length, with no host bits set. Ordered
/// by address, then prefix (IPv4 first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpNetwork {
    addr: IpAddr,
    prefix: u8,
}

/// Text that is not an IP network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid IP network {0:?}: {1}")]
pub struct IpNetworkParseError(String, &'static str);

impl IpNetworkParseError {
    /// Why the text is not a network (`"not an IP address"`, …), without the text itself.
    pub fn reason(&self) -> &'static str {
        self.1
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it carries; others unchanged.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

impl IpNetwork {
    /// The network of `addr` with `prefix` leading bits.
    ///
    /// # Errors
    /// When the prefix is longer than the address (32 or 128 bits) or `addr` has bits set
    /// past the prefix.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, IpNetworkParseError> {
        let error = |why| IpNetworkParseError(format!("{addr}/{prefix}"), why);
        // A mapped network (`::ffff:10.0.0.0/104`) is the IPv4 network it maps.
        let (addr, prefix) = match addr {
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() && prefix >= 96 => {
                (canonical(addr), prefix - 96)
            }
            other => (other, prefix),
        };
        let bits = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        if prefix > bits {
            return Err(error("the prefix is longer than the address"));
        }
        let network = Self { addr, prefix };
        if network.host_bits(addr) != 0 {
            return Err(error("bits are set past the prefix length"));
        }
        Ok(network)
    }

    /// The first address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is in the network (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }

    /// Whether every address of `other` is in this network (same family, a prefix no longer
    /// than `other`'s, and `other`'s first address inside).
    pub fn contains_network(&self, other: &IpNetwork) -> bool {
        self.prefix <= other.prefix
            && self.addr.is_ipv4() == other.addr.is_ipv4()
            && self.contains(other.addr)
    }

    fn host_bits(&self, ip: IpAddr) -> u128 {
        match ip {
            IpAddr::V4(ip) => {
                let mask = u32::MAX.checked_shr(u32::from(self.prefix)).unwrap_or(0);
                u128::from(u32::from(ip) & mask)
            }
            IpAddr::V6(ip) => {
                let mask = u128::MAX.checked_shr(u32::from(self.prefix)).unwrap_or(0);
                u128::from(ip) & mask
            }
        }
    }
}

impl FromStr for IpNetwork {
    type Err = IpNetworkParseError;

    /// `ADDRESS/PREFIX` or one `ADDRESS` (a /32 or /128).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let shown = || text.chars().take(64).collect::<String>();
        let trimmed = text.trim();
        let (addr, prefix) = match trimmed.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (trimmed, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| IpNetworkParseError(shown(), "not an IP address"))?;
        let prefix = match prefix {
            Some(prefix) if !prefix.is_empty() && prefix.bytes().all(|b| b.is_ascii_digit()) => {
                prefix
                    .parse::<u8>()
                    .map_err(|_| IpNetworkParseError(shown(), "the prefix length is too long"))?
            }
            Some(_) => {
                return Err(IpNetworkParseError(
                    shown(),
                    "the prefix length is not a number",
                ))
            }
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        Self::new(addr, prefix).map_err(|e| IpNetworkParseError(shown(), e.1))
    }
}

impl fmt::Display for IpNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl serde::Serialize for IpNetwork {
    /// As its CIDR text, `10.0.0.0/8`.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for IpNetwork {
    /// From CIDR text or one address, as [`FromStr`] reads it.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn contains_by_prefix() {
        let n = net("192.168.0.0/16");
        assert!(n.contains(ip("192.168.0.0")));
        assert!(n.contains(ip("192.168.255.255")));
        assert!(!n.contains(ip("192.169.0.0")));
        assert!(!n.contains(ip("::1")));
        let any = net("0.0.0.0/0");
        assert!(any.contains(ip("203.0.113.9")));
        assert!(!any.contains(ip("2001:db8::1")));
        let one = net("203.0.113.9");
        assert_eq!(one.prefix(), 32);
        assert!(one.contains(ip("203.0.113.9")));
        assert!(!one.contains(ip("203.0.113.8")));
        let v6 = net("2001:db8::/32");
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(net("::/0").contains(ip("::1")));
        assert!(net("::1").contains(ip("::1")));
    }

    #[test]
    fn mapped_addresses_are_ipv4() {
        assert!(net("10.0.0.0/8").contains(ip("::ffff:10.9.8.7")));
        let mapped = net("::ffff:10.0.0.0/104");
        assert_eq!(mapped, net("10.0.0.0/8"));
        assert!(mapped.contains(ip("10.1.1.1")));
        assert_eq!(net("::ffff:192.0.2.1"), net("192.0.2.1/32"));
    }

    #[test]
    fn refuses_what_is_not_a_network() {
        for bad in [
            "",
            "/8",
            "10.0.0.0/",
            "10.0.0.0/33",
            "10.0.0.0/-1",
            "10.0.0.0/+8",
            "10.0.0.0/8/8",
            "10.0.0.1/8",
            "::1/129",
            "2001:db8::1/32",
            "10.0.0.0/256",
            "example.com/8",
            "10.0.0.0 /8",
        ] {
            assert!(bad.parse::<IpNetwork>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn contains_networks_of_its_own_family_within_its_prefix() {
        let wide = net("10.0.0.0/8");
        assert!(wide.contains_network(&net("10.1.0.0/16")));
        assert!(wide.contains_network(&wide));
        assert!(wide.contains_network(&net("10.255.255.255")));
        assert!(!wide.contains_network(&net("0.0.0.0/0")));
        assert!(!wide.contains_network(&net("11.0.0.0/16")));
        assert!(!net("10.1.0.0/16").contains_network(&wide));
        assert!(net("::/0").contains_network(&net("2001:db8::/32")));
        // Families never contain each other, even /0 of one and a mapped address.
        assert!(!net("::/0").contains_network(&net("10.0.0.0/8")));
        assert!(!net("0.0.0.0/0").contains_network(&net("::1")));
        assert!(net("0.0.0.0/0").contains_network(&net("::ffff:10.0.0.1")));
    }

    #[test]
    fn a_parse_error_says_why_without_the_text() {
        for (text, why) in [
            ("10.0.0.1/8", "bits are set past the prefix length"),
            ("10.0.0.0/33", "the prefix is longer than the address"),
            ("kw_live_secret", "not an IP address"),
            ("10.0.0.0/x", "the prefix length is not a number"),
        ] {
            let error = text.parse::<IpNetwork>().unwrap_err();
            assert_eq!(error.reason(), why, "{text}");
            assert!(!error.reason().contains(text));
        }
    }

    #[test]
    fn serializes_as_cidr_text() {
        let n = net("2001:db8::/32");
        assert_eq!(serde_json::to_string(&n).unwrap(), r#""2001:db8::/32""#);
        assert_eq!(
            serde_json::from_str::<IpNetwork>(r#""10.0.0.1""#).unwrap(),
            net("10.0.0.1/32")
        );
        assert!(serde_json::from_str::<IpNetwork>(r#""10.0.0.1/8""#).is_err());
        assert!(serde_json::from_str::<IpNetwork>("8").is_err());
    }

    #[test]
    fn displays_as_cidr() {
        assert_eq!(net("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(net(" 2001:db8::/32 ").to_string(), "2001:db8::/32");
    }
}
