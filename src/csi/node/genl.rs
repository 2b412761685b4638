//! A minimal blocking generic-netlink client: what the kernel nbd driver's family needs
//! (resolve a family and its multicast groups, send a request and collect its replies up to the
//! acknowledgement, receive multicast notifications). Messages are built and parsed by hand:
//! a netlink header, a generic-netlink header, then type-length-value attributes.

use rustix::net::netlink::{self, SocketAddrNetlink};
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType};
use std::io;
use std::os::fd::OwnedFd;
use std::time::Duration;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));
const HDR: usize = 16;
const GENL_HDR: usize = 4;

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Attributes being built (each padded to 4 bytes, as netlink wants).
#[derive(Default, Debug, Clone)]
pub struct Attrs(Vec<u8>);

impl Attrs {
    fn put(&mut self, kind: u16, payload: &[u8]) -> &mut Self {
        let len = 4 + payload.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(payload);
        self.0.resize(self.0.len().next_multiple_of(4), 0);
        self
    }

    /// A `u32` attribute.
    pub fn u32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.put(kind, &v.to_ne_bytes())
    }

    /// A `u64` attribute.
    pub fn u64(&mut self, kind: u16, v: u64) -> &mut Self {
        self.put(kind, &v.to_ne_bytes())
    }

    /// A NUL-terminated string attribute.
    pub fn str(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.put(kind, &b)
    }

    /// A nested attribute holding `inner`.
    pub fn nested(&mut self, kind: u16, inner: &Attrs) -> &mut Self {
        self.put(kind | NLA_F_NESTED, &inner.0)
    }
}

/// The attributes of a received message (or of a nested attribute): `(type, payload)`.
pub fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            return None;
        }
        let payload = &b[4..len];
        b = &b[len.next_multiple_of(4).min(b.len())..];
        Some((kind, payload))
    })
}

/// The first attribute of `kind` in `b`.
pub fn attr(b: &[u8], kind: u16) -> Option<&[u8]> {
    attrs(b).find(|(k, _)| *k == kind).map(|(_, p)| p)
}

/// A `u32` payload.
pub fn as_u32(p: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(p.get(..4)?.try_into().ok()?))
}

/// A string payload (up to its NUL).
pub fn as_str(p: &[u8]) -> String {
    let end = p.iter().position(|&c| c == 0).unwrap_or(p.len());
    String::from_utf8_lossy(&p[..end]).into_owned()
}

/// A received generic-netlink message.
#[derive(Debug, Clone)]
pub struct Message {
    /// The generic-netlink command.
    pub cmd: u8,
    /// Its attributes, raw (see [`attrs`]).
    pub attrs: Vec<u8>,
}

/// A resolved family.
#[derive(Debug, Clone)]
pub struct Family {
    /// The family's message type.
    pub id: u16,
    /// Its multicast groups: `(name, id)`.
    pub groups: Vec<(String, u32)>,
}

