//! Which input offset may be committed (pure).
//!
//! A record is finished when everything it caused is acknowledged by the broker. Records finish
//! out of order (the reorder buffer holds some back while later ones go through), so the offset
//! to store for a topic-partition is the first record not yet finished, or one past the last
//! record received when all are. Storing it means a restart re-reads exactly the records whose
//! effects might not have reached the broker.

use std::collections::VecDeque;

use crate::state::codec::Processed;

/// The open records of one input topic-partition.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    /// Received and not yet popped: (offset, finished), in offset order.
    open: VecDeque<(i64, bool)>,
    /// One past the highest offset received.
    next: Option<i64>,
    /// Offsets the restored checkpoint had processed above its position
    /// ([`OffsetTracker::resume`]).
    restored_above: Vec<i64>,
}

impl OffsetTracker {
    /// A tracker for a partition whose state was restored at `processed`: reading resumes at
    /// its position, and until records are read again it reports `processed` itself. Starting
    /// empty instead would leave a topic that gets no new record out of the next checkpoints,
    /// and a later owner would fall back to the group's committed offset, which may be behind
    /// the state (a crash before the commit, an expired offset): those inputs would count twice.
    pub fn resume(processed: &Processed) -> OffsetTracker {
        OffsetTracker {
            open: VecDeque::new(),
            next: processed.position,
            restored_above: processed.above.clone(),
        }
    }

    /// Notes a record as received (offsets arrive in increasing order per partition).
    pub fn received(&mut self, offset: i64) {
        debug_assert!(self.next.is_none_or(|next| offset >= next));
        self.open.push_back((offset, false));
        self.next = Some(offset + 1);
    }

    /// Notes a record as finished.
    pub fn finished(&mut self, offset: i64) {
        if let Ok(index) = self.open.binary_search_by_key(&offset, |(open, _)| *open) {
            self.open[index].1 = true;
        }
        while self.open.front().is_some_and(|(_, done)| *done) {
            self.open.pop_front();
        }
    }

    /// The offset to store: the next record a restarted consumer must read. `None` before the
    /// first record.
    pub fn position(&self) -> Option<i64> {
        self.open.front().map(|(offset, _)| *offset).or(self.next)
    }

    /// What is processed, for a changelog checkpoint: the position and the finished records
    /// above it, the restored ones included until the position passes them (read again, they
    /// are skipped, but may not be finished yet).
    pub fn processed(&self) -> Processed {
        let position = self.position();
        let mut above: Vec<i64> = self
            .open
            .iter()
            .filter(|(_, done)| *done)
            .map(|(offset, _)| *offset)
            .collect();
        if !self.restored_above.is_empty() {
            let unpassed = |offset: &&i64| position.is_none_or(|position| **offset >= position);
            above.extend(self.restored_above.iter().filter(unpassed));
            above.sort_unstable();
            above.dedup();
        }
        Processed { position, above }
    }

    /// Records received and not finished.
    pub fn pending(&self) -> usize {
        self.open.iter().filter(|(_, done)| !done).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_position_waits_for_the_first_unfinished_record() {
        let mut tracker = OffsetTracker::default();
        assert_eq!(tracker.position(), None);
        for offset in [10, 11, 12, 15] {
            tracker.received(offset);
        }
        assert_eq!(tracker.position(), Some(10));
        tracker.finished(11);
        tracker.finished(15);
        assert_eq!(tracker.position(), Some(10), "10 is still open");
        assert_eq!(
            tracker.processed(),
            Processed {
                position: Some(10),
                above: vec![11, 15]
            }
        );
        tracker.finished(10);
        assert_eq!(tracker.position(), Some(12));
        tracker.finished(12);
        assert_eq!(tracker.position(), Some(16), "all finished: one past the last");
        assert_eq!(tracker.pending(), 0);
    }

    #[test]
    fn a_resumed_tracker_keeps_what_the_restored_checkpoint_processed() {
        let restored = Processed {
            position: Some(20),
            above: vec![22, 25],
        };
        let mut tracker = OffsetTracker::resume(&restored);
        assert_eq!(tracker.processed(), restored, "nothing read again yet");
        // Read again from the position; 22 is skipped (finished at once), 20 and 21 are not
        // finished yet.
        for offset in 20..=23 {
            tracker.received(offset);
        }
        tracker.finished(22);
        assert_eq!(
            tracker.processed(),
            Processed {
                position: Some(20),
                above: vec![22, 25]
            }
        );
        for offset in [20, 21, 23] {
            tracker.finished(offset);
        }
        assert_eq!(
            tracker.processed(),
            Processed {
                position: Some(24),
                above: vec![25]
            },
            "25 not read again yet"
        );
        tracker.received(24);
        tracker.received(25);
        tracker.finished(25);
        tracker.finished(24);
        assert_eq!(
            tracker.processed(),
            Processed {
                position: Some(26),
                above: vec![]
            }
        );
        assert_eq!(
            OffsetTracker::resume(&Processed::default()).processed(),
            Processed::default()
        );
    }

    proptest! {
        /// Whatever the restored checkpoint processed stays processed while its records are
        /// read again (a processed one finishes at once, as the task skips it) and the rest
        /// finish in any order; once all are finished, everything read is.
        #[test]
        fn a_resumed_tracker_never_forgets_a_restored_offset(
            position in 0i64..20,
            restored_above in prop::collection::btree_set(0i64..40, 0..10),
            order in prop::collection::vec(any::<prop::sample::Index>(), 0..40),
        ) {
            let restored = Processed {
                position: Some(position),
                above: restored_above.into_iter().filter(|offset| *offset > position).collect(),
            };
            let mut tracker = OffsetTracker::resume(&restored);
            let mut unfinished = Vec::new();
            for offset in position..40 {
                tracker.received(offset);
                if restored.contains(offset) {
                    tracker.finished(offset);
                } else {
                    unfinished.push(offset);
                }
                for earlier in 0..40 {
                    if restored.contains(earlier) {
                        prop_assert!(tracker.processed().contains(earlier), "{} forgotten", earlier);
                    }
                }
            }
            for index in order {
                if unfinished.is_empty() {
                    break;
                }
                let offset = unfinished.remove(index.index(unfinished.len()));
                tracker.finished(offset);
                let processed = tracker.processed();
                for offset in 0..40 {
                    prop_assert_eq!(processed.contains(offset), !unfinished.contains(&offset));
                }
            }
        }

        #[test]
        fn the_position_is_the_smallest_unfinished_offset(
            gaps in prop::collection::vec(1i64..4, 1..60),
            order in prop::collection::vec(any::<prop::sample::Index>(), 0..60),
        ) {
            let mut offsets = Vec::new();
            let mut offset = 0;
            for gap in gaps {
                offset += gap;
                offsets.push(offset);
            }
            let mut tracker = OffsetTracker::default();
            for offset in &offsets {
                tracker.received(*offset);
            }
            let mut unfinished = offsets.clone();
            for index in order {
                if unfinished.is_empty() {
                    break;
                }
                let offset = unfinished.remove(index.index(unfinished.len()));
                tracker.finished(offset);
                let expected = unfinished.iter().min().copied().unwrap_or(offsets[offsets.len() - 1] + 1);
                prop_assert_eq!(tracker.position(), Some(expected));
                // Exactly the finished records count as processed.
                let processed = tracker.processed();
                for offset in &offsets {
                    prop_assert_eq!(processed.contains(*offset), !unfinished.contains(offset));
                }
            }
        }
    }
}
