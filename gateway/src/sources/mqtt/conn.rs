//! One MQTT 3.1.1 connection, read and written separately.
//!
//! rumqttc's `EventLoop` reads and writes in the same `poll`: a subscriber that stops
//! polling to hold back the broker also stops its own acknowledgements. With a broker
//! backlog and late (after-commit) acks that deadlocks — the source waits for acks to go
//! out, the acks wait for the next poll. Here the socket's halves are independent: the
//! source stops *reading* while too many messages wait for their commit (TCP then holds
//! the broker back), and acknowledgements are always written. rumqttc still does the
//! packet encoding and decoding (`rumqttc::mqttbytes`).

use std::time::Duration;

use bytes::{Buf, BytesMut};
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
use rumqttc::mqttbytes::{self, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Bytes asked for per socket read; the most a paused reader can hold beyond its limit.
const READ_CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the broker closed the connection")]
    Closed,
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("the broker refused the connection: {0:?}")]
    Refused(ConnectReturnCode),
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl From<mqttbytes::Error> for ConnError {
    fn from(e: mqttbytes::Error) -> Self {
        ConnError::Protocol(e.to_string())
    }
}

/// What the broker sent.
#[derive(Debug)]
pub(crate) enum Incoming {
    Packet(Packet),
    /// A PUBLISH larger than the configured limit. Its bytes were skipped; it still has
    /// to be acknowledged, or the broker re-sends it forever and nothing behind it moves.
    Oversized {
        topic: String,
        qos: QoS,
        pkid: u16,
        len: usize,
    },
}

/// The fixed header: packet type and flags, its own length, the remaining length.
/// `None` until enough bytes are buffered.
fn fixed_header(buf: &[u8]) -> Result<Option<(u8, usize, usize)>, ConnError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let mut len = 0usize;
    for (i, b) in buf[1..].iter().take(4).enumerate() {
        len |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((buf[0], 2 + i, len)));
        }
    }
    if buf.len() >= 5 {
        return Err(ConnError::Protocol("malformed remaining length".into()));
    }
    Ok(None)
}

/// Splits MQTT packets out of a byte stream, skipping over PUBLISHes above `max_publish`
/// without buffering them.
#[derive(Debug)]
pub(crate) struct Decoder {
    max_publish: usize,
    /// Bytes of an oversized PUBLISH still to be thrown away.
    skip: usize,
}

impl Decoder {
    pub(crate) fn new(max_publish: usize) -> Self {
        Self {
            max_publish,
            skip: 0,
        }
    }

    /// The next complete packet in `buf`, consuming its bytes; `None` if more are needed.
    pub(crate) fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Incoming>, ConnError> {
        if self.skip > 0 {
            let n = self.skip.min(buf.len());
            buf.advance(n);
            self.skip -= n;
            if self.skip > 0 {
                return Ok(None);
            }
        }
        let Some((byte1, header_len, remaining)) = fixed_header(buf)? else {
            return Ok(None);
        };
        if remaining <= self.max_publish {
            return match Packet::read(buf, usize::MAX) {
                Ok(p) => Ok(Some(Incoming::Packet(p))),
                Err(mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
                Err(e) => Err(e.into()),
            };
        }
        if byte1 >> 4 != 3 {
            return Err(ConnError::Protocol(format!(
                "a packet of type {} with {remaining} bytes, larger than the limit",
                byte1 >> 4
            )));
        }
        // PUBLISH: topic length, topic, packet id (QoS 1 and 2).
        let qos = match (byte1 >> 1) & 3 {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            2 => QoS::ExactlyOnce,
            q => return Err(ConnError::Protocol(format!("PUBLISH with QoS {q}"))),
        };
        let v = &buf[header_len..];
        if v.len() < 2 {
            return Ok(None);
        }
        let topic_len = u16::from_be_bytes([v[0], v[1]]) as usize;
        let id_len = if qos == QoS::AtMostOnce { 0 } else { 2 };
        if 2 + topic_len + id_len > remaining {
            // The topic would run into the next packet's bytes.
            return Err(ConnError::Protocol(format!(
                "a PUBLISH of {remaining} bytes whose topic is {topic_len} bytes long"
            )));
        }
        if v.len() < 2 + topic_len + id_len {
            return Ok(None);
        }
        let topic = String::from_utf8_lossy(&v[2..2 + topic_len]).into_owned();
        let pkid = if id_len == 2 {
            u16::from_be_bytes([v[2 + topic_len], v[3 + topic_len]])
        } else {
            0
        };
        let frame = header_len + remaining;
        let n = frame.min(buf.len());
        buf.advance(n);
        self.skip = frame - n;
        Ok(Some(Incoming::Oversized {
            topic,
            qos,
            pkid,
            len: remaining,
        }))
    }
}

pub(crate) struct Conn {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    rbuf: BytesMut,
    wbuf: BytesMut,
    decoder: Decoder,
    io_timeout: Duration,
}

impl Conn {
    /// Connects, sends CONNECT and waits for the CONNACK. Returns the connection and
    /// whether the broker still had our session.
    pub(crate) async fn connect(
        addr: (&str, u16),
        connect: mqttbytes::v4::Connect,
        max_publish: usize,
        io_timeout: Duration,
    ) -> Result<(Conn, bool), ConnError> {
        let stream = tokio::time::timeout(io_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ConnError::Timeout(io_timeout))??;
        stream.set_nodelay(true)?;
        let (rd, wr) = stream.into_split();
        let mut conn = Conn {
            rd,
            wr,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::with_capacity(4096),
            decoder: Decoder::new(max_publish),
            io_timeout,
        };
        conn.send(Packet::Connect(connect))?;
        conn.flush().await?;
        let ack = tokio::time::timeout(io_timeout, async {
            loop {
                if let Some(incoming) = conn.next_incoming()? {
                    return Ok::<_, ConnError>(incoming);
                }
                conn.fill().await?;
            }
        })
        .await
        .map_err(|_| ConnError::Timeout(io_timeout))??;
        match ack {
            Incoming::Packet(Packet::ConnAck(a)) if a.code == ConnectReturnCode::Success => {
                Ok((conn, a.session_present))
            }
            Incoming::Packet(Packet::ConnAck(a)) => Err(ConnError::Refused(a.code)),
            other => Err(ConnError::Protocol(format!(
                "expected CONNACK, got {other:?}"
            ))),
        }
    }

