//! A persistent pool of worker threads for [`crate::qgemm`]'s products.
//!
//! Exists because a decode step makes about four quantized products per layer (some 130 for
//! Phi-3-mini), each split across the cores; spawning and joining threads for every product
//! costs tens of microseconds each time. The workers here are started once and sleep on a
//! condition variable between products; the caller runs parts too, so a product never waits
//! for a worker that has not woken yet.
//!
//! One product runs on the pool at a time; a caller that finds it busy (several engines or
//! tests in one process) runs its parts on scoped threads of its own instead.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Condvar, Mutex, OnceLock};

/// The job of the product in flight, its lifetime erased: [`run`] does not return before every
/// part that started has finished, so the reference outlives every use.
#[derive(Clone, Copy)]
struct Job(*const (dyn Fn(usize) + Sync + 'static));
// SAFETY: the closure is `Sync`, and `run` keeps it alive while workers hold the pointer.
unsafe impl Send for Job {}

struct State {
    job: Option<Job>,
    parts: usize,
    /// The next part to hand out.
    next: usize,
    /// Parts handed out or waiting that have not finished.
    pending: usize,
    panicked: bool,
    workers: usize,
}

struct Pool {
    state: Mutex<State>,
    start: Condvar,
    done: Condvar,
    /// Held by the product in flight.
    busy: Mutex<()>,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool {
        state: Mutex::new(State {
            job: None,
            parts: 0,
            next: 0,
            pending: 0,
            panicked: false,
            workers: 0,
        }),
        start: Condvar::new(),
        done: Condvar::new(),
        busy: Mutex::new(()),
    })
}

/// Runs `job(0)`, ..., `job(parts - 1)`, on the calling thread and `parts - 1` pool workers,
/// and returns when all have finished. A panic in a part is raised again here.
pub(crate) fn run(parts: usize, job: &(dyn Fn(usize) + Sync)) {
    if parts <= 1 {
        if parts == 1 {
            job(0);
        }
        return;
    }
    let pool = pool();
    let Ok(_busy) = pool.busy.try_lock() else {
        std::thread::scope(|s| {
            for t in 1..parts {
                s.spawn(move || job(t));
            }
            job(0);
        });
        return;
    };
    // SAFETY: only the lifetime changes; see `Job`.
    let erased: &'static (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(job) };
    let mut st = pool.state.lock().unwrap_or_else(|e| e.into_inner());
    while st.workers < parts - 1 {
        std::thread::Builder::new()
            .name(format!("qgemm-{}", st.workers))
            .spawn(move || worker(pool))
            .expect("qgemm worker thread");
        st.workers += 1;
    }
    st.job = Some(Job(erased));
    st.parts = parts;
    st.next = 0;
    st.pending = parts;
    st.panicked = false;
    pool.start.notify_all();
    // The caller takes parts like any worker until none are left, then waits for the rest.
    loop {
        if st.next < st.parts {
            let t = st.next;
            st.next += 1;
            drop(st);
            let ok = catch_unwind(AssertUnwindSafe(|| erased(t))).is_ok();
            st = pool.state.lock().unwrap_or_else(|e| e.into_inner());
            st.panicked |= !ok;
            st.pending -= 1;
        } else if st.pending > 0 {
            st = pool.done.wait(st).unwrap_or_else(|e| e.into_inner());
        } else {
            break;
        }
    }
    st.job = None;
    let panicked = st.panicked;
    drop(st);
    if panicked {
        panic!("a qgemm part panicked");
    }
}

fn worker(pool: &'static Pool) {
    let mut st = pool.state.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        match st.job {
            Some(job) if st.next < st.parts => {
                let t = st.next;
                st.next += 1;
                drop(st);
                // SAFETY: `run` waits for this part before the job's borrow ends.
                let ok = catch_unwind(AssertUnwindSafe(|| unsafe { (*job.0)(t) })).is_ok();
                st = pool.state.lock().unwrap_or_else(|e| e.into_inner());
                st.panicked |= !ok;
                st.pending -= 1;
                if st.pending == 0 {
                    pool.done.notify_all();
                }
            }
            _ => st = pool.start.wait(st).unwrap_or_else(|e| e.into_inner()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn runs_every_part_once() {
        for parts in [0, 1, 2, 3, 7] {
            for _ in 0..50 {
                let hits: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
                run(parts, &|t| {
                    hits[t].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn concurrent_callers() {
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..100 {
                        let sum = AtomicUsize::new(0);
                        run(3, &|t| {
                            sum.fetch_add(t + 1, Ordering::Relaxed);
                        });
                        assert_eq!(sum.load(Ordering::Relaxed), 6);
                    }
                });
            }
        });
    }
}
