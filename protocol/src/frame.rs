//! Frames: a 4-byte little-endian length, then a bincode-encoded
//! [`Message`]. Decoding is a pure function over a byte buffer, so the
//! transport owns the socket and the buffer and tests need neither.

use crate::limits::FRAME_BYTES_MAX;
use crate::message::Message;

/// Bytes of the length prefix.
pub const HEADER_BYTES: usize = 4;

/// bincode's own allocation bound: no length inside a frame can make the
/// decoder reserve more than a whole frame.
fn config() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<FRAME_BYTES_MAX>,
> {
    bincode::config::standard().with_limit::<FRAME_BYTES_MAX>()
}

/// Decodes a frame body with a memory limit that follows its length.
///
/// bincode reserves a list's memory from its announced length, checked
/// only against the configured limit: with one limit for all frames, a
/// few-byte frame announcing a long list made a node allocate megabytes
/// (found by `tests/tests/fuzz.rs`). Real messages hold at most ~32 bytes
/// of memory per byte on the wire (a 32-byte hash per 32 bytes, a string
/// per length byte), so each size class of body gets 32× its largest size.
fn decode_body(body: &[u8]) -> Result<(Message, usize), bincode::error::DecodeError> {
    macro_rules! limited {
        ($limit:expr) => {
            bincode::serde::decode_from_slice(
                body,
                bincode::config::standard().with_limit::<{ $limit }>(),
            )
        };
    }
    match body.len() {
        0..=2048 => limited!(64 << 10),
        2049..=8192 => limited!(256 << 10),
        8193..=32768 => limited!(1 << 20),
        32769..=131072 => limited!(4 << 20),
        131073..=524288 => limited!(16 << 20),
        _ => limited!(FRAME_BYTES_MAX),
    }
}

/// Why a message could not be framed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The message breaks a limit or invariant.
    #[error("invalid message: {0}")]
    Invalid(#[from] crate::ValidationError),
    /// The encoded message is larger than a frame may be.
    #[error("message of {0} bytes exceeds the {FRAME_BYTES_MAX}-byte frame limit")]
    TooLarge(usize),
    /// bincode failed (should not happen for these types).
    #[error("encoding failed: {0}")]
    Bincode(String),
}

/// Why bytes could not be decoded. The connection that sent them should be closed.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The length prefix announces more than a frame may hold.
    #[error("frame of {0} bytes exceeds the {FRAME_BYTES_MAX}-byte limit")]
    TooLarge(usize),
    /// The body is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The message decoded but breaks a limit or invariant.
    #[error("invalid message: {0}")]
    Invalid(#[from] crate::ValidationError),
}