    /// Queues a packet; [`Conn::flush`] writes it.
    pub(crate) fn send(&mut self, packet: Packet) -> Result<(), ConnError> {
        packet.write(&mut self.wbuf, usize::MAX)?;
        Ok(())
    }

    /// Writes everything queued.
    pub(crate) async fn flush(&mut self) -> Result<(), ConnError> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        tokio::time::timeout(self.io_timeout, self.wr.write_all(&self.wbuf))
            .await
            .map_err(|_| ConnError::Timeout(self.io_timeout))??;
        self.wbuf.clear();
        Ok(())
    }

    /// Reads more bytes from the broker. Cancel safe: nothing is lost if the future is
    /// dropped before it completes.
    pub(crate) async fn fill(&mut self) -> Result<(), ConnError> {
        self.rbuf.reserve(READ_CHUNK);
        match self.rd.read_buf(&mut self.rbuf).await? {
            0 => Err(ConnError::Closed),
            _ => Ok(()),
        }
    }

    /// The next packet already read, if a whole one is buffered.
    pub(crate) fn next_incoming(&mut self) -> Result<Option<Incoming>, ConnError> {
        self.decoder.next(&mut self.rbuf)
    }

    /// Sends DISCONNECT and closes the connection.
    pub(crate) async fn disconnect(mut self) {
        if self.send(Packet::Disconnect).is_ok() && self.flush().await.is_ok() {
            let _ = self.wr.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::v4::{PingResp, PubAck, Publish};

    fn encode(packets: &[Packet]) -> BytesMut {
        let mut b = BytesMut::new();
        for p in packets {
            p.write(&mut b, usize::MAX).unwrap();
        }
        b
    }

    fn publish(topic: &str, len: usize, qos: QoS, pkid: u16) -> Packet {
        let mut p = Publish::new(topic, qos, vec![7u8; len]);
        p.pkid = pkid;
        Packet::Publish(p)
    }

    #[test]
    fn splits_packets_and_waits_for_the_rest() {
        let all = encode(&[
            publish("a/b", 10, QoS::AtLeastOnce, 1),
            Packet::PubAck(PubAck::new(3)),
            Packet::PingResp,
        ]);
        // Fed one byte at a time, the same three packets come out.
        let mut d = Decoder::new(1024);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for byte in all.iter() {
            buf.extend_from_slice(&[*byte]);
            while let Some(i) = d.next(&mut buf).unwrap() {
                out.push(i);
            }
        }
        assert_eq!(out.len(), 3);
        assert!(
            matches!(&out[0], Incoming::Packet(Packet::Publish(p)) if p.topic == "a/b" && p.pkid == 1 && p.payload.len() == 10)
        );
        assert!(matches!(&out[2], Incoming::Packet(Packet::PingResp)));
        assert!(buf.is_empty());
        let _ = PingResp;
    }

    #[test]
    fn oversized_publish_is_skipped_and_reported_with_its_packet_id() {
        let all = encode(&[
            publish("big/one", 5000, QoS::ExactlyOnce, 42),
            publish("small", 3, QoS::AtLeastOnce, 43),
        ]);
        for chunk in [1usize, 7, 100, 4096, all.len()] {
            let mut d = Decoder::new(1000);
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            for piece in all.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some(i) = d.next(&mut buf).unwrap() {
                    out.push(i);
                }
                assert!(
                    buf.len() <= chunk + 1024,
                    "the skipped payload is not buffered"
                );
            }
            assert_eq!(out.len(), 2, "chunk {chunk}");
            match &out[0] {
                Incoming::Oversized {
                    topic,
                    qos,
                    pkid,
                    len,
                } => {
                    assert_eq!(
                        (topic.as_str(), *qos, *pkid),
                        ("big/one", QoS::ExactlyOnce, 42)
                    );
                    assert!(*len > 5000);
                }
                other => panic!("{other:?}"),
            }
            assert!(
                matches!(&out[1], Incoming::Packet(Packet::Publish(p)) if p.topic == "small" && p.pkid == 43)
            );
        }
    }

    #[test]
    fn malformed_length_is_an_error_not_a_hang() {
        let mut buf = BytesMut::from(&[0x30u8, 0xff, 0xff, 0xff, 0xff, 0x01][..]);
        assert!(Decoder::new(10).next(&mut buf).is_err());
    }

    #[test]
    fn oversized_publish_whose_topic_overruns_it_is_an_error() {
        // PUBLISH QoS 1, remaining length 20 (over the limit of 10), topic length 30: the
        // topic would be read from the next packet's bytes.
        let mut bytes = vec![0x32u8, 20, 0, 30];
        bytes.extend_from_slice(&[b'a'; 60]);
        let mut buf = BytesMut::from(&bytes[..]);
        let err = Decoder::new(10).next(&mut buf).unwrap_err();
        assert!(err.to_string().contains("topic is 30 bytes"), "{err}");
    }
}
