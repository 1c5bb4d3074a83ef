//! Per-partition contact state: the shard a partition task owns and the HTTP API reads.
//!
//! A shard is a `DashMap` so readers (the query API) can look contacts up while the owning task
//! writes; the owning task is its only writer. Never hold a guard across an `.await`
//! (dashmap #74, #369): take what you need and drop it.

use dashmap::DashMap;

pub mod codec;

use crate::domain::{ContactKey, ContactState};

/// The hasher of shard maps: foldhash with a fixed seed, so iteration order (and so the order
/// of timer outputs before they are sorted) does not change from run to run. Keys are contact
/// ids issued by the company's own systems, not attacker-chosen, so a fixed seed is acceptable.
pub type ShardHasher = foldhash::fast::FixedState;

/// One partition's contacts.
///
/// States are boxed: a hash table keeps up to half its slots empty (power-of-two sizing, 7/8
/// load), so a slot holding a 40-byte key and pointer instead of the whole state saves more
/// than the allocation costs (measured: `examples/state_memory.rs`, README "Performance").
pub type Shard = DashMap<ContactKey, Box<ContactState>, ShardHasher>;

/// An empty shard with room for `capacity` contacts before it grows.
pub fn new_shard(capacity: usize) -> Shard {
    // One inner map per shard of the DashMap: a single writer gains nothing from more, and
    // fewer inner maps waste less memory on rounding each up to a power of two.
    DashMap::with_capacity_and_hasher_and_shard_amount(capacity, ShardHasher::with_seed(0x6c69_6665_6379_636c), 4)
}
