//! The request-response codec for both of our protocols: one message per stream, as raw bytes up to a size limit.
//!
//! Decoding (CBOR) happens in the swarm task, not here, so a malformed message is counted and dropped there instead
//! of surfacing as a stream error.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use libp2p::request_response::Codec;
use std::io;

/// Tree messages, CBOR `Envelope`s of the overlay.
pub const OVERLAY_PROTOCOL: StreamProtocol = StreamProtocol::new("/canopy/overlay/1");
/// Admission challenge and proof.
pub const ADMIT_PROTOCOL: StreamProtocol = StreamProtocol::new("/canopy/admit/1");

#[derive(Debug, Clone)]
pub struct BytesCodec {
    max_bytes: u64,
}

impl BytesCodec {
    pub fn new(max_bytes: usize) -> Self {
        Self { max_bytes: max_bytes as u64 }
    }

    async fn read_limited<T: AsyncRead + Unpin + Send>(&self, io: &mut T) -> io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        // One byte more than allowed tells an oversized message apart from one that fits exactly.
        io.take(self.max_bytes + 1).read_to_end(&mut buf).await?;
        if buf.len() as u64 > self.max_bytes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("message exceeds the {}-byte limit", self.max_bytes),
            ));
        }
        Ok(buf)
    }
}

impl Codec for BytesCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        self.read_limited(io).await
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        self.read_limited(io).await
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()> {
        io.write_all(&req).await?;
        io.close().await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()> {
        io.write_all(&res).await?;
        io.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;

    #[tokio::test]
    async fn reads_up_to_the_limit_and_refuses_more() {
        let mut codec = BytesCodec::new(4);
        let mut written = Cursor::new(Vec::new());
        codec.write_request(&OVERLAY_PROTOCOL, &mut written, vec![1, 2, 3, 4]).await.unwrap();
        let mut fits = Cursor::new(written.into_inner());
        assert_eq!(codec.read_request(&OVERLAY_PROTOCOL, &mut fits).await.unwrap(), vec![1, 2, 3, 4]);
        let mut too_big = Cursor::new(vec![0u8; 5]);
        let err = codec.read_response(&OVERLAY_PROTOCOL, &mut too_big).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