/// Encodes `msg` as one frame (validated first: a node never sends what it
/// would refuse to receive).
pub fn encode(msg: &Message) -> Result<Vec<u8>, EncodeError> {
    msg.validate().map_err(EncodeError::Invalid)?;
    let body = bincode::serde::encode_to_vec(msg, config())
        .map_err(|e| EncodeError::Bincode(e.to_string()))?;
    if body.len() > FRAME_BYTES_MAX {
        return Err(EncodeError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes the first frame in `buf`: `Ok(Some((message, bytes used)))`,
/// `Ok(None)` when more bytes are needed, or an error for bytes no valid
/// peer sends. Never allocates more than the announced, bounded frame size.
pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, DecodeError> {
    let Some(header) = buf.get(..HEADER_BYTES) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes(header.try_into().expect("4 bytes")) as usize;
    if len > FRAME_BYTES_MAX {
        return Err(DecodeError::TooLarge(len));
    }
    let Some(body) = buf.get(HEADER_BYTES..HEADER_BYTES + len) else {
        return Ok(None);
    };
    let (msg, used) = decode_body(body).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if used != len {
        return Err(DecodeError::Malformed(format!(
            "{} trailing bytes in frame",
            len - used
        )));
    }
    msg.validate().map_err(DecodeError::Invalid)?;
    Ok(Some((msg, HEADER_BYTES + len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::*;
    use proptest::prelude::*;

    fn arb_name() -> impl Strategy<Value = String> {
        "[a-z0-9/.:]{0,40}"
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let hello = (
            any::<u32>(),
            arb_name(),
            arb_name(),
            0..=crate::limits::MEMORY_BYTES_MAX,
            any::<[u8; 32]>(),
            prop::collection::vec(arb_name(), 0..4),
        )
            .prop_map(
                |(version, node_id, cluster, memory_bytes, cert_fingerprint, addrs)| {
                    Message::Hello(Hello {
                        version,
                        node_id,
                        cluster,
                        model_hash: [3; 32],
                        capabilities: Capabilities {
                            device: DeviceKind::Cpu,
                            threads: 2,
                            kernels: "avx2".into(),
                            memory_bytes,
                            us_per_mib: 300.0,
                            row_us_per_mib: 60.0,
                            prompt_row_us_per_mib: 90.0,
                            data_addr: "10.0.0.2:7000".into(),
                            http_addr: "127.0.0.1:8080".into(),
                            cert_fingerprint,
                            addrs,
                            name: "desk-3".into(),
                        },
                    })
                },
            );
        let plan =
            (prop::collection::vec(1u32..8, 1..6), any::<u64>()).prop_map(|(sizes, epoch)| {
                let mut start = 0;
                let stages = sizes
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| {
                        let s = StageAssignment {
                            node_id: format!("node{i}"),
                            layers_start: start,
                            layers_end: start + n,
                        };
                        start += n;
                        s
                    })
                    .collect();
                Message::Plan(Plan {
                    epoch,
                    model_hash: [7; 32],
                    n_layers: start,
                    stages,
                    token_latency_us: 1000.0,
                    throughput_tokens_per_s: 100.0,
                })
            });
        let acts = (
            prop::collection::vec((any::<u64>(), any::<u32>(), 1u32..4), 1..4),
            1u32..16,
            prop::bool::ANY,
        )
            .prop_flat_map(|(seqs, dim, half)| {
                let dtype = if half { DType::F16 } else { DType::F32 };
                let rows: u32 = seqs.iter().map(|s| s.2).sum();
                let bytes = rows as usize * dim as usize * dtype.size();
                prop::collection::vec(any::<u8>(), bytes).prop_map(move |payload| {
                    Message::Activations(Activations {
                        batch: seqs
                            .iter()
                            .map(|&(request_id, position, rows)| SeqRows {
                                request_id,
                                position,
                                rows,
                                sample: rows == 1,
                                draft: 0,
                            })
                            .collect(),
                        dim,
                        dtype,
                        payload,
                        proposals: Vec::new(),
                    })
                })
            });
        let tokens = prop::collection::vec((any::<u64>(), any::<u32>(), any::<u32>()), 0..8)
            .prop_map(|v| {
                Message::Tokens(Tokens {
                    entries: v
                        .into_iter()
                        .map(|(request_id, position, token)| SampledToken {
                            request_id,
                            position,
                            token,
                        })
                        .collect(),
                    logprobs: Vec::new(),
                })
            });
        prop_oneof![
            hello,
            plan,
            acts,
            tokens,
            any::<u64>().prop_map(|request_id| Message::Cancel { request_id }),
            (any::<u32>(), any::<u32>()).prop_map(|(running, queued)| Message::Load(
                crate::LoadReport {
                    tokens_per_s: running as f32 / 3.0,
                    running,
                    queued,
                    sequences: 2,
                    busy: 0.5,
                    epoch: u64::from(running),
                    rss_bytes: 100 << 20,
                    kv_bytes: u64::from(queued),
                }
            )),
            arb_name().prop_map(|reason| Message::Refused { reason }),
            (
                any::<u64>(),
                prop::collection::vec(any::<u32>(), 1..20),
                any::<u64>()
            )
                .prop_map(|(request_id, prompt, seed)| Message::Begin(Begin {
                    request_id,
                    epoch: 3,
                    origin: "n1".into(),
                    context: 4096,
                    sampling: Sampling {
                        temperature: 0.7,
                        top_k: 40,
                        top_p: 0.9,
                        min_p: 0.05,
                        repeat_penalty: 1.1,
                        repeat_last_n: 64,
                        presence_penalty: 0.5,
                        frequency_penalty: -0.25,
                        seed,
                    },
                    prompt_len: 1,
                    constraint: (seed % 2 == 0)
                        .then(|| Constraint::JsonSchema(r#"{"type":"object"}"#.into())),
                    logprobs: (seed % 3 == 0).then_some(5),
                    prompt,
                })),
            (
                any::<u64>(),
                any::<u32>(),
                prop::collection::vec(any::<u32>(), 1..20),
                prop::bool::ANY
            )
                .prop_map(|(request_id, position, tokens, sample)| Message::Input(
                    Input {
                        request_id,
                        position,
                        tokens,
                        sample,
                        draft: 0
                    }
                )),
            (
                arb_name(),
                prop::collection::vec((arb_name(), any::<u32>()), 0..4)
            )
                .prop_map(|(reason, rtts)| {
                    if rtts.is_empty() {
                        Message::Failed {
                            request_id: 9,
                            error: crate::RequestError::Stage {
                                node: "n".into(),
                                why: reason,
                            },
                        }
                    } else {
                        Message::LinkReport {
                            links: rtts
                                .into_iter()
                                .map(|(node_id, rtt_us)| LinkMeasure {
                                    node_id,
                                    rtt_us,
                                    bytes_per_second: f64::from(rtt_us) * 10.0,
                                })
                                .collect(),
                        }
                    }
                }),
            Just(Message::Ack),
            Just(Message::Leaving),
            (arb_name(), arb_name())
                .prop_map(|(node_id, reason)| Message::Distrust { node_id, reason }),
        ]
    }

    proptest! {
        #[test]
        fn every_message_round_trips(msg in arb_message()) {
            let bytes = encode(&msg).unwrap();
            let (back, used) = decode(&bytes).unwrap().unwrap();
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(back, msg);
        }

        #[test]
        fn truncated_frames_ask_for_more(msg in arb_message(), cut in 0usize..1000) {
            let bytes = encode(&msg).unwrap();
            let cut = cut % bytes.len();
            prop_assert_eq!(decode(&bytes[..cut]), Ok(None));
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn corrupted_bodies_are_errors_or_valid(msg in arb_message(), at in any::<usize>(), bit in 0u8..8) {
            let mut bytes = encode(&msg).unwrap();
            let i = HEADER_BYTES + at % (bytes.len() - HEADER_BYTES).max(1);
            if i < bytes.len() {
                bytes[i] ^= 1 << bit;
            }
            if let Ok(Some((m, _))) = decode(&bytes) {
                prop_assert!(m.validate().is_ok());
            }
        }
    }

    #[test]
    fn oversized_length_is_refused_before_reading() {
        let mut bytes = ((FRAME_BYTES_MAX + 1) as u32).to_le_bytes().to_vec();
        bytes.extend([0; 16]);
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::TooLarge(FRAME_BYTES_MAX + 1))
        );
    }

    #[test]
    fn lying_inner_lengths_do_not_allocate() {
        // A Tokens message claiming 2^60 entries inside a 12-byte frame.
        let body = [3u8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F, 0, 0, 0];
        let mut bytes = (body.len() as u32).to_le_bytes().to_vec();
        bytes.extend(body);
        assert!(matches!(decode(&bytes), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn proposals_fit_their_chunk() {
        let input = |rows: usize, draft: u32, sample: bool| {
            Message::Input(Input {
                request_id: 1,
                position: 9,
                tokens: vec![5; rows],
                sample,
                draft,
            })
        };
        // One confirmed token and proposals; proposals only (a chunk that
        // continues one in flight).
        assert!(encode(&input(5, 4, true)).is_ok());
        assert!(encode(&input(4, 4, true)).is_ok());
        assert!(encode(&input(4, 5, true)).is_err());
        assert!(encode(&input(4, 2, false)).is_err());
        let over = crate::limits::DRAFT_TOKENS_MAX as usize + 1;
        assert!(encode(&input(over, over as u32, true)).is_err());
        // Activations carry each sequence's proposals, exactly.
        let acts = |draft: u32, proposals: Vec<u32>| {
            Message::Activations(Activations {
                batch: vec![SeqRows {
                    request_id: 1,
                    position: 9,
                    rows: 3,
                    sample: true,
                    draft,
                }],
                dim: 1,
                dtype: DType::F32,
                payload: vec![0; 12],
                proposals,
            })
        };
        assert!(encode(&acts(2, vec![4, 5])).is_ok());
        assert!(encode(&acts(2, vec![4])).is_err());
        assert!(encode(&acts(0, vec![4])).is_err());
        assert_eq!(crate::draws(1, 0), 1);
        assert_eq!(crate::draws(5, 4), 5);
        assert_eq!(crate::draws(4, 4), 4);
    }

    #[test]
    fn invalid_messages_are_refused_both_ways() {
        let bad_plan = Message::Plan(Plan {
            epoch: 1,
            model_hash: [0; 32],
            n_layers: 10,
            token_latency_us: 0.0,
            throughput_tokens_per_s: 0.0,
            stages: vec![
                StageAssignment {
                    node_id: "a".into(),
                    layers_start: 0,
                    layers_end: 4,
                },
                StageAssignment {
                    node_id: "b".into(),
                    layers_start: 5,
                    layers_end: 10,
                },
            ],
        });
        assert!(matches!(encode(&bad_plan), Err(EncodeError::Invalid(_))));
        let bad_acts = Message::Activations(Activations {
            batch: vec![SeqRows {
                request_id: 1,
                position: 0,
                rows: 2,
                sample: true,
                draft: 0,
            }],
            dim: 4,
            dtype: DType::F32,
            payload: vec![0; 31],
            proposals: Vec::new(),
        });
        let e = encode(&bad_acts).unwrap_err();
        assert!(e.to_string().contains("needs 32"), "{e}");
        // The receiver checks too: hand-encode the bad message.
        let body = bincode::serde::encode_to_vec(&bad_acts, config()).unwrap();
        let mut bytes = (body.len() as u32).to_le_bytes().to_vec();
        bytes.extend(body);
        assert!(matches!(decode(&bytes), Err(DecodeError::Invalid(_))));
    }
}
