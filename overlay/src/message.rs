//! Wire messages between overlay nodes: serde types encoded as CBOR (ciborium), versioned, size-limited.

use crate::id::NodeId;
use serde::{Deserialize, Serialize};

/// Bumped on every incompatible change; a node drops envelopes with another version (and counts them).
pub const PROTOCOL_VERSION: u16 = 1;

/// Largest encoded envelope we accept or produce.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// What travels on the wire. `id` is unique per sender, so a receiver drops duplicates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub version: u16,
    pub id: u64,
    pub from: NodeId,
    pub body: Message,
}

/// The protocol's messages. (Filled in by the overlay core; see `node`.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    Ping,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("message of {0} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("protocol version {0} is not supported (this node speaks {PROTOCOL_VERSION})")]
    Version(u16),
    #[error("malformed message: {0}")]
    Malformed(String),
}

impl Envelope {
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(128);
        ciborium::into_writer(self, &mut buf).expect("writing CBOR into a Vec cannot fail");
        buf
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(DecodeError::TooLarge(bytes.len()));
        }
        let env: Envelope = ciborium::from_reader(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        if env.version != PROTOCOL_VERSION {
            return Err(DecodeError::Version(env.version));
        }
        Ok(env)
    }
}