/// A generic-netlink socket.
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    /// Opens a socket; `groups` is the legacy multicast bitmask to join (bit `n - 1` for group
    /// `n`, which covers group ids up to 32), 0 for none.
    pub fn open(groups: u32) -> io::Result<Self> {
        let fd = rustix::net::socket(
            AddressFamily::NETLINK,
            SocketType::RAW,
            Some(netlink::GENERIC),
        )?;
        rustix::net::bind(&fd, &SocketAddrNetlink::new(0, groups))?;
        Ok(Self { fd, seq: 1 })
    }

    /// Makes [`Socket::recv`] give up after `t` (`None`: wait forever).
    pub fn set_recv_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        rustix::net::sockopt::set_socket_timeout(&self.fd, rustix::net::sockopt::Timeout::Recv, t)?;
        Ok(())
    }

    /// Resolves the family called `name`.
    pub fn family(&mut self, name: &str) -> io::Result<Family> {
        let mut a = Attrs::default();
        a.str(CTRL_ATTR_FAMILY_NAME, name);
        let replies = self.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, &a)?;
        let m = replies
            .first()
            .ok_or_else(|| bad(format!("no reply resolving the {name} family")))?;
        let id = attr(&m.attrs, CTRL_ATTR_FAMILY_ID)
            .and_then(|p| Some(u16::from_ne_bytes(p.get(..2)?.try_into().ok()?)))
            .ok_or_else(|| bad(format!("the {name} family has no id")))?;
        let groups = attr(&m.attrs, CTRL_ATTR_MCAST_GROUPS)
            .map(|g| {
                attrs(g)
                    .filter_map(|(_, item)| {
                        let name = as_str(attr(item, CTRL_ATTR_MCAST_GRP_NAME)?);
                        let id = as_u32(attr(item, CTRL_ATTR_MCAST_GRP_ID)?)?;
                        Some((name, id))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Family { id, groups })
    }

    /// Sends `cmd` of `family` with `attrs` and returns the replies that came before the
    /// kernel's acknowledgement; a refusal is the kernel's errno.
    pub fn request(
        &mut self,
        family: u16,
        cmd: u8,
        version: u8,
        attrs: &Attrs,
    ) -> io::Result<Vec<Message>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let len = HDR + GENL_HDR + attrs.0.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&family.to_ne_bytes());
        msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(&[cmd, version, 0, 0]);
        msg.extend_from_slice(&attrs.0);
        rustix::net::sendto(
            &self.fd,
            &msg,
            SendFlags::empty(),
            &SocketAddrNetlink::new(0, 0),
        )?;
        let mut replies = Vec::new();
        loop {
            for (kind, s, body) in self.recv_raw()? {
                if s != seq {
                    continue;
                }
                match kind {
                    NLMSG_ERROR => {
                        let err = body
                            .get(..4)
                            .map(|b| i32::from_ne_bytes(b.try_into().unwrap_or_default()))
                            .ok_or_else(|| bad("short netlink error message"))?;
                        return if err == 0 {
                            Ok(replies)
                        } else {
                            Err(io::Error::from_raw_os_error(-err))
                        };
                    }
                    NLMSG_DONE => return Ok(replies),
                    _ => replies.push(genl_message(&body)?),
                }
            }
        }
    }

    /// The next generic-netlink message (a multicast notification on a socket that joined a
    /// group); `Ok(None)` when the receive timeout passed first.
    pub fn recv(&mut self) -> io::Result<Option<Message>> {
        match self.recv_raw() {
            Ok(msgs) => {
                for (kind, _, body) in msgs {
                    if kind != NLMSG_ERROR && kind != NLMSG_DONE {
                        return genl_message(&body).map(Some);
                    }
                }
                Ok(None)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// One datagram, split into its netlink messages: `(type, seq, body after the header)`.
    fn recv_raw(&mut self) -> io::Result<Vec<(u16, u32, Vec<u8>)>> {
        let mut buf = vec![0u8; 64 * 1024];
        let (n, _) = rustix::net::recv(&self.fd, &mut buf[..], RecvFlags::empty())?;
        let mut b = &buf[..n.min(buf.len())];
        let mut out = Vec::new();
        while b.len() >= HDR {
            let len = u32::from_ne_bytes(b[..4].try_into().unwrap_or_default()) as usize;
            if len < HDR || len > b.len() {
                return Err(bad("truncated netlink message"));
            }
            let kind = u16::from_ne_bytes([b[4], b[5]]);
            let seq = u32::from_ne_bytes(b[8..12].try_into().unwrap_or_default());
            out.push((kind, seq, b[HDR..len].to_vec()));
            b = &b[len.next_multiple_of(4).min(b.len())..];
        }
        Ok(out)
    }
}

fn genl_message(body: &[u8]) -> io::Result<Message> {
    if body.len() < GENL_HDR {
        return Err(bad("short generic netlink message"));
    }
    Ok(Message {
        cmd: body[0],
        attrs: body[GENL_HDR..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_with_padding_and_nesting() {
        let mut inner = Attrs::default();
        inner.u32(1, 7);
        let mut a = Attrs::default();
        a.u32(1, 42)
            .u64(2, 1 << 40)
            .str(10, "abc")
            .nested(7, &inner);
        assert_eq!(a.0.len() % 4, 0);
        let got: Vec<_> = attrs(&a.0).map(|(k, p)| (k, p.to_vec())).collect();
        assert_eq!(got.len(), 4);
        assert_eq!(as_u32(attr(&a.0, 1).unwrap()), Some(42));
        assert_eq!(
            u64::from_ne_bytes(attr(&a.0, 2).unwrap().try_into().unwrap()),
            1 << 40
        );
        assert_eq!(as_str(attr(&a.0, 10).unwrap()), "abc");
        let nested = attr(&a.0, 7).unwrap();
        assert_eq!(as_u32(attr(nested, 1).unwrap()), Some(7));
    }

    #[test]
    fn damaged_attributes_end_the_walk_instead_of_panicking() {
        for b in [
            &[0xff, 0xff, 1, 0][..],
            &[2, 0, 1, 0],
            &[8, 0, 1, 0, 1],
            &[],
        ] {
            assert!(attrs(b).count() <= 1);
        }
    }

    /// Resolving the control family itself works wherever generic netlink exists (always on
    /// Linux), so the request/acknowledge path is exercised without the nbd module.
    #[test]
    fn resolves_the_control_family() {
        let mut s = Socket::open(0).expect("a generic netlink socket");
        let f = s.family("nlctrl").expect("nlctrl resolves");
        assert_eq!(f.id, GENL_ID_CTRL);
        assert!(f.groups.iter().any(|(n, _)| n == "notify"), "{f:?}");
        // ENOENT on Linux (EINVAL in some sandboxes): a refusal either way, not a reply.
        let e = s.family("no-such-family-here").unwrap_err();
        assert!(e.raw_os_error().is_some(), "{e}");
    }
}
