//! Writeback-error sequence counters: Linux's `errseq_t`, so `fsync` and `syncfs` on the union
//! report an upper-layer writeback error exactly as ext4 would.
//!
//! Owns: the 32-bit word that records "an error happened, which one, and has anyone reported
//! it yet", and the per-handle [`Cursor`] that remembers how far one reader has got.
//! Must never: report one error twice through the same cursor, lose an error that no cursor
//! has reported yet, or block (everything is a single atomic word; no locks).
//!
//! # The word
//!
//! One `AtomicU32`, split like the kernel's:
//!
//! | bits | meaning |
//! |---|---|
//! | 0..=11 | the latest errno (1..=4095, the kernel's `MAX_ERRNO`); 0 only before any error |
//! | 12 | SEEN: some reader has had the latest error reported to it |
//! | 13..=31 | a counter, bumped when a new error arrives after the previous one was seen |
//!
//! A new error that arrives while the previous one is still unseen only replaces the errno:
//! nobody has looked yet, so both errors are reported once, as the newer errno. The counter
//! wraps after 2^19 seen-then-failed rounds; a cursor that sleeps through exactly that many
//! rounds would miss one report, which the kernel accepts too.
//!
//! # Two cursors per FUSE handle
//!
//! ovlfuse keeps one [`ErrSeq`] per open upper file (what `fsync`/`fdatasync` report) and one
//! for the whole mount (what `syncfs` reports). Each FUSE file handle holds one [`Cursor`] on
//! each, sampled with [`ErrSeq::sample`] at open; `fsync` calls
//! [`ErrSeq::check_and_advance`] on the file's word with the handle's fsync cursor, `syncfs`
//! does the same on the mount's word with the handle's syncfs cursor. The two are independent:
//! an error reported by `fsync` is still reported once by `syncfs`, and the reverse.
//!
//! # The rule (ext4's, measured)
//!
//! Fd A was opened before an error, fd B after it but before anyone reported it, fd C after an
//! `fsync` had reported it.
//!
//! | situation | what the next `fsync` returns |
//! |---|---|
//! | A, error happened after open | the error, once; then success |
//! | B, error still unseen when B was opened | the error, once (B's cursor is "before anything") |
//! | C, error already reported to someone when C was opened | success |
//! | A, B or C, a new error after any of them reported the old one | the new error, once each |
//! | several errors before anyone checked | one report, carrying the latest errno |
//! | `dup()`ed fds | share one FUSE handle, so one cursor: only one of them gets the error |
//! | `close` | never reports (the kernel's `flush` does not consume the cursor) |

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};

/// Largest errno the word can hold (the kernel's `MAX_ERRNO`); also the errno mask.
pub const MAX_ERRNO: i32 = 4095;

const ERRNO_MASK: u32 = MAX_ERRNO as u32;
const SEEN: u32 = ERRNO_MASK + 1;
const COUNTER_ONE: u32 = SEEN << 1;

/// One error-sequence word. Shared between threads by reference (`&ErrSeq` is all every
/// method needs).
#[derive(Default)]
pub struct ErrSeq {
    word: AtomicU32,
}

/// How far one reader has got: a sampled value of an [`ErrSeq`] word. `Cursor::default()`
/// means "sampled before anything happened", so it will see the first error.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Cursor(u32);

impl fmt::Debug for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cursor({})", Word(self.0))
    }
}

impl fmt::Debug for ErrSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ErrSeq({})", Word(self.word.load(Ordering::Acquire)))
    }
}

/// Formats a raw word as `counter/errno[+seen]` for debug output.
struct Word(u32);

impl fmt::Display for Word {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let seen = if self.0 & SEEN != 0 { "+seen" } else { "" };
        write!(
            f,
            "{}/{}{}",
            self.0 / COUNTER_ONE,
            self.0 & ERRNO_MASK,
            seen
        )
    }
}

