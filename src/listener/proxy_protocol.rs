//! The PROXY protocol header (HAProxy's spec, v1 text and v2 binary) a load balancer in
//! front sends at the start of a connection to say which client it relays. [`read_header`]
//! reads exactly that header from a fresh connection and nothing after it, so the bytes
//! that follow (the HTTP request, a TLS ClientHello) are left for whoever reads next.
//!
//! Not for deciding whether a peer may send one (the listener's config does), nor for
//! bounding how long it may take: the caller wraps the read in its own timeout.
//!
//! The header's end is found by [`scan`], a pure function over the bytes seen so far, and
//! the stream is only ever read up to a point `scan` has shown to be inside the header:
//! bytes are peeked, and consumed only once known to be the header's own.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The v1 header's first bytes.
const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest v1 header, CRLF included (spec §2.1).
pub const V1_MAX: usize = 107;
/// The v2 header's first 12 bytes (spec §2.2).
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The v2 header's fixed part: signature, version and command, family, length.
const V2_FIXED: usize = 16;
/// The longest v2 header: its fixed part and the most its 16-bit length can say.
pub const V2_MAX: usize = V2_FIXED + u16::MAX as usize;

/// The protocol version a header was sent in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// The text header (`PROXY TCP4 ...\r\n`).
    V1,
    /// The binary header.
    V2,
}

/// The client a PROXY protocol header names, and the address it connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proxied {
    /// The client's address: the connection's peer as far as the proxy is concerned.
    pub source: SocketAddr,
    /// The address the client connected to (the balancer's front end).
    pub destination: SocketAddr,
}

/// One PROXY protocol header, read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    pub version: Version,
    /// `None` when the header names no client: v1 `UNKNOWN`, v2 `LOCAL` (the balancer's
    /// own health checks), or a v2 family other than TCP over IPv4 / IPv6 (UNIX sockets,
    /// UDP, unspecified). The connection's own endpoints are then the ones to use.
    pub addresses: Option<Proxied>,
}

/// Why a connection's PROXY protocol header was refused. The connection is then to be
/// closed: part of what it sent may have been read.
#[derive(Debug, thiserror::Error)]
pub enum ProxyProtocolError {
    /// The first bytes are neither a v1 nor a v2 header (a client speaking HTTP or TLS
    /// straight away, say).
    #[error("the connection did not start with a PROXY protocol header")]
    NotProxyProtocol,
    /// A header with the right start whose rest breaks the spec.
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    /// A v2 signature with a version other than 2.
    #[error("PROXY protocol version {0} in a binary header; only version 2 is defined")]
    UnsupportedVersion(u8),
    /// The peer closed the connection before the header ended.
    #[error("the connection closed before its PROXY protocol header ended")]
    Eof,
    /// Reading the connection failed.
    #[error("reading the PROXY protocol header failed: {0}")]
    Io(#[from] std::io::Error),
}

impl ProxyProtocolError {
    /// A short reason for a metric label, from a closed set.
    pub fn as_str(&self) -> &'static str {
        match self {
            ProxyProtocolError::NotProxyProtocol => "not_proxy_protocol",
            ProxyProtocolError::Malformed(_) => "malformed",
            ProxyProtocolError::UnsupportedVersion(_) => "unsupported_version",
            ProxyProtocolError::Eof => "eof",
            ProxyProtocolError::Io(_) => "io",
        }
    }
}

/// Reads the PROXY protocol header at the start of `stream`, consuming exactly its bytes.
///
/// Waits as long as the peer takes to send it: the caller bounds the wait. Bytes are
/// peeked, and read only once they are known to belong to the header, so neither a
/// header split over several segments nor one followed by the request in the same
/// segment is a problem, and no read goes past the header.
pub async fn read_header(stream: &mut TcpStream) -> Result<ProxyHeader, ProxyProtocolError> {
    // The header's bytes read so far; `scan` said each of them belongs to it.
    let mut head: Vec<u8> = Vec::with_capacity(V1_MAX);
    let mut peeked = [0u8; V1_MAX];
    loop {
        let room = V1_MAX - head.len();
        let n = stream.peek(&mut peeked[..room]).await?;
        if n == 0 {
            return Err(ProxyProtocolError::Eof);
        }
        let seen_before = head.len();
        head.extend_from_slice(&peeked[..n]);
        match scan(&head)? {
            Scan::Complete(len) => {
                // Everything up to `len` is the header: read it (part of it may still be
                // on its way for a long v2 header), and leave what follows.
                head.truncate(seen_before);
                head.resize(len, 0);
                stream
                    .read_exact(&mut head[seen_before..])
                    .await
                    .map_err(eof_or_io)?;
                return parse(&head);
            }
            Scan::NeedMore => {
                // All seen so far is header: take it off the socket, so the next peek
                // waits for new bytes instead of returning these again.
                head.truncate(seen_before);
                head.resize(seen_before + n, 0);
                stream
                    .read_exact(&mut head[seen_before..])
                    .await
                    .map_err(eof_or_io)?;
            }
        }
    }
}

