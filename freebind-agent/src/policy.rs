//! Which addresses an attachment may bind while they are not local.
use std::{fmt, net::IpAddr, str::FromStr};

use anyhow::{anyhow, bail, Result};

/// One allowed prefix, `192.0.2.0/24` or `2001:db8::/32`; a bare address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl FromStr for Prefix {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (addr_s, len_s) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr_s.parse().map_err(|_| {
            anyhow!("invalid prefix {s:?}: {addr_s:?} is not an IPv4 or IPv6 address")
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len_s {
            None => max,
            Some(l) => match l.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => bail!("invalid prefix {s:?}: the length must be a number from 0 to {max}"),
            },
        };
        if let IpAddr::V6(v6) = addr {
            if v6.to_ipv4_mapped().is_some() {
                bail!("invalid prefix {s:?}: write IPv4-mapped addresses in IPv4 form (they are checked as IPv4)");
            }
        }
        let prefix = Prefix { addr, len };
        if prefix.network() != addr {
            bail!(
                "invalid prefix {s:?}: host bits are set (did you mean {}/{len}?)",
                prefix.network()
            );
        }
        Ok(prefix)
    }
}

impl Prefix {
    /// The address with the host bits cleared.
    pub fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// An attachment's policy: the prefixes it may bind while not local. Empty means any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub allow: Vec<Prefix>,
}

impl Policy {
    pub fn parse<S: AsRef<str>>(allow: &[S]) -> Result<Self> {
        let allow = allow
            .iter()
            .map(|s| s.as_ref().trim().parse())
            .collect::<Result<_>>()?;
        Ok(Self { allow })
    }

    /// The prefixes to load into the kernel's tries: the default "any" is 0.0.0.0/0 and ::/0.
    pub fn effective(&self) -> Vec<Prefix> {
        if self.allow.is_empty() {
            vec![
                Prefix {
                    addr: IpAddr::V4(0.into()),
                    len: 0,
                },
                Prefix {
                    addr: IpAddr::V6(0.into()),
                    len: 0,
                },
            ]
        } else {
            self.allow.clone()
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.allow.is_empty() {
            return f.write_str("any address");
        }
        let list: Vec<String> = self.allow.iter().map(ToString::to_string).collect();
        f.write_str(&list.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prefixes_and_bare_addresses() {
        let p = Policy::parse(&["192.0.2.0/24", "2001:db8::/32", "203.0.113.5"]).unwrap();
        assert_eq!(p.allow[0].len, 24);
        assert_eq!(p.allow[1].len, 32);
        assert_eq!(p.allow[2].len, 32);
        assert_eq!(p.to_string(), "192.0.2.0/24, 2001:db8::/32, 203.0.113.5/32");
    }

    #[test]
    fn rejects_bad_prefixes_with_one_line_reasons() {
        for (bad, why) in [
            ("192.0.2.0/33", "from 0 to 32"),
            ("2001:db8::/129", "from 0 to 128"),
            ("banana", "not an IPv4 or IPv6 address"),
            ("192.0.2.10/24", "did you mean 192.0.2.0/24"),
            ("::ffff:192.0.2.0/120", "IPv4 form"),
            ("192.0.2.0/", "from 0 to 32"),
        ] {
            let err = Policy::parse(&[bad]).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
            assert!(!err.contains('\n'), "{bad}: {err}");
        }
    }

    #[test]
    fn default_policy_is_any() {
        let p = Policy::default();
        assert_eq!(p.to_string(), "any address");
        assert_eq!(p.effective().len(), 2);
        assert!(p.effective().iter().all(|p| p.len == 0));
    }
}
