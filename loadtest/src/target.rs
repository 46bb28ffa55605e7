//! The `--target` the harness drives: a URL (`http://127.0.0.1:8080`, `https://localhost:8443/`),
//! as wrk and oha take it, or a bare `host:port` (plain HTTP). Parsing checks the form only; the
//! host, a name or an IP, is resolved when the run starts.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

/// Plain HTTP or HTTP over TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

/// A parsed `--target`: scheme, host and port, not yet resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub scheme: Scheme,
    /// The host as written, without the brackets of an IPv6 literal: the TLS server name, and
    /// what is resolved.
    pub host: String,
    pub port: u16,
}

/// Why a `--target` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("{0:?} is not a URL or host:port (e.g. http://127.0.0.1:8080 or 127.0.0.1:8080)")]
    Malformed(String),
    #[error("{target:?}: scheme {scheme:?} is not supported: use http:// or https://")]
    Scheme { target: String, scheme: String },
    #[error("{target:?}: the target is a server, not a page: drop the path {path:?} (only / is allowed)")]
    Path { target: String, path: String },
    #[error("{0:?}: a user name or password in the target is not supported")]
    UserInfo(String),
    #[error("{0:?}: a bare host needs a port (host:port), or write a URL (http://host)")]
    NoPort(String),
}

impl FromStr for Target {
    type Err = TargetError;

    fn from_str(raw: &str) -> Result<Self, TargetError> {
        let malformed = || TargetError::Malformed(raw.to_owned());
        // A bare `host:port` is the authority form of a URI; anything with `://` is a URL.
        let (scheme, rest) = match raw.split_once("://") {
            Some((scheme, rest)) => {
                let scheme = match scheme.to_ascii_lowercase().as_str() {
                    "http" => Scheme::Http,
                    "https" => Scheme::Https,
                    _ => {
                        return Err(TargetError::Scheme {
                            target: raw.to_owned(),
                            scheme: scheme.to_owned(),
                        })
                    }
                };
                (Some(scheme), rest)
            }
            None => (None, raw),
        };
        let (authority, path) = match rest.find(['/', '?', '#']) {
            Some(at) => rest.split_at(at),
            None => (rest, ""),
        };
        if scheme.is_none() && !path.is_empty() {
            return Err(malformed());
        }
        if !matches!(path, "" | "/") {
            return Err(TargetError::Path {
                target: raw.to_owned(),
                path: path.to_owned(),
            });
        }
        if authority.contains('@') {
            return Err(TargetError::UserInfo(raw.to_owned()));
        }
        // The authority's syntax (IPv6 brackets, port range) is checked by the `http` crate.
        let authority: hyper::http::uri::Authority = authority.parse().map_err(|_| malformed())?;
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() {
            return Err(malformed());
        }
        let port = match (authority.port_u16(), scheme) {
            (Some(port), _) => port,
            (None, Some(Scheme::Http)) => 80,
            (None, Some(Scheme::Https)) => 443,
            (None, None) => return Err(TargetError::NoPort(raw.to_owned())),
        };
        Ok(Target {
            scheme: scheme.unwrap_or(Scheme::Http),
            host: host.to_owned(),
            port,
        })
    }
}

impl Target {
    /// Whether the target speaks TLS.
    pub fn is_https(&self) -> bool {
        self.scheme == Scheme::Https
    }

    /// `host:port` as the `Host` header and `:authority` carry it (IPv6 in brackets).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The first address the host resolves to (an IP resolves to itself).
    pub async fn resolve(&self) -> Result<SocketAddr, String> {
        let mut addrs = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("--target {self}: cannot resolve {:?}: {e}", self.host))?;
        addrs
            .next()
            .ok_or_else(|| format!("--target {self}: {:?} resolves to no address", self.host))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        write!(f, "{scheme}://{}", self.authority())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(scheme: Scheme, host: &str, port: u16) -> Target {
        Target {
            scheme,
            host: host.to_owned(),
            port,
        }
    }

    #[test]
    fn urls_parse_with_or_without_a_trailing_slash() {
        for raw in ["http://127.0.0.1:8080", "http://127.0.0.1:8080/"] {
            assert_eq!(raw.parse(), Ok(target(Scheme::Http, "127.0.0.1", 8080)));
        }
        for raw in ["https://127.0.0.1:8443", "HTTPS://127.0.0.1:8443/"] {
            assert_eq!(raw.parse(), Ok(target(Scheme::Https, "127.0.0.1", 8443)));
        }
        assert_eq!(
            "https://localhost".parse(),
            Ok(target(Scheme::Https, "localhost", 443))
        );
        assert_eq!(
            "http://shop.example".parse(),
            Ok(target(Scheme::Http, "shop.example", 80))
        );
        let ipv6: Target = "https://[::1]:8443/".parse().expect("ipv6 url");
        assert_eq!(ipv6, target(Scheme::Https, "::1", 8443));
        assert_eq!(ipv6.authority(), "[::1]:8443");
        assert_eq!(ipv6.to_string(), "https://[::1]:8443");
    }

    #[test]
    fn a_bare_host_and_port_is_plain_http() {
        assert_eq!(
            "127.0.0.1:8080".parse(),
            Ok(target(Scheme::Http, "127.0.0.1", 8080))
        );
        assert_eq!(
            "localhost:9000".parse(),
            Ok(target(Scheme::Http, "localhost", 9000))
        );
        assert_eq!("[::1]:8080".parse(), Ok(target(Scheme::Http, "::1", 8080)));
        assert!(matches!(
            "localhost".parse::<Target>(),
            Err(TargetError::NoPort(_))
        ));
    }

    #[test]
    fn other_schemes_paths_and_garbage_are_refused() {
        assert!(matches!(
            "ftp://127.0.0.1:21".parse::<Target>(),
            Err(TargetError::Scheme { scheme, .. }) if scheme == "ftp"
        ));
        assert!(matches!(
            "ws://127.0.0.1:8080".parse::<Target>(),
            Err(TargetError::Scheme { .. })
        ));
        for raw in [
            "http://127.0.0.1:8080/v1",
            "http://127.0.0.1:8080/?x=1",
            "https://127.0.0.1:8443//",
        ] {
            assert!(
                matches!(raw.parse::<Target>(), Err(TargetError::Path { .. })),
                "{raw}"
            );
        }
        assert!(matches!(
            "http://user:pw@127.0.0.1:8080".parse::<Target>(),
            Err(TargetError::UserInfo(_))
        ));
        for raw in [
            "",
            "http://",
            "http://:8080",
            "127.0.0.1:99999",
            "127.0.0.1:port",
            "127.0.0.1:8080/v1",
            "http://127.0.0.1:8080 x",
        ] {
            assert!(raw.parse::<Target>().is_err(), "{raw:?} was accepted");
        }
    }

    #[tokio::test]
    async fn names_and_ips_resolve() {
        let ip: Target = "127.0.0.1:8080".parse().expect("ip");
        assert_eq!(
            ip.resolve().await,
            Ok(SocketAddr::from(([127, 0, 0, 1], 8080)))
        );
        let name: Target = "http://localhost:8080".parse().expect("name");
        let addr = name.resolve().await.expect("localhost resolves");
        assert!(addr.ip().is_loopback() && addr.port() == 8080, "{addr}");
    }
}
