//! Members left out for lying. A member that catches another sending what
//! no honest shoal node sends (see `Message::Distrust`) tells every member;
//! each member counts what it hears with the same rule ([`excluded`]), so
//! all leave out the same nodes and agree on the leader without a vote.
//!
//! An accusation is a member's word, not a proof: the rule is built so a
//! liar gains little by accusing. A node accused by more members than any
//! other goes first, and its own accusations stop counting when it goes; a
//! liar caught by two honest members is out whatever it says back, and a
//! liar accusing every honest node is the most accused only if they
//! accused it. What one accusation against one counter-accusation cannot
//! tell apart is settled by node id (documented in the README).

use std::collections::{BTreeMap, BTreeSet};

use super::Membership;

/// Accusations kept at most (members × members is far below it): a member
/// cannot grow this node's memory by accusing.
const ACCUSATIONS_MAX: usize = 4096;

/// The nodes to leave out given `(accuser, accused)` pairs: repeatedly the
/// node with the most distinct accusers still counted (ties: the larger
/// id), until no accusation between nodes still in remains.
pub fn excluded(accusations: &BTreeSet<(String, String)>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    loop {
        let mut accusers: BTreeMap<&str, usize> = BTreeMap::new();
        for (by, of) in accusations {
            if by != of && !out.contains(by) && !out.contains(of) {
                *accusers.entry(of.as_str()).or_default() += 1;
            }
        }
        let Some((worst, _)) = accusers
            .into_iter()
            .max_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(b.0)))
        else {
            return out;
        };
        out.insert(worst.to_string());
    }
}

impl Membership {
    /// Records that `accuser` caught `accused` lying. Accusations about
    /// nodes that are neither members nor this node are not kept (nothing
    /// to leave out, and a member could otherwise fill the table with
    /// made-up ids). Returns the members newly left out: they are no
    /// longer members, and [`Membership::is_excluded`] holds for them.
    pub fn accuse(&mut self, accuser: &str, accused: &str) -> Vec<String> {
        let known = |id: &str| id == self.me.node_id || self.members.contains_key(id);
        if accuser == accused
            || !known(accuser)
            || !known(accused)
            || self.accusations.len() >= ACCUSATIONS_MAX
        {
            return Vec::new();
        }
        let new = self
            .accusations
            .insert((accuser.to_string(), accused.to_string()));
        if !new {
            return Vec::new();
        }
        let now = excluded(&self.accusations);
        let fresh: Vec<String> = now.difference(&self.excluded).cloned().collect();
        for id in &fresh {
            self.members.remove(id);
        }
        self.excluded = now;
        fresh
    }

    /// Whether `id` is left out for lying (it may not join again under this id;
    /// ids are fresh at every start).
    pub fn is_excluded(&self, id: &str) -> bool {
        self.excluded.contains(id)
    }

    /// The nodes this node itself accused (told to members that join later,
    /// so they count the same accusations).
    pub fn my_accusations(&self) -> Vec<String> {
        self.accusations
            .iter()
            .filter(|(by, _)| *by == self.me.node_id)
            .map(|(_, of)| of.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pairs: &[(&str, &str)]) -> BTreeSet<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn ids(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_liar_caught_by_two_is_out_whatever_it_answers() {
        // a and b caught l; l accuses both back.
        let s = set(&[("a", "l"), ("b", "l"), ("l", "a"), ("l", "b")]);
        assert_eq!(excluded(&s), ids(&["l"]));
    }

    #[test]
    fn one_accusation_leaves_out_the_accused_and_self_accusations_count_nothing() {
        assert_eq!(excluded(&set(&[("a", "l")])), ids(&["l"]));
        assert_eq!(excluded(&set(&[("a", "a")])), ids(&[]));
        assert_eq!(excluded(&set(&[])), ids(&[]));
    }

    #[test]
    fn a_liar_accusing_everyone_goes_first_and_its_accusations_with_it() {
        // l accuses a, b, c; only a caught it: l has one accuser, a, b, c
        // one each. Tie on counts: the rule takes the largest id, l ...
        let s = set(&[("l", "a"), ("l", "b"), ("l", "c"), ("a", "l")]);
        let out = excluded(&s);
        // ... and once l is out, its accusations of b and c count no more.
        assert_eq!(out, ids(&["l"]));
        // Whatever the ids, at most one of the pair (a, l) goes plus nothing
        // else: honest nodes not accused by a counted node stay.
        let s = set(&[("z", "a"), ("z", "b"), ("z", "c"), ("a", "z"), ("b", "z")]);
        assert_eq!(excluded(&s), ids(&["z"]));
    }

    #[test]
    fn one_against_one_is_settled_by_id() {
        let s = set(&[("a", "b"), ("b", "a")]);
        assert_eq!(excluded(&s), ids(&["b"]));
    }
}
