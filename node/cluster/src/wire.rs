//! Frames on byte streams: the async shell around `protocol`'s pure codec,
//! for QUIC streams (tokio I/O) and libp2p streams (futures I/O).

use protocol::frame::HEADER_BYTES;
use protocol::limits::FRAME_BYTES_MAX;
use protocol::{DecodeError, EncodeError, Message};

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The stream failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent bytes no valid node sends.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A message could not be encoded (a bug on this side).
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame")]
    Truncated,
}

impl From<WireError> for std::io::Error {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Io(e) => e,
            other => std::io::Error::new(std::io::ErrorKind::InvalidData, other.to_string()),
        }
    }
}

/// Reads one frame from a tokio stream; `Ok(None)` on a clean end of stream.
pub async fn read_frame<R>(r: &mut R, buf: &mut Vec<u8>) -> Result<Option<Message>, WireError>
where
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut header = [0u8; HEADER_BYTES];
    let mut got = 0;
    while got < HEADER_BYTES {
        let n = r.read(&mut header[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(WireError::Truncated)
            };
        }
        got += n;
    }
    let len = body_len(header, FRAME_BYTES_MAX)?;
    buf.clear();
    buf.extend_from_slice(&header);
    // The buffer grows with the bytes that arrive, a piece at a time: a
    // header alone cannot make this node commit the whole announced size.
    while buf.len() < HEADER_BYTES + len {
        let at = buf.len();
        buf.resize((at + READ_PIECE_BYTES).min(HEADER_BYTES + len), 0);
        r.read_exact(&mut buf[at..])
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => WireError::Truncated,
                _ => WireError::Io(e),
            })?;
    }
    finish(buf).map(Some)
}

/// Bytes of a frame's body read (and allocated) at a time.
const READ_PIECE_BYTES: usize = 64 << 10;

/// Largest control-plane request (`Join`, `PlanUpdate`, queries...): they
/// are small, and anyone may send one before proving the key. Answers
/// (weight indexes, chunks) may use the whole frame size.
pub const CONTROL_REQUEST_BYTES_MAX: usize = 1 << 20;

/// Writes one frame to a tokio stream; the bytes written.
pub async fn write_frame<W>(w: &mut W, msg: &Message) -> Result<usize, WireError>
where
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let bytes = protocol::encode(msg)?;
    w.write_all(&bytes).await?;
    Ok(bytes.len())
}

/// Reads one whole frame from a futures stream (libp2p), which must hold exactly one.
/// Frames over `max` bytes are refused before their body is read.
pub async fn read_frame_futures<R>(r: &mut R, max: usize) -> Result<Message, WireError>
where
    R: futures::AsyncRead + Unpin,
{
    use futures::AsyncReadExt;
    let mut header = [0u8; HEADER_BYTES];
    r.read_exact(&mut header)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => WireError::Truncated,
            _ => WireError::Io(e),
        })?;
    let len = body_len(header, max)?;
    let mut buf = header.to_vec();
    while buf.len() < HEADER_BYTES + len {
        let at = buf.len();
        buf.resize((at + READ_PIECE_BYTES).min(HEADER_BYTES + len), 0);
        r.read_exact(&mut buf[at..])
            .await
            .map_err(|_| WireError::Truncated)?;
    }
    finish(&buf)
}

/// Writes one frame to a futures stream (libp2p) and closes it.
pub async fn write_frame_futures<W>(w: &mut W, msg: &Message) -> Result<(), WireError>
where
    W: futures::AsyncWrite + Unpin,
{
    use futures::AsyncWriteExt;
    let bytes = protocol::encode(msg)?;
    w.write_all(&bytes).await?;
    w.close().await?;
    Ok(())
}

fn body_len(header: [u8; HEADER_BYTES], max: usize) -> Result<usize, WireError> {
    let len = u32::from_le_bytes(header) as usize;
    if len > max.min(FRAME_BYTES_MAX) {
        return Err(DecodeError::TooLarge(len).into());
    }
    Ok(len)
}

fn finish(buf: &[u8]) -> Result<Message, WireError> {
    match protocol::decode(buf)? {
        Some((msg, used)) if used == buf.len() => Ok(msg),
        _ => Err(WireError::Truncated),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_header_alone_commits_no_big_buffer_and_requests_are_small() {
        // A 60 MiB frame announced, 10 bytes sent: the read fails without
        // having reserved the 60 MiB.
        let mut bytes = ((60u32 << 20).to_le_bytes()).to_vec();
        bytes.extend([0u8; 10]);
        let mut buf = Vec::new();
        let mut r = &bytes[..];
        assert!(matches!(
            read_frame(&mut r, &mut buf).await,
            Err(WireError::Truncated)
        ));
        assert!(buf.capacity() < 1 << 20, "{}", buf.capacity());
        // A control request over its limit is refused from its header.
        let mut r = futures::io::Cursor::new(((2u32 << 20).to_le_bytes()).to_vec());
        assert!(matches!(
            read_frame_futures(&mut r, CONTROL_REQUEST_BYTES_MAX).await,
            Err(WireError::Decode(_))
        ));
    }

    #[tokio::test]
    async fn frames_round_trip_and_garbage_is_an_error() {
        let msg = Message::Cancel { request_id: 7 };
        let mut bytes = protocol::encode(&msg).unwrap();
        bytes.extend(protocol::encode(&Message::Ack).unwrap());
        let mut r = &bytes[..];
        let mut buf = Vec::new();
        assert_eq!(read_frame(&mut r, &mut buf).await.unwrap(), Some(msg));
        assert_eq!(
            read_frame(&mut r, &mut buf).await.unwrap(),
            Some(Message::Ack)
        );
        assert_eq!(read_frame(&mut r, &mut buf).await.unwrap(), None);
        let garbage = [255u8, 255, 255, 255, 1, 2];
        let mut r = &garbage[..];
        assert!(matches!(
            read_frame(&mut r, &mut buf).await,
            Err(WireError::Decode(DecodeError::TooLarge(_)))
        ));
        let cut = &protocol::encode(&Message::Ack).unwrap()[..3];
        let mut r = cut;
        assert!(matches!(
            read_frame(&mut r, &mut buf).await,
            Err(WireError::Truncated)
        ));
    }
}