/// The errno to store for `errno`: itself when it is 1..=MAX_ERRNO, EIO otherwise (and a
/// debug assertion, since a caller passing 0 or a negative value has a bug).
fn storable(errno: i32) -> u32 {
    if (1..=MAX_ERRNO).contains(&errno) {
        errno as u32
    } else {
        debug_assert!(false, "errseq: errno {errno} is not in 1..={MAX_ERRNO}");
        log::warn!("errseq: recording out-of-range errno {errno} as EIO");
        libc::EIO as u32
    }
}

impl ErrSeq {
    /// A word on which nothing has happened yet.
    pub const fn new() -> Self {
        ErrSeq {
            word: AtomicU32::new(0),
        }
    }

    /// Records a writeback error. If the previous error was already reported to someone (or
    /// there was none), the counter moves on so every cursor sees a change; if it is still
    /// unseen, only the errno is replaced and the two errors count as one.
    pub fn set(&self, errno: i32) {
        let errno = storable(errno);
        let mut old = self.word.load(Ordering::Acquire);
        loop {
            let mut new = (old & !(ERRNO_MASK | SEEN)) | errno;
            if old & SEEN != 0 || old & ERRNO_MASK == 0 {
                new = new.wrapping_add(COUNTER_ONE);
            }
            if new == old {
                return;
            }
            match self
                .word
                .compare_exchange_weak(old, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(current) => old = current,
            }
        }
    }

    /// The cursor a new opener starts from. An error nobody has been told about yet stays
    /// visible to the new opener (the cursor is "before anything"); an error already reported
    /// to someone is not reported to it.
    pub fn sample(&self) -> Cursor {
        let word = self.word.load(Ordering::Acquire);
        if word & SEEN == 0 {
            Cursor(0)
        } else {
            Cursor(word)
        }
    }

    /// The errno to report if anything happened since `cursor`, without consuming it.
    pub fn check(&self, cursor: &Cursor) -> Option<i32> {
        let word = self.word.load(Ordering::Acquire);
        if word == cursor.0 {
            None
        } else {
            Some((word & ERRNO_MASK) as i32)
        }
    }

