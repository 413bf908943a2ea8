//! Who the client is: the peer address, or the right-most untrusted `X-Forwarded-For` hop
//! when the peer is one of `server.trusted_proxies` (addresses or CIDR blocks). A request may
//! carry several `X-Forwarded-For` headers; they are one list, in order
//! ([`join_forwarded_for`]). Pure.

use std::net::IpAddr;

use ipnet::IpNet;

/// An entry of `server.trusted_proxies` that is neither an address nor a CIDR block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IP address or CIDR block")]
pub(crate) struct InvalidProxy(pub(crate) String);

/// Read one entry of `server.trusted_proxies`: an address (a block of one) or a CIDR block.
pub(crate) fn parse_trusted(raw: &str) -> Result<IpNet, InvalidProxy> {
    let raw = raw.trim();
    raw.parse::<IpNet>()
        .or_else(|_| raw.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| InvalidProxy(raw.to_string()))
}

/// Every `X-Forwarded-For` header of a request as the one list they make (RFC 7230 3.2.2:
/// repeated headers are one comma-separated value, in order); `None` when there is none.
/// Taking only the first would let a client hide behind its own header when a proxy appends
/// a second one instead of extending the first. Bytes that are not UTF-8 stay unreadable hops,
/// which end the walk as any garbage hop does.
pub(crate) fn join_forwarded_for<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Option<String> {
    let mut joined: Option<String> = None;
    for value in values {
        let value = String::from_utf8_lossy(value);
        match joined.as_mut() {
            Some(list) => {
                list.push(',');
                list.push_str(&value);
            }
            None => joined = Some(value.into_owned()),
        }
    }
    joined
}

/// IPv4-mapped IPv6 peers (`::ffff:1.2.3.4`) count as their IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Who the client is: the peer, or the right-most untrusted `X-Forwarded-For` hop when the
/// peer is a trusted proxy. Taking the right-most untrusted hop means a client cannot spoof
/// its address by sending its own `X-Forwarded-For` through nginx.
pub(crate) fn client_ip(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|net| net.contains(&ip));
    let peer = canonical(peer);
    if !is_trusted(peer) {
        return peer;
    }
    let Some(header) = forwarded_for else {
        return peer;
    };
    let mut client = peer;
    for hop in header.rsplit(',') {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) => {
                client = canonical(ip);
                if !is_trusted(client) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CIDR matching, including IPv4-mapped IPv6 peers.
    #[test]
    fn cidr() {
        let trusted = [parse_trusted("10.0.0.0/8").unwrap()];
        let peer = |ip: &str| client_ip(ip.parse().unwrap(), Some("1.2.3.4"), &trusted);
        let client: IpAddr = "1.2.3.4".parse().unwrap();
        assert_eq!(peer("10.1.2.3"), client);
        assert_eq!(peer("11.0.0.1"), "11.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(peer("::ffff:10.0.0.1"), client);
        assert!(parse_trusted("10.0.0.0/33").is_err());
        assert!(parse_trusted("nope").is_err());
        assert!(parse_trusted("0.0.0.0/0")
            .unwrap()
            .contains(&"8.8.8.8".parse::<IpAddr>().unwrap()));
    }

    /// X-Forwarded-For counts only from a trusted proxy, and spoofed left-most hops are ignored.
    #[test]
    fn forwarded_for() {
        let proxy: IpAddr = "127.0.0.1".parse().unwrap();
        let trusted = vec![parse_trusted("127.0.0.1").unwrap()];
        let xff = Some("6.6.6.6, 1.2.3.4");
        assert_eq!(client_ip(proxy, xff, &[]), proxy);
        assert_eq!(
            client_ip(proxy, xff, &trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        let stranger: IpAddr = "9.9.9.9".parse().unwrap();
        assert_eq!(client_ip(stranger, xff, &trusted), stranger);
        assert_eq!(client_ip(proxy, Some("garbage"), &trusted), proxy);
    }

    /// Several X-Forwarded-For headers are one list: the client a proxy appended in a second
    /// header is found, not the spoofed first one.
    #[test]
    fn every_forwarded_for_header_counts_in_order() {
        let proxy: IpAddr = "127.0.0.1".parse().unwrap();
        let trusted = vec![parse_trusted("127.0.0.1").unwrap()];
        let headers: [&[u8]; 2] = [b"6.6.6.6", b"1.2.3.4"];
        let joined = join_forwarded_for(headers);
        assert_eq!(joined.as_deref(), Some("6.6.6.6,1.2.3.4"));
        assert_eq!(
            client_ip(proxy, joined.as_deref(), &trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        let through_trusted: [&[u8]; 3] = [b"6.6.6.6", b"1.2.3.4, 127.0.0.1", b" 127.0.0.1"];
        let joined = join_forwarded_for(through_trusted);
        assert_eq!(
            client_ip(proxy, joined.as_deref(), &trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        assert_eq!(join_forwarded_for(std::iter::empty()), None);
        let unreadable: [&[u8]; 2] = [b"1.2.3.4", b"\xff"];
        let joined = join_forwarded_for(unreadable);
        assert_eq!(client_ip(proxy, joined.as_deref(), &trusted), proxy);
    }
}
