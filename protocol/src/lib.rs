//! shoal's wire protocol: every message between nodes, how it is framed,
//! and the limits a receiver enforces.
//!
//! # Layout
//! - [`message`]: the messages (joins, plans, load and link reports,
//!   weights, requests, activations, tokens, cancel, failures).
//! - [`validate`]: the checks a receiver runs on each ([`ValidationError`]).
//! - [`error`]: [`RequestError`], why a request failed, from the stage
//!   that fails to the client.
//! - [`frame`]: length-prefixed bincode frames; [`frame::decode`] is a pure
//!   function over bytes answering "a message", "need more bytes" or "invalid".
//! - [`limits`]: the hard bounds, each with the reason for its value.
//!
//! Architecture Invariant: this crate does no I/O and holds no state. The
//! node's transport owns sockets and buffers and calls these functions; tests
//! and the simulator call them with plain bytes.

pub mod error;
pub mod frame;
pub mod limits;
pub mod message;
pub mod validate;

pub use error::RequestError;
pub use validate::ValidationError;

pub use frame::{decode, encode, DecodeError, EncodeError};
pub use message::{
    draws, Activations, Begin, Capabilities, Constraint, DType, DeviceKind, Hello, Input, Join,
    LinkMeasure, LoadReport, MemberAddrs, Message, Plan, SampledToken, Sampling, SealedHello,
    SeqRows, StageAssignment, TokenLogprobs, Tokens, WeightIndex, Welcome, PROTOCOL_VERSION,
};
