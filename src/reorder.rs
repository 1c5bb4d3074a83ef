//! Event-time reordering in front of the processor (pure).
//!
//! The three input topics of one partition reach the service interleaved in whatever order the
//! broker delivers them, and producers deliver a little out of order themselves. The lifecycle
//! engine's output depends on the order it sees a contact's events in, so to give the same
//! answers as a replay of the same events, events pass through a buffer that holds each one
//! until the highest event time seen is `window` past it, then releases them in a canonical
//! order: (event time, source, event id). Any interleaving of the same events whose delays stay
//! within the window comes out identically. An event later than that is released at once and
//! reaches the engine as a late event (see `lifecycle`'s grace period).
//!
//! No clock: the edge flushes the buffer when a partition goes idle or at the end of input.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use crate::domain::{Input, Timestamp};

/// An event with its canonical sort key, and what the caller tagged it with.
#[derive(Debug)]
struct Pending<T>(Input, T);

impl<T> Pending<T> {
    fn key(&self) -> (Timestamp, usize, &str) {
        self.0.sort_key()
    }
}

impl<T> PartialEq for Pending<T> {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl<T> Eq for Pending<T> {}

impl<T> PartialOrd for Pending<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<T> Ord for Pending<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key().cmp(&other.key())
    }
}

/// Holds events until they can be released in canonical order. Each event travels with a tag
/// of the caller's (the service tags events with the input record they came from).
#[derive(Debug)]
pub struct ReorderBuffer<T = ()> {
    window_millis: i64,
    pending: BinaryHeap<Reverse<Pending<T>>>,
    /// Highest event time pushed so far.
    high_water: Timestamp,
}

impl<T> ReorderBuffer<T> {
    /// A buffer that waits until the event time seen is `window_millis` past an event.
    pub fn new(window_millis: i64) -> Self {
        ReorderBuffer {
            window_millis: window_millis.max(0),
            pending: BinaryHeap::new(),
            high_water: Timestamp::MIN_VALID,
        }
    }

    /// Events held.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Adds an event and moves every event now ready onto `ready`, in canonical order.
    pub fn push(&mut self, event: Input, tag: T, ready: &mut Vec<(Input, T)>) {
        self.high_water = self.high_water.max(event.occurred_at());
        self.pending.push(Reverse(Pending(event, tag)));
        self.release_through(self.high_water.plus_millis(-self.window_millis), ready);
    }

    /// The window, in milliseconds.
    pub fn window_millis(&self) -> i64 {
        self.window_millis
    }

    /// Releases, in canonical order, every event that happened at or before `at` (a caught-up
    /// partition: the wall clock stands in for the event time no later input will undercut).
    pub fn release_through(&mut self, at: Timestamp, ready: &mut Vec<(Input, T)>) {
        while self
            .pending
            .peek()
            .is_some_and(|Reverse(next)| next.0.occurred_at() <= at)
        {
            if let Some(Reverse(Pending(event, tag))) = self.pending.pop() {
                ready.push((event, tag));
            }
        }
    }

    /// Releases everything held, in canonical order (end of input, or an idle partition).
    pub fn flush(&mut self, ready: &mut Vec<(Input, T)>) {
        while let Some(Reverse(Pending(event, tag))) = self.pending.pop() {
            ready.push((event, tag));
        }
    }

    /// The tags of the events held, in no particular order.
    pub fn tags(&self) -> impl Iterator<Item = &T> {
        self.pending.iter().map(|Reverse(pending)| &pending.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::format_timestamp;
    use crate::codec::json::decode_event;
    use proptest::prelude::*;

    fn event(index: usize, millis: i64, source: usize) -> Input {
        let at = format_timestamp(Timestamp::from_millis(1_700_000_000_000 + millis));
        let line = match source % 3 {
            0 => format!(
                r#"{{"source":"clickstream","event_id":"e{index}","contact_id":"c","occurred_at":"{at}","type":"page_view"}}"#
            ),
            1 => format!(
                r#"{{"source":"ad_conversion","event_id":"e{index}","contact_id":"c","occurred_at":"{at}","platform":"meta","event_name":"Lead"}}"#
            ),
            _ => format!(
                r#"{{"source":"purchase","event_id":"e{index}","contact_id":"c","occurred_at":"{at}","order_id":"o{index}","amount":1,"currency":"EUR","status":"completed"}}"#
            ),
        };
        Input::Event(decode_event(line.as_bytes()).unwrap())
    }

    fn run(window: i64, events: Vec<Input>) -> Vec<String> {
        let mut buffer = ReorderBuffer::new(window);
        let mut ready = Vec::new();
        for event in events {
            buffer.push(event, (), &mut ready);
        }
        buffer.flush(&mut ready);
        ready.iter().map(|(event, ())| event.sort_key().2.to_owned()).collect()
    }

    proptest! {
        #[test]
        fn any_interleaving_within_the_window_comes_out_the_same(
            times in prop::collection::vec((0i64..100_000, 0usize..3), 1..80),
            delays in prop::collection::vec(0i64..5_000, 80),
        ) {
            let events: Vec<(usize, i64, usize)> = times.iter().enumerate().map(|(index, (at, source))| (index, *at, *source)).collect();
            // Canonical: sorted by time (then source and id).
            let mut sorted = events.clone();
            sorted.sort_by_key(|(index, at, source)| (*at, *source, format!("e{index}")));
            let expected = run(5_000, sorted.iter().map(|(index, at, source)| event(*index, *at, *source)).collect());
            // Arrival order: each event delayed by up to the window.
            let mut arrivals = events.clone();
            arrivals.sort_by_key(|(index, at, _)| (at + delays[*index], *index));
            let got = run(5_000, arrivals.iter().map(|(index, at, source)| event(*index, *at, *source)).collect());
            prop_assert_eq!(got, expected);
        }

        #[test]
        fn nothing_is_lost_or_duplicated_whatever_the_delays(
            times in prop::collection::vec(0i64..100_000, 1..80),
            window in 0i64..10_000,
        ) {
            let events: Vec<Input> = times.iter().enumerate().map(|(index, at)| event(index, *at, index)).collect();
            let mut got = run(window, events);
            got.sort();
            let mut expected: Vec<String> = (0..times.len()).map(|index| format!("e{index}")).collect();
            expected.sort();
            prop_assert_eq!(got, expected);
        }
    }

    #[test]
    fn events_wait_for_the_window_then_leave_in_time_order() {
        let mut buffer = ReorderBuffer::new(1_000);
        let mut ready = Vec::new();
        buffer.push(event(0, 500, 0), 0, &mut ready);
        buffer.push(event(1, 100, 2), 1, &mut ready);
        assert!(ready.is_empty());
        buffer.push(event(2, 1_200, 0), 2, &mut ready);
        let ids: Vec<(&str, i32)> = ready.iter().map(|(event, tag)| (event.sort_key().2, *tag)).collect();
        assert_eq!(ids, [("e1", 1)], "only what the window has passed, with its tag");
        assert_eq!(buffer.len(), 2);
        ready.clear();
        buffer.release_through(Timestamp::from_millis(1_700_000_000_600), &mut ready);
        let ids: Vec<&str> = ready.iter().map(|(event, _)| event.sort_key().2).collect();
        assert_eq!(ids, ["e0"], "what happened by then, nothing later");
    }
}
