//! Per-contact state and the contact table.
//!
//! Memory is the point here: a partition may hold millions of idle contacts, so the idle
//! record is one 64-byte cache line (inline key, three counters, one nullable box for the rare
//! held/waiting state), records live in a slab, and the hash index stores only `u32` slab
//! positions. See `idle_contact_is_one_cache_line` and the bench for the measured cost.

use std::hash::BuildHasher;

use compact_str::CompactString;
use hashbrown::{DefaultHashBuilder, HashTable};

use super::decision::HoldReason;
use super::intent::{Intent, Millis};

/// `Contact::group` when the contact has no decision in the output buffer.
pub(crate) const NO_GROUP: u32 = u32::MAX;

/// Aligned so a lookup touches exactly one cache line.
#[repr(align(64))]
pub(crate) struct Contact<T> {
    /// Inline up to 24 bytes, so typical ids cost no allocation.
    pub id: CompactString,
    /// Resolved high-water mark: every sequence `<= resolved` is committed, blocked or skipped
    /// (resolutions only ever happen at `resolved + 1`, so a single mark describes them all).
    pub resolved: u64,
    /// Committed effects so far; a commit makes it `version + 1`.
    pub version: u64,
    /// Next sequence to assign: one above everything resolved or reserved.
    pub next: u64,
    /// Hold and waiting intents, boxed together: most contacts have neither, and only those
    /// that do pay for them.
    rare: Option<Box<Rare<T>>>,
    /// Index of this contact's group in the output buffer, [`NO_GROUP`] if none.
    pub group: u32,
    /// Touched since the last `take_dirty`.
    pub dirty: bool,
}

impl<T> Contact<T> {
    fn new(id: &str) -> Self {
        Contact {
            id: CompactString::new(id),
            resolved: 0,
            version: 0,
            next: 1,
            rare: None,
            group: NO_GROUP,
            dirty: false,
        }
    }

    pub fn waiting_len(&self) -> usize {
        self.pending().map_or(0, |p| p.waiting.len())
    }

    pub fn waiting(&self, seq: u64) -> Option<&Waiting<T>> {
        self.pending().and_then(|p| p.get(seq))
    }

    pub fn hold(&self) -> Option<&Hold> {
        self.rare.as_ref().and_then(|r| r.hold.as_ref())
    }

    pub fn pending(&self) -> Option<&Pending<T>> {
        self.rare.as_ref().and_then(|r| r.pending.as_ref())
    }

    pub fn pending_mut(&mut self) -> Option<&mut Pending<T>> {
        self.rare.as_mut().and_then(|r| r.pending.as_mut())
    }

    pub fn set_hold(&mut self, hold: Hold) {
        self.rare_mut().hold = Some(hold);
    }

    pub fn set_pending(&mut self, pending: Pending<T>) {
        self.rare_mut().pending = Some(pending);
    }

    /// The waiting list, created by `make` if the contact has none.
    pub fn pending_or_insert_with(&mut self, make: impl FnOnce() -> Pending<T>) -> &mut Pending<T> {
        self.rare_mut().pending.get_or_insert_with(make)
    }

    pub fn take_hold(&mut self) -> Option<Hold> {
        let hold = self.rare.as_mut().and_then(|r| r.hold.take());
        self.tidy();
        hold
    }

    pub fn take_pending(&mut self) -> Option<Pending<T>> {
        let pending = self.rare.as_mut().and_then(|r| r.pending.take());
        self.tidy();
        pending
    }

    fn rare_mut(&mut self) -> &mut Rare<T> {
        self.rare.get_or_insert_with(|| {
            Box::new(Rare {
                hold: None,
                pending: None,
            })
        })
    }

    /// Frees the box once it holds nothing, so an idle contact is back to its flat record.
    fn tidy(&mut self) {
        if self
            .rare
            .as_ref()
            .is_some_and(|r| r.hold.is_none() && r.pending.is_none())
        {
            self.rare = None;
        }
    }
}

struct Rare<T> {
    hold: Option<Hold>,
    pending: Option<Pending<T>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Hold {
    pub since: Millis,
    pub reason: HoldReason,
}

pub(crate) struct Pending<T> {
    /// When the current stall began: when the first intent started waiting, reset whenever
    /// the contact makes progress while intents still wait.
    pub gap_since: Millis,
    /// Sorted by `seq`, all above `resolved + 1`, never empty (dropped instead).
    pub waiting: Vec<Waiting<T>>,
}

impl<T> Pending<T> {
    pub fn get(&self, seq: u64) -> Option<&Waiting<T>> {
        self.waiting
            .binary_search_by_key(&seq, |w| w.seq)
            .ok()
            .and_then(|i| self.waiting.get(i))
    }
}

pub(crate) struct Waiting<T> {
    pub seq: u64,
    /// When this intent started waiting.
    pub since: Millis,
    pub intent: Intent<T>,
}

/// Slab positions handed out by this table are always in range (contacts are never removed),
/// so indexing by them is an invariant, not an input-dependent check.
impl<T> std::ops::Index<u32> for ContactTable<T> {
    type Output = Contact<T>;
    fn index(&self, idx: u32) -> &Contact<T> {
        &self.slab[idx as usize]
    }
}

impl<T> std::ops::IndexMut<u32> for ContactTable<T> {
    fn index_mut(&mut self, idx: u32) -> &mut Contact<T> {
        &mut self.slab[idx as usize]
    }
}

/// Slab of contacts plus a hash index of slab positions keyed by contact id.
pub(crate) struct ContactTable<T> {
    slab: Vec<Contact<T>>,
    index: HashTable<u32>,
    hasher: DefaultHashBuilder,
}

impl<T> ContactTable<T> {
    pub fn new() -> Self {
        ContactTable {
            slab: Vec::new(),
            index: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.slab.len()
    }

    pub fn find(&self, id: &str) -> Option<u32> {
        let hash = self.hasher.hash_one(id);
        let slab = &self.slab;
        self.index
            .find(hash, |&i| slab.get(i as usize).is_some_and(|c| c.id == id))
            .copied()
    }

    /// The contact's slot, created idle if new; `None` only when `u32` slots ran out.
    pub fn find_or_insert(&mut self, id: &str) -> Option<u32> {
        if let Some(i) = self.find(id) {
            return Some(i);
        }
        let idx = u32::try_from(self.slab.len())
            .ok()
            .filter(|&i| i != NO_GROUP)?;
        self.slab.push(Contact::new(id));
        let Self {
            slab,
            index,
            hasher,
        } = self;
        index.insert_unique(hasher.hash_one(id), idx, |&i| {
            slab.get(i as usize)
                .map_or(0, |c| hasher.hash_one(c.id.as_str()))
        });
        Some(idx)
    }

    pub fn get(&self, idx: u32) -> Option<&Contact<T>> {
        self.slab.get(idx as usize)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Contact<T>> {
        self.slab.iter()
    }

    /// Grows the table for `additional` more contacts (used by bulk restore).
    pub fn reserve(&mut self, additional: usize) {
        self.slab.reserve(additional);
        let Self {
            slab,
            index,
            hasher,
        } = self;
        index.reserve(additional, |&i| {
            slab.get(i as usize)
                .map_or(0, |c| hasher.hash_one(c.id.as_str()))
        });
    }
}