    /// Reports the latest error if anything happened since `cursor`, marks it seen and moves
    /// `cursor` past it, so this cursor reports it only once. Safe to call concurrently with
    /// `set` and with other cursors: if an error is recorded between the read and the marking,
    /// the marking is skipped and that newer error is reported on this cursor's next call.
    pub fn check_and_advance(&self, cursor: &mut Cursor) -> Option<i32> {
        let old = self.word.load(Ordering::Acquire);
        if old == cursor.0 {
            return None;
        }
        let seen = old | SEEN;
        if seen != old {
            // Failure means either another reader set SEEN first (the word is now `seen`
            // anyway) or a new error arrived, which must stay unseen and differ from `seen`.
            let _ = self
                .word
                .compare_exchange(old, seen, Ordering::AcqRel, Ordering::Acquire);
        }
        cursor.0 = seen;
        Some((old & ERRNO_MASK) as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libc::{EDQUOT, EIO, ENOSPC};
    use proptest::prelude::*;
    use std::sync::Barrier;
    use std::sync::atomic::AtomicUsize;

    // --- the rule, row by row -------------------------------------------------------

    #[test]
    fn error_before_open_unseen_is_reported_to_new_opener() {
        let es = ErrSeq::new();
        es.set(EIO);
        let mut b = es.sample();
        assert_eq!(es.check_and_advance(&mut b), Some(EIO));
        assert_eq!(es.check_and_advance(&mut b), None);
    }

    #[test]
    fn error_reported_once_per_cursor() {
        let es = ErrSeq::new();
        let mut a = es.sample();
        assert_eq!(es.check_and_advance(&mut a), None);
        es.set(ENOSPC);
        assert_eq!(es.check_and_advance(&mut a), Some(ENOSPC));
        assert_eq!(es.check_and_advance(&mut a), None);
        assert_eq!(es.check(&a), None);
    }

    #[test]
    fn opener_after_report_does_not_see_it() {
        let es = ErrSeq::new();
        let mut a = es.sample();
        es.set(EIO);
        assert_eq!(es.check_and_advance(&mut a), Some(EIO));
        let mut c = es.sample();
        assert_eq!(es.check(&c), None);
        assert_eq!(es.check_and_advance(&mut c), None);
    }

    #[test]
    fn second_error_after_report_is_seen_again_by_everyone() {
        let es = ErrSeq::new();
        let mut a = es.sample();
        es.set(EIO);
        let mut b = es.sample();
        assert_eq!(es.check_and_advance(&mut a), Some(EIO));
        let mut c = es.sample();
        // Same errno again: still a new event, because the first one was seen.
        es.set(EIO);
        for cursor in [&mut a, &mut b, &mut c] {
            assert_eq!(es.check_and_advance(cursor), Some(EIO));
            assert_eq!(es.check_and_advance(cursor), None);
        }
        es.set(EDQUOT);
        for cursor in [&mut a, &mut b, &mut c] {
            assert_eq!(es.check_and_advance(cursor), Some(EDQUOT));
        }
    }

    #[test]
    fn errors_before_anyone_looks_count_once() {
        let es = ErrSeq::new();
        let mut a = es.sample();
        es.set(EIO);
        es.set(ENOSPC);
        es.set(EDQUOT);
        let mut b = es.sample();
        assert_eq!(es.check_and_advance(&mut a), Some(EDQUOT));
        assert_eq!(es.check_and_advance(&mut a), None);
        assert_eq!(es.check_and_advance(&mut b), Some(EDQUOT));
        assert_eq!(es.check_and_advance(&mut b), None);
    }

    #[test]
    fn check_does_not_consume() {
        let es = ErrSeq::new();
        let mut a = es.sample();
        es.set(EIO);
        assert_eq!(es.check(&a), Some(EIO));
        assert_eq!(es.check(&a), Some(EIO));
        // check() does not mark the error seen either: a new opener still gets it.
        let mut b = es.sample();
        assert_eq!(es.check_and_advance(&mut a), Some(EIO));
        assert_eq!(es.check(&a), None);
        assert_eq!(es.check_and_advance(&mut b), Some(EIO));
    }

    #[test]
    fn independent_cursors_each_see_error_once() {
        let file = ErrSeq::new();
        let mount = ErrSeq::new();
        let (mut fsync1, mut syncfs1) = (file.sample(), mount.sample());
        let (mut fsync2, mut syncfs2) = (file.sample(), mount.sample());
        file.set(EIO);
        mount.set(EIO);
        assert_eq!(file.check_and_advance(&mut fsync1), Some(EIO));
        assert_eq!(mount.check_and_advance(&mut syncfs1), Some(EIO));
        assert_eq!(mount.check_and_advance(&mut syncfs2), Some(EIO));
        assert_eq!(file.check_and_advance(&mut fsync2), Some(EIO));
        for (es, cursor) in [
            (&file, &mut fsync1),
            (&file, &mut fsync2),
            (&mount, &mut syncfs1),
            (&mount, &mut syncfs2),
        ] {
            assert_eq!(es.check_and_advance(cursor), None);
        }
    }

    #[test]
    fn default_cursor_is_before_anything() {
        let es = ErrSeq::new();
        let mut d = Cursor::default();
        assert_eq!(es.sample(), d);
        assert_eq!(es.check_and_advance(&mut d), None);
        es.set(EIO);
        assert_eq!(es.check_and_advance(&mut d), Some(EIO));
    }

    #[test]
    fn largest_errno_fits() {
        let es = ErrSeq::new();
        let mut a = es.sample();
        es.set(MAX_ERRNO);
        assert_eq!(es.check_and_advance(&mut a), Some(MAX_ERRNO));
    }

    #[test]
    #[cfg_attr(debug_assertions, should_panic(expected = "not in 1..=4095"))]
    fn out_of_range_errno_is_recorded_as_eio() {
        for bad in [0, -EIO, MAX_ERRNO + 1, i32::MAX, i32::MIN] {
            let es = ErrSeq::new();
            let mut a = es.sample();
            es.set(bad);
            assert_eq!(es.check_and_advance(&mut a), Some(EIO));
        }
    }

    #[test]
    fn counter_moves_only_when_an_error_follows_a_seen_one() {
        let es = ErrSeq::new();
        let counter = |es: &ErrSeq| es.word.load(Ordering::Relaxed) / COUNTER_ONE;
        let mut a = es.sample();
        es.set(EIO);
        let first = counter(&es);
        es.set(ENOSPC);
        es.set(ENOSPC);
        assert_eq!(counter(&es), first);
        assert_eq!(es.check_and_advance(&mut a), Some(ENOSPC));
        assert_eq!(counter(&es), first);
        es.set(EIO);
        assert_eq!(counter(&es), first.wrapping_add(1));
    }

    #[test]
    fn counter_wraps_around_harmlessly() {
        let top = !(ERRNO_MASK | SEEN);
        let es = ErrSeq {
            word: AtomicU32::new(top | EIO as u32 | SEEN),
        };
        let mut c = es.sample();
        assert_eq!(es.check(&c), None);
        es.set(ENOSPC);
        assert_eq!(es.word.load(Ordering::Relaxed), ENOSPC as u32);
        assert_eq!(es.check_and_advance(&mut c), Some(ENOSPC));
        assert_eq!(es.check_and_advance(&mut c), None);
        es.set(EIO);
        assert_eq!(es.check_and_advance(&mut c), Some(EIO));
    }

    // --- model test ---------------------------------------------------------------

    /// The rule restated without bits: errors are events; a cursor owes its reader every
    /// event it has not been told about, and reports them all at once as the latest errno.
    #[derive(Default)]
    struct Model {
        /// The latest errno, if any error happened.
        errno: Option<i32>,
        /// Whether the latest event was reported through some cursor.
        seen_by_anyone: bool,
        /// Event ids handed out so far.
        events: u64,
        /// Per cursor: the events it has not reported yet.
        unseen: Vec<Vec<u64>>,
    }

    impl Model {
        fn set(&mut self, errno: i32) {
            if self.errno.is_none() || self.seen_by_anyone {
                self.events += 1;
                let id = self.events;
                for pending in &mut self.unseen {
                    pending.push(id);
                }
                self.seen_by_anyone = false;
            }
            // Otherwise the latest event is still unseen: it only changes its errno.
            self.errno = Some(errno);
        }

        fn open(&mut self) {
            let pending = match self.errno {
                Some(_) if !self.seen_by_anyone => vec![self.events],
                _ => Vec::new(),
            };
            self.unseen.push(pending);
        }

        fn check(&self, i: usize) -> Option<i32> {
            if self.unseen[i].is_empty() {
                None
            } else {
                self.errno
            }
        }

        fn check_and_advance(&mut self, i: usize) -> Option<i32> {
            let report = self.check(i);
            if report.is_some() {
                self.unseen[i].clear();
                self.seen_by_anyone = true;
            }
            report
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Set(i32),
        Open,
        Check(usize),
        CheckAndAdvance(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => prop::sample::select(vec![EIO, ENOSPC, EDQUOT, 1, MAX_ERRNO]).prop_map(Op::Set),
            2 => Just(Op::Open),
            1 => any::<usize>().prop_map(Op::Check),
            4 => any::<usize>().prop_map(Op::CheckAndAdvance),
        ]
    }

    proptest! {
        #[test]
        fn errseq_matches_event_model(ops in prop::collection::vec(op(), 0..80)) {
            let es = ErrSeq::new();
            let mut model = Model::default();
            // Cursor 0 exists from the start, sampled before anything happened.
            let mut cursors = vec![Cursor::default()];
            model.open();
            for (step, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Set(errno) => {
                        es.set(errno);
                        model.set(errno);
                    }
                    Op::Open => {
                        cursors.push(es.sample());
                        model.open();
                    }
                    Op::Check(i) => {
                        let i = i % cursors.len();
                        let got = es.check(&cursors[i]);
                        prop_assert_eq!(got, model.check(i), "step {} check {}", step, i);
                    }
                    Op::CheckAndAdvance(i) => {
                        let i = i % cursors.len();
                        let got = es.check_and_advance(&mut cursors[i]);
                        let want = model.check_and_advance(i);
                        prop_assert_eq!(got, want, "step {} advance {}", step, i);
                    }
                }
            }
            // Finally every cursor drains: each reports what the model says, then nothing.
            for (i, cursor) in cursors.iter_mut().enumerate() {
                prop_assert_eq!(es.check_and_advance(cursor), model.check_and_advance(i));
                prop_assert_eq!(es.check_and_advance(cursor), None);
            }
        }
    }

    // --- concurrency ----------------------------------------------------------------

    #[test]
    fn concurrent_sets_and_checks_report_each_set_at_most_once_per_cursor() {
        const SETTERS: i32 = 8;
        const READERS: usize = 2;
        const SETS_PER_THREAD: i32 = 400;
        const LAST: i32 = MAX_ERRNO;
        // Every set() uses its own errno, so a reported errno names the set() it came from.
        const { assert!(SETTERS * SETS_PER_THREAD < LAST) };

        let es = ErrSeq::new();
        let setters_done = AtomicUsize::new(0);
        let start = Barrier::new(SETTERS as usize + READERS);
        // Checks until every setter has finished, then once more: the cursor has then
        // drained every set() (none can race with that last check).
        let drain = |cursor: &mut Cursor, seen: &mut Vec<i32>| {
            while setters_done.load(Ordering::Acquire) < SETTERS as usize {
                seen.extend(es.check_and_advance(cursor));
                std::hint::spin_loop();
            }
            seen.extend(es.check_and_advance(cursor));
        };
        let results: Vec<(Cursor, Vec<i32>)> = std::thread::scope(|s| {
            let mut handles = Vec::new();
            for t in 0..SETTERS {
                let (es, start, setters_done, drain) = (&es, &start, &setters_done, &drain);
                handles.push(s.spawn(move || {
                    let mut cursor = es.sample();
                    let mut seen = Vec::new();
                    start.wait();
                    for i in 0..SETS_PER_THREAD {
                        es.set(1 + t * SETS_PER_THREAD + i);
                        for _ in 0..2 {
                            seen.extend(es.check_and_advance(&mut cursor));
                        }
                    }
                    setters_done.fetch_add(1, Ordering::Release);
                    drain(&mut cursor, &mut seen);
                    (cursor, seen)
                }));
            }
            for _ in 0..READERS {
                let (start, drain) = (&start, &drain);
                handles.push(s.spawn(move || {
                    let mut cursor = Cursor::default();
                    let mut seen = Vec::new();
                    start.wait();
                    drain(&mut cursor, &mut seen);
                    (cursor, seen)
                }));
            }
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });

        for (n, (cursor, seen)) in results.iter().enumerate() {
            assert_eq!(es.check(cursor), None, "cursor {n} was not drained");
            let mut distinct = seen.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(
                distinct.len(),
                seen.len(),
                "cursor {n} reported a set() twice"
            );
            assert!(
                seen.iter()
                    .all(|&e| (1..=SETTERS * SETS_PER_THREAD).contains(&e)),
                "cursor {n} reported an errno nobody set"
            );
            assert!(!seen.is_empty(), "cursor {n} never saw any error");
        }

        // One last error reaches every cursor exactly once, even when all check at once.
        es.set(LAST);
        let finish = Barrier::new(results.len());
        std::thread::scope(|s| {
            let finals: Vec<_> = results
                .iter()
                .map(|&(mut cursor, _)| {
                    let (es, finish) = (&es, &finish);
                    s.spawn(move || {
                        finish.wait();
                        let first = es.check_and_advance(&mut cursor);
                        (first, es.check_and_advance(&mut cursor))
                    })
                })
                .collect();
            for f in finals {
                assert_eq!(f.join().unwrap(), (Some(LAST), None));
            }
        });
    }
}