fn eof_or_io(error: std::io::Error) -> ProxyProtocolError {
    if error.kind() == std::io::ErrorKind::UnexpectedEof {
        ProxyProtocolError::Eof
    } else {
        ProxyProtocolError::Io(error)
    }
}

/// What the first bytes of a connection say about where its header ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// The header is this many bytes long (some of which may not have arrived yet).
    Complete(usize),
    /// Every byte seen belongs to a header not yet complete.
    NeedMore,
}

/// Where the header starting `seen` ends, from its first bytes alone; an error as soon as
/// they cannot start one. Pure: [`read_header`] reads the socket as this says.
pub fn scan(seen: &[u8]) -> Result<Scan, ProxyProtocolError> {
    let starts = |prefix: &[u8]| {
        let n = seen.len().min(prefix.len());
        seen[..n] == prefix[..n]
    };
    if starts(V1_PREFIX) {
        let line = &seen[..seen.len().min(V1_MAX)];
        if let Some(at) = line.windows(2).position(|w| w == b"\r\n") {
            return Ok(Scan::Complete(at + 2));
        }
        if seen.len() >= V1_MAX {
            return Err(ProxyProtocolError::Malformed(
                "no CRLF within the 107 bytes a text header may take",
            ));
        }
        return Ok(Scan::NeedMore);
    }
    if !starts(V2_SIGNATURE) {
        return Err(ProxyProtocolError::NotProxyProtocol);
    }
    if let Some(&version_command) = seen.get(12) {
        check_version_command(version_command)?;
    }
    match seen.get(14..V2_FIXED) {
        Some(len) => Ok(Scan::Complete(
            V2_FIXED + usize::from(u16::from_be_bytes([len[0], len[1]])),
        )),
        None => Ok(Scan::NeedMore),
    }
}

/// The v2 version (high nibble) must be 2, the command (low nibble) LOCAL or PROXY.
fn check_version_command(byte: u8) -> Result<(), ProxyProtocolError> {
    if byte >> 4 != 2 {
        return Err(ProxyProtocolError::UnsupportedVersion(byte >> 4));
    }
    if byte & 0x0f > 1 {
        return Err(ProxyProtocolError::Malformed(
            "the binary header's command is neither LOCAL nor PROXY",
        ));
    }
    Ok(())
}

/// The header in `header`, which is one whole header as [`scan`] delimited it.
pub fn parse(header: &[u8]) -> Result<ProxyHeader, ProxyProtocolError> {
    if header.starts_with(V1_PREFIX) {
        let line = header
            .strip_suffix(b"\r\n")
            .ok_or(ProxyProtocolError::Malformed("the text header has no CRLF"))?;
        return parse_v1(&line[V1_PREFIX.len()..]);
    }
    parse_v2(header)
}

/// The text header after `PROXY `, without its CRLF: `TCP4 src dst sport dport`,
/// `TCP6 ...`, or `UNKNOWN` followed by anything.
fn parse_v1(line: &[u8]) -> Result<ProxyHeader, ProxyProtocolError> {
    let malformed = ProxyProtocolError::Malformed;
    let text = std::str::from_utf8(line).map_err(|_| malformed("the text header is not ASCII"))?;
    let mut fields = text.split(' ');
    let protocol = fields.next().unwrap_or_default();
    if protocol == "UNKNOWN" {
        // The spec has the receiver ignore whatever follows UNKNOWN up to the CRLF.
        return Ok(ProxyHeader {
            version: Version::V1,
            addresses: None,
        });
    }
    let v6 = match protocol {
        "TCP4" => false,
        "TCP6" => true,
        _ => {
            return Err(malformed(
                "the text header's protocol is not TCP4, TCP6 or UNKNOWN",
            ))
        }
    };
    let (Some(src), Some(dst), Some(sport), Some(dport), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(malformed(
            "the text header does not have two addresses and two ports, one space apart",
        ));
    };
    let address = |text: &str| -> Result<IpAddr, ProxyProtocolError> {
        if v6 {
            text.parse::<Ipv6Addr>()
                .map(IpAddr::V6)
                .map_err(|_| malformed("an address of a TCP6 header is not an IPv6 address"))
        } else {
            text.parse::<Ipv4Addr>()
                .map(IpAddr::V4)
                .map_err(|_| malformed("an address of a TCP4 header is not an IPv4 address"))
        }
    };
    Ok(ProxyHeader {
        version: Version::V1,
        addresses: Some(Proxied {
            source: SocketAddr::new(address(src)?, port(sport)?),
            destination: SocketAddr::new(address(dst)?, port(dport)?),
        }),
    })
}

