//! Synchronous rtnetlink batches, for ADD's path.
//!
//! The kernel does the work of a link, address, route or rule change inside
//! the `send` itself, so an asynchronous socket gains nothing there; and the
//! async client (netlink-proto) sends one request per wake-up of its task,
//! so requests that could go together cost a round trip each. A batch here
//! is one datagram carrying every message; the kernel takes them in order and
//! answers each (an acknowledgement, an error, or the object asked for).
//!
//! Messages are built with rtnetlink's own builders and types; only the
//! sending is done here, on a plain [`Socket`].

use std::io;

use rtnetlink::packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_REQUEST,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::protocols::NETLINK_ROUTE;
use rtnetlink::sys::{Socket, SocketAddr};

/// One netlink socket, blocking, in the namespace it was opened in.
pub struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

/// What the kernel answered one message of a batch.
pub type Answer = Result<Vec<RouteNetlinkMessage>, io::Error>;

impl Netlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // Errors need not echo the whole request back.
        socket.set_cap_ack(true)?;
        Ok(Self {
            socket,
            seq: 0,
            buf: Vec::with_capacity(64 * 1024),
        })
    }

    /// Sends `messages` (each with its own `NLM_F_*` flags; request and ack
    /// are added) in one datagram and returns each one's answer, in order.
    /// The outer error is a failure of the socket itself.
    pub fn batch(&mut self, messages: Vec<(RouteNetlinkMessage, u16)>) -> io::Result<Vec<Answer>> {
        let first = self.seq.wrapping_add(1);
        let mut out = Vec::new();
        for (inner, flags) in messages {
            self.seq = self.seq.wrapping_add(1);
            let mut header = NetlinkHeader::default();
            header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
            header.sequence_number = self.seq;
            let mut m = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(inner));
            m.finalize();
            let at = out.len();
            out.resize(at + m.buffer_len(), 0);
            m.serialize(&mut out[at..]);
        }
        let count = self.seq.wrapping_sub(first).wrapping_add(1) as usize;
        self.socket.send(&out, 0)?;
        let mut answers: Vec<Option<Answer>> = (0..count).map(|_| None).collect();
        let mut replies: Vec<Vec<RouteNetlinkMessage>> = (0..count).map(|_| vec![]).collect();
        while answers.iter().any(Option::is_none) {
            self.buf.clear();
            self.socket.recv(&mut self.buf, 0)?;
            let mut at = 0;
            while at < self.buf.len() {
                let len = NetlinkBuffer::new_checked(&self.buf[at..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?
                    .length() as usize;
                let msg =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[at..at + len])
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                at += (len + 3) & !3;
                let i = msg.header.sequence_number.wrapping_sub(first) as usize;
                if i >= count {
                    continue; // not ours (a late answer to an earlier batch)
                }
                match msg.payload {
                    NetlinkPayload::Error(e) if e.code.is_some() => {
                        answers[i] = Some(Err(e.to_io()));
                    }
                    NetlinkPayload::Error(_) | NetlinkPayload::Done(_) => {
                        answers[i] = Some(Ok(std::mem::take(&mut replies[i])));
                    }
                    NetlinkPayload::InnerMessage(m) => replies[i].push(m),
                    _ => {}
                }
            }
        }
        Ok(answers.into_iter().flatten().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};

    fn get_link(name: &str) -> RouteNetlinkMessage {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.into()));
        RouteNetlinkMessage::GetLink(m)
    }

    #[test]
    fn each_message_gets_its_own_answer_in_order() {
        let mut nl = Netlink::open().unwrap();
        let answers = nl
            .batch(vec![
                (get_link("lo"), 0),
                (get_link("no-such-link0"), 0),
                (get_link("lo"), 0),
            ])
            .unwrap();
        assert_eq!(answers.len(), 3);
        for i in [0, 2] {
            let got = answers[i].as_ref().unwrap();
            assert!(
                matches!(got.as_slice(), [RouteNetlinkMessage::NewLink(l)] if l.header.index == 1),
                "{got:?}"
            );
        }
        let err = answers[1].as_ref().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(19), "{err}"); // ENODEV
                                                           // The socket stays usable after errors.
        assert!(nl.batch(vec![(get_link("lo"), 0)]).unwrap()[0].is_ok());
    }
}
