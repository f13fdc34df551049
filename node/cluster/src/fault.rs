//! Fault injection for the tests: a member that holds the key and lies.
//! `SHOAL_FAULT_LIE` lists what this node does wrong (comma separated):
//!
//! - `tokens`: as a stage other than the last, sends the origin of each
//!   request it begins a token of its own;
//! - `hijack`: sends the next stage a second `Begin` under each request's
//!   id, naming itself the origin;
//! - `dims`: sends activations one element wider than the model's;
//! - `nan`: sends activations with a NaN;
//! - `plan`: as the leader, plans layers the model does not have.
//!
//! A lying node also claims to be four times faster than it measured and
//! picks the smallest of many node ids, so the planner gives it layers and
//! it leads (a liar would): the tests need it in the plan, where the lies
//! land. Nothing here runs unless the variable is set.

use std::sync::OnceLock;

/// The lies this node tells.
#[derive(Debug, Default)]
pub(crate) struct Lies {
    pub tokens: bool,
    pub hijack: bool,
    pub dims: bool,
    pub nan: bool,
    pub plan: bool,
}

impl Lies {
    /// Whether it tells any.
    pub fn any(&self) -> bool {
        self.tokens || self.hijack || self.dims || self.nan || self.plan
    }
}

/// The lies of `SHOAL_FAULT_LIE`, read once.
pub(crate) fn lies() -> &'static Lies {
    static LIES: OnceLock<Lies> = OnceLock::new();
    LIES.get_or_init(|| {
        let v = std::env::var("SHOAL_FAULT_LIE").unwrap_or_default();
        let has = |k: &str| v.split(',').any(|x| x.trim() == k);
        Lies {
            tokens: has("tokens"),
            hijack: has("hijack"),
            dims: has("dims"),
            nan: has("nan"),
            plan: has("plan"),
        }
    })
}

/// The node's identity: a lying node takes the smallest id of many tries.
pub(crate) fn keypair() -> libp2p::identity::Keypair {
    let fresh = libp2p::identity::Keypair::generate_ed25519;
    if !lies().any() {
        return fresh();
    }
    (0..512)
        .map(|_| fresh())
        .min_by_key(|k| k.public().to_peer_id().to_string())
        .expect("at least one")
}
