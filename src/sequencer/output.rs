//! The decision buffer and its priority drain (contract R4).
//!
//! Decisions are appended in the order the sequencer makes them. A drain emits them
//! stable-sorted by *contact priority*, highest first: a contact's priority in a drain is the
//! highest `dispatch_priority` among the intents of its decisions in that drain (`i32::MIN` if
//! none, e.g. only a release). Every decision of one contact has the same key, so a stable sort
//! can never reorder decisions within a contact; it only lets urgent contacts' ready work out
//! before other contacts' work decided in the same drain. Partition decisions (pause/resume)
//! come last. Decisions about invalid intents form a group of their own.

use super::contact::NO_GROUP;
use super::decision::Decision;

const PARTITION: u32 = u32::MAX;

struct Group {
    /// Slab position of the contact, to clear its group mark at drain.
    contact: Option<u32>,
    priority: i32,
}

pub(crate) struct Output<T> {
    /// `Option` only so a drain can move decisions out in sorted order without moving them
    /// during the sort (they are large); `None` never stays in the buffer.
    decisions: Vec<Option<Decision<T>>>,
    /// Group of each decision, or [`PARTITION`].
    tags: Vec<u32>,
    groups: Vec<Group>,
    /// Reused sort buffer: `(key << 32) | position` per decision.
    order: Vec<u64>,
}

impl<T> Output<T> {
    pub fn new() -> Self {
        Output {
            decisions: Vec::new(),
            tags: Vec::new(),
            groups: Vec::new(),
            order: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.decisions.is_empty()
    }

    pub fn len(&self) -> usize {
        self.decisions.len()
    }

    /// Appends a decision about contact `contact`, whose group mark is `group`.
    pub fn push_contact(
        &mut self,
        group: &mut u32,
        contact: u32,
        priority: Option<i32>,
        decision: Decision<T>,
    ) {
        let priority = priority.unwrap_or(i32::MIN);
        let g = match self.groups.get_mut(*group as usize) {
            Some(existing) if *group != NO_GROUP => {
                existing.priority = existing.priority.max(priority);
                *group
            }
            _ => self.new_group(Some(contact), priority),
        };
        *group = g;
        self.tags.push(g);
        self.decisions.push(Some(decision));
    }

    /// Appends a decision about an intent that belongs to no contact (invalid input).
    pub fn push_loose(&mut self, priority: i32, decision: Decision<T>) {
        let g = self.new_group(None, priority);
        self.tags.push(g);
        self.decisions.push(Some(decision));
    }

    pub fn push_partition(&mut self, decision: Decision<T>) {
        self.tags.push(PARTITION);
        self.decisions.push(Some(decision));
    }

    fn new_group(&mut self, contact: Option<u32>, priority: i32) -> u32 {
        // Groups never outnumber decisions, and a u32-sized buffer is far beyond any batch;
        // saturating keeps the drain correct (merged into one group) if it ever were.
        let g = u32::try_from(self.groups.len())
            .unwrap_or(PARTITION - 1)
            .min(PARTITION - 1);
        self.groups.push(Group { contact, priority });
        g
    }

    /// Sort key, ascending = drain order: higher priority first, partition decisions last.
    fn key(&self, tag: u32) -> u32 {
        match self.groups.get(tag as usize) {
            // Order-preserving i32 -> u32, then inverted so higher priorities sort first.
            Some(g) if tag != PARTITION => !((g.priority as u32) ^ 0x8000_0000),
            _ => u32::MAX,
        }
    }

    /// Moves every decision to `out` in drain order; `clear_group` is called with the slab
    /// position of each contact that had decisions, so its group mark can be reset.
    pub fn drain_into(&mut self, out: &mut Vec<Decision<T>>, mut clear_group: impl FnMut(u32)) {
        out.reserve(self.decisions.len());
        let sorted = self
            .tags
            .windows(2)
            .all(|w| self.key(w[0]) <= self.key(w[1]));
        if sorted {
            out.extend(self.decisions.drain(..).flatten());
        } else {
            // Sorting (key, position) pairs is a stable sort of the decisions by key.
            let mut order = std::mem::take(&mut self.order);
            order.clear();
            order.extend(
                self.tags
                    .iter()
                    .enumerate()
                    .map(|(i, &t)| (u64::from(self.key(t)) << 32) | i as u64),
            );
            order.sort_unstable();
            for &packed in &order {
                let position = (packed & u64::from(u32::MAX)) as usize;
                if let Some(decision) = self.decisions.get_mut(position).and_then(Option::take) {
                    out.push(decision);
                }
            }
            self.decisions.clear();
            self.order = order;
        }
        self.tags.clear();
        for g in self.groups.drain(..) {
            if let Some(c) = g.contact {
                clear_group(c);
            }
        }
    }
}
