//! Rendezvous (highest-random-weight) hashing: each member gets a pseudo-random weight per
//! key, and the heaviest member owns the key. Every node that knows the same members picks
//! the same owner without talking to anyone, and a member joining or leaving only moves the
//! keys it wins or owned.

use sha2::{Digest as _, Sha256};

/// The weight of `member` (its id) for `key`: the first 8 bytes of SHA-256 over both.
pub fn weight(member: &str, key: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(member.as_bytes());
    h.update([0u8]);
    h.update(key.as_bytes());
    let out = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&out[..8]);
    u64::from_be_bytes(first)
}

/// `members` ranked for `key`, owner first, then the backups in order. `id` gives a
/// member's identity; ties (practically impossible) are broken by the id.
pub fn rank<T>(key: &str, members: Vec<T>, id: impl Fn(&T) -> String) -> Vec<T> {
    let mut weighed: Vec<(u64, String, T)> = members
        .into_iter()
        .map(|m| {
            let i = id(&m);
            (weight(&i, key), i, m)
        })
        .collect();
    weighed.sort_by(|(wa, ia, _), (wb, ib, _)| wb.cmp(wa).then_with(|| ia.cmp(ib)));
    weighed.into_iter().map(|(_, _, m)| m).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("node-{i}")).collect()
    }

    #[test]
    fn every_node_agrees_whatever_the_order() {
        let members = ids(10);
        let mut reversed = members.clone();
        reversed.reverse();
        for k in 0..50 {
            let key = format!("sha256:{k}");
            let a = rank(&key, members.clone(), String::clone);
            let b = rank(&key, reversed.clone(), String::clone);
            assert_eq!(a, b);
        }
    }

    #[test]
    fn owners_spread_over_the_members() {
        let members = ids(5);
        let mut owned: HashMap<String, usize> = HashMap::new();
        for k in 0..1000 {
            let owner = rank(&format!("sha256:{k}"), members.clone(), String::clone).remove(0);
            *owned.entry(owner).or_default() += 1;
        }
        assert_eq!(owned.len(), 5);
        assert!(owned.values().all(|&n| n > 120), "{owned:?}");
    }

    #[test]
    fn a_leaving_member_moves_only_its_own_keys() {
        let members = ids(8);
        let gone = "node-3".to_owned();
        let rest: Vec<String> = members.iter().filter(|m| **m != gone).cloned().collect();
        for k in 0..500 {
            let key = format!("k{k}");
            let before = rank(&key, members.clone(), String::clone);
            let after = rank(&key, rest.clone(), String::clone);
            if before[0] != gone {
                assert_eq!(before[0], after[0], "{key}");
            } else {
                // The backup takes over.
                assert_eq!(before[1], after[0], "{key}");
            }
        }
    }
}