/// A v1 port: decimal 0..=65535, no sign, no leading zero.
fn port(text: &str) -> Result<u16, ProxyProtocolError> {
    let digits = !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit());
    let leading_zero = text.len() > 1 && text.starts_with('0');
    match text.parse::<u16>() {
        Ok(port) if digits && !leading_zero => Ok(port),
        _ => Err(ProxyProtocolError::Malformed(
            "a port of the text header is not a number from 0 to 65535",
        )),
    }
}

/// Address families and transports of the v2 header's 14th byte.
const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 1;
const AF_INET6: u8 = 2;
const AF_UNIX: u8 = 3;
const TRANSPORT_STREAM: u8 = 1;
const TRANSPORT_DGRAM: u8 = 2;

/// A whole v2 header: the fixed 16 bytes, the addresses, then TLVs, which are skipped
/// (the length field alone says where the header ends).
fn parse_v2(header: &[u8]) -> Result<ProxyHeader, ProxyProtocolError> {
    let malformed = ProxyProtocolError::Malformed;
    if header.len() < V2_FIXED || !header.starts_with(V2_SIGNATURE) {
        return Err(ProxyProtocolError::NotProxyProtocol);
    }
    check_version_command(header[12])?;
    let proxy = header[12] & 0x0f == 1;
    let (family, transport) = (header[13] >> 4, header[13] & 0x0f);
    if !matches!(family, AF_UNSPEC | AF_INET | AF_INET6 | AF_UNIX) || transport > TRANSPORT_DGRAM {
        return Err(malformed(
            "the binary header's address family or transport is not one the spec defines",
        ));
    }
    let block = &header[V2_FIXED..];
    let addresses = match (proxy, family, transport) {
        // LOCAL: the balancer's own connection (a health check); whatever addresses it
        // carries are to be ignored.
        (false, _, _) => None,
        (true, AF_INET, TRANSPORT_STREAM) => {
            let b = block.get(..12).ok_or(malformed(
                "the binary header's address block is too short for IPv4",
            ))?;
            let ip = |at: usize| Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3]);
            let port = |at: usize| u16::from_be_bytes([b[at], b[at + 1]]);
            Some(Proxied {
                source: SocketAddr::new(IpAddr::V4(ip(0)), port(8)),
                destination: SocketAddr::new(IpAddr::V4(ip(4)), port(10)),
            })
        }
        (true, AF_INET6, TRANSPORT_STREAM) => {
            let b = block.get(..36).ok_or(malformed(
                "the binary header's address block is too short for IPv6",
            ))?;
            let ip = |at: usize| {
                let octets: [u8; 16] = b[at..at + 16].try_into().expect("16 bytes");
                Ipv6Addr::from(octets)
            };
            let port = |at: usize| u16::from_be_bytes([b[at], b[at + 1]]);
            Some(Proxied {
                source: SocketAddr::new(IpAddr::V6(ip(0)), port(32)),
                destination: SocketAddr::new(IpAddr::V6(ip(16)), port(34)),
            })
        }
        // UNIX sockets, UDP, unspecified: nothing an HTTP connection's peer can be.
        (true, _, _) => None,
    };
    Ok(ProxyHeader {
        version: Version::V2,
        addresses,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    /// Bounds every wait on the loopback connection.
    const WITHIN: Duration = Duration::from_secs(5);

    /// A connected loopback pair: (the balancer's end, the proxy's end).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    /// Sends `pieces` one write at a time, then the request and a shutdown, and reads
    /// the header on the other end; returns it with every byte left after it.
    async fn exchange(pieces: &[&[u8]]) -> (Result<ProxyHeader, ProxyProtocolError>, Vec<u8>) {
        let (mut client, mut server) = pair().await;
        let pieces: Vec<Vec<u8>> = pieces.iter().map(|p| p.to_vec()).collect();
        let writer = tokio::spawn(async move {
            for piece in pieces {
                client.write_all(&piece).await.unwrap();
                client.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
            client.shutdown().await.unwrap();
            client
        });
        let header = tokio::time::timeout(WITHIN, read_header(&mut server))
            .await
            .expect("the header is read or refused in time");
        let mut rest = Vec::new();
        tokio::time::timeout(WITHIN, server.read_to_end(&mut rest))
            .await
            .expect("the rest is read in time")
            .unwrap();
        drop(writer.await.unwrap());
        (header, rest)
    }

    /// The header sent whole, with `REQUEST` in the same write: it parses and the request
    /// is left unread for HTTP.
    async fn read_with_request(header: &[u8]) -> ProxyHeader {
        let (parsed, rest) = exchange(&[&[header, REQUEST].concat()]).await;
        assert_eq!(rest, REQUEST, "the request after the header is left unread");
        parsed.expect("a valid header")
    }

    async fn refused(pieces: &[&[u8]]) -> ProxyProtocolError {
        exchange(pieces).await.0.expect_err("refused")
    }

    fn proxied(source: &str, destination: &str) -> Option<Proxied> {
        Some(Proxied {
            source: source.parse().unwrap(),
            destination: destination.parse().unwrap(),
        })
    }

    fn v2(command: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | command);
        out.push(family);
        out.extend_from_slice(&u16::try_from(block.len()).unwrap().to_be_bytes());
        out.extend_from_slice(block);
        out
    }

    /// An IPv4 address block 192.0.2.10:51000 -> 198.51.100.1:443, then two TLVs
    /// (ALPN "h2" and a NOOP).
    fn v4_block_with_tlvs() -> Vec<u8> {
        let mut block = vec![192, 0, 2, 10, 198, 51, 100, 1];
        block.extend_from_slice(&51000u16.to_be_bytes());
        block.extend_from_slice(&443u16.to_be_bytes());
        block.extend_from_slice(&[0x01, 0, 2, b'h', b'2']);
        block.extend_from_slice(&[0x04, 0, 3, 0, 0, 0]);
        block
    }

    #[tokio::test]
    async fn v1_tcp4_names_the_client_and_leaves_the_request() {
        let header = read_with_request(b"PROXY TCP4 192.0.2.10 198.51.100.1 51000 443\r\n").await;
        assert_eq!(header.version, Version::V1);
        assert_eq!(
            header.addresses,
            proxied("192.0.2.10:51000", "198.51.100.1:443")
        );
    }

    #[tokio::test]
    async fn v1_tcp6_names_the_client() {
        let header = read_with_request(b"PROXY TCP6 2001:db8::1 2001:db8::2 65535 0\r\n").await;
        assert_eq!(
            header.addresses,
            proxied("[2001:db8::1]:65535", "[2001:db8::2]:0")
        );
        // The longest text header there can be still fits the 107 bytes.
        let longest = format!("PROXY TCP6 {0} {0} 65535 65535\r\n", ["ffff"; 8].join(":"));
        let header = read_with_request(longest.as_bytes()).await;
        assert_eq!(
            header.addresses.unwrap().source.ip().to_string(),
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        );
    }

    #[tokio::test]
    async fn v1_unknown_names_no_client() {
        for line in [
            &b"PROXY UNKNOWN\r\n"[..],
            b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
        ] {
            let header = read_with_request(line).await;
            assert_eq!(header.version, Version::V1);
            assert_eq!(header.addresses, None);
        }
    }

    #[tokio::test]
    async fn v2_tcp4_with_tlvs_names_the_client_and_skips_them() {
        let header = read_with_request(&v2(1, 0x11, &v4_block_with_tlvs())).await;
        assert_eq!(header.version, Version::V2);
        assert_eq!(
            header.addresses,
            proxied("192.0.2.10:51000", "198.51.100.1:443")
        );
    }

    #[tokio::test]
    async fn v2_tcp6_names_the_client() {
        let mut block = Vec::new();
        block.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        block.extend_from_slice(&"2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
        block.extend_from_slice(&40000u16.to_be_bytes());
        block.extend_from_slice(&8443u16.to_be_bytes());
        block.extend_from_slice(&[0x02, 0, 4, b'a', b'.', b'e', b'x']);
        let header = read_with_request(&v2(1, 0x21, &block)).await;
        assert_eq!(
            header.addresses,
            proxied("[2001:db8::1]:40000", "[2001:db8::2]:8443")
        );
    }

    #[tokio::test]
    async fn v2_local_unix_and_udp_name_no_client() {
        // LOCAL: a health check from the balancer itself, with or without addresses.
        let local = read_with_request(&v2(0, 0x00, &[])).await;
        assert_eq!((local.version, local.addresses), (Version::V2, None));
        let local = read_with_request(&v2(0, 0x11, &v4_block_with_tlvs())).await;
        assert_eq!(local.addresses, None);
        // AF_UNIX over STREAM: two 108-byte paths, then a TLV.
        let mut unix = vec![0u8; 216];
        unix[..9].copy_from_slice(b"/run/a.sk");
        unix.extend_from_slice(&[0x05, 0, 1, 7]);
        assert_eq!(read_with_request(&v2(1, 0x31, &unix)).await.addresses, None);
        // UDP over IPv4.
        let udp = read_with_request(&v2(1, 0x12, &v4_block_with_tlvs())).await;
        assert_eq!(udp.addresses, None);
    }

    #[tokio::test]
    async fn a_header_split_over_several_writes_is_read_whole() {
        let v1 = b"PROXY TCP4 192.0.2.10 198.51.100.1 51000 443\r\n";
        let v2 = v2(1, 0x11, &v4_block_with_tlvs());
        for header in [&v1[..], &v2[..]] {
            for pieces in [
                vec![&header[..1], &header[1..]],
                vec![&header[..6], &header[6..13], &header[13..]],
                // The CRLF of a text header (the last bytes of a binary one) apart.
                vec![&header[..header.len() - 1], &header[header.len() - 1..]],
                header.chunks(3).collect(),
            ] {
                let mut pieces = pieces;
                pieces.push(REQUEST);
                let (parsed, rest) = exchange(&pieces).await;
                assert_eq!(
                    parsed.unwrap().addresses,
                    proxied("192.0.2.10:51000", "198.51.100.1:443")
                );
                assert_eq!(rest, REQUEST);
            }
        }
    }

    #[tokio::test]
    async fn a_partial_header_is_waited_for() {
        let (mut client, mut server) = pair().await;
        client.write_all(b"PROXY TCP4 192.0.2.10 ").await.unwrap();
        let mut reading = Box::pin(read_header(&mut server));
        let waited = tokio::time::timeout(Duration::from_millis(50), &mut reading).await;
        assert!(waited.is_err(), "no verdict on half a header: {waited:?}");
        client
            .write_all(b"198.51.100.1 51000 443\r\nGET")
            .await
            .unwrap();
        let header = tokio::time::timeout(WITHIN, reading)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            header.addresses,
            proxied("192.0.2.10:51000", "198.51.100.1:443")
        );
    }

    #[tokio::test]
    async fn malformed_text_headers_are_refused() {
        for line in [
            &b"PROXY TCP4 192.0.2.10 198.51.100.1 65536 443\r\n"[..],
            b"PROXY TCP4 192.0.2.10 198.51.100.1 -1 443\r\n",
            b"PROXY TCP4 192.0.2.10 198.51.100.1 0443 443\r\n",
            b"PROXY TCP4 192.0.2.10 198.51.100.1 +80 443\r\n",
            b"PROXY TCP4 192.0.2.10 198.51.100.1 51000\r\n",
            b"PROXY TCP4 192.0.2.10 198.51.100.1 51000 443 1\r\n",
            b"PROXY TCP4 192.0.2.10  198.51.100.1 51000 443\r\n",
            b"PROXY TCP4 192.0.2.300 198.51.100.1 51000 443\r\n",
            b"PROXY TCP4 2001:db8::1 198.51.100.1 51000 443\r\n",
            b"PROXY TCP6 192.0.2.10 2001:db8::2 51000 443\r\n",
            b"PROXY TCP6 [2001:db8::1] 2001:db8::2 51000 443\r\n",
            b"PROXY UDP4 192.0.2.10 198.51.100.1 51000 443\r\n",
            b"PROXY TCP4 192.0.2.10 198.51.100.1 51000 443\n\r\n",
            b"PROXY \r\n",
        ] {
            let error = refused(&[line, REQUEST]).await;
            assert_eq!(
                error.as_str(),
                "malformed",
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[tokio::test]
    async fn a_text_header_without_crlf_in_107_bytes_is_refused() {
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(V1_MAX, b'a');
        long.extend_from_slice(b"\r\n");
        let error = refused(&[&long]).await;
        assert_eq!(error.as_str(), "malformed");
        // A bare LF is no end of line either.
        let error = refused(&[
            &b"PROXY TCP4 192.0.2.10 198.51.100.1 51000 443\n"[..],
            &[b'x'; 64],
        ])
        .await;
        assert_eq!(error.as_str(), "malformed");
        // 106 bytes then CRLF ends at byte 108: one too many.
        let mut over = b"PROXY UNKNOWN ".to_vec();
        over.resize(V1_MAX - 1, b'a');
        over.extend_from_slice(b"\r\n");
        assert_eq!(refused(&[&over]).await.as_str(), "malformed");
        // 105 bytes then CRLF: exactly 107, accepted.
        over.truncate(V1_MAX - 2);
        over.extend_from_slice(b"\r\n");
        assert_eq!(exchange(&[&over]).await.0.unwrap().addresses, None);
    }

    #[tokio::test]
    async fn wrong_binary_signature_version_or_command_is_refused() {
        let good = v2(1, 0x11, &v4_block_with_tlvs());
        let mut signature = good.clone();
        signature[7] = b'X';
        assert_eq!(refused(&[&signature]).await.as_str(), "not_proxy_protocol");
        let mut version = good.clone();
        version[12] = 0x11;
        let error = refused(&[&version]).await;
        assert_eq!(error.as_str(), "unsupported_version");
        assert!(error.to_string().contains("version 1"), "{error}");
        let mut command = good.clone();
        command[12] = 0x22;
        assert_eq!(refused(&[&command]).await.as_str(), "malformed");
        let mut family = good.clone();
        family[13] = 0x41;
        assert_eq!(refused(&[&family]).await.as_str(), "malformed");
        let mut transport = good;
        transport[13] = 0x13;
        assert_eq!(refused(&[&transport]).await.as_str(), "malformed");
    }

    #[tokio::test]
    async fn binary_lengths_short_of_the_addresses_or_the_bytes_are_refused() {
        // A length too short for the IPv4 addresses it announces.
        let short = v2(1, 0x11, &[192, 0, 2, 10, 198, 51, 100, 1]);
        assert_eq!(refused(&[&short]).await.as_str(), "malformed");
        let short = v2(1, 0x21, &[0; 20]);
        assert_eq!(refused(&[&short]).await.as_str(), "malformed");
        // A length longer than what the peer sends before closing.
        let mut truncated = v2(1, 0x11, &v4_block_with_tlvs());
        truncated.truncate(truncated.len() - 2);
        assert_eq!(refused(&[&truncated]).await.as_str(), "eof");
        // The connection ends inside the fixed part.
        assert_eq!(refused(&[&V2_SIGNATURE[..]]).await.as_str(), "eof");
    }

    #[tokio::test]
    async fn plain_http_or_tls_instead_of_a_header_is_refused() {
        for first in [
            REQUEST,
            b"\r\nGET / HTTP/1.1\r\n\r\n",
            &[0x16, 0x03, 0x01, 0x00, 0xa5, 0x01],
            b"PROXYGET / HTTP/1.1\r\n\r\n",
        ] {
            let error = refused(&[first]).await;
            assert_eq!(error.as_str(), "not_proxy_protocol", "{first:?}");
        }
    }

    #[tokio::test]
    async fn a_connection_closed_early_is_eof() {
        assert_eq!(refused(&[]).await.as_str(), "eof");
        assert_eq!(refused(&[b"PROXY TCP4 192.0.2.10"]).await.as_str(), "eof");
        assert_eq!(refused(&[b"PRO"]).await.as_str(), "eof");
    }

    /// The scanner gives the same verdict for every way the first bytes can be cut.
    #[test]
    fn scan_finds_the_end_from_any_prefix() {
        let v1 = b"PROXY TCP4 192.0.2.10 198.51.100.1 51000 443\r\n".to_vec();
        let v2 = v2(1, 0x11, &v4_block_with_tlvs());
        for header in [v1, v2] {
            let whole = [&header[..], REQUEST].concat();
            assert_eq!(scan(&whole).unwrap(), Scan::Complete(header.len()));
            let fixed_end = if header[0] == b'P' { header.len() } else { 16 };
            for cut in 0..fixed_end {
                assert_eq!(
                    scan(&header[..cut]).unwrap(),
                    Scan::NeedMore,
                    "cut at {cut}"
                );
            }
            for cut in fixed_end..=whole.len() {
                assert_eq!(
                    scan(&whole[..cut]).unwrap(),
                    Scan::Complete(header.len()),
                    "cut at {cut}"
                );
            }
        }
    }
}
