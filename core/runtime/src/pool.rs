//! A thread-safe, FIFO-fair pool of VMs, generic over how a VM is made ([`Factory`]).
//!
//! Design note:
//! * The pool never holds its lock while creating or destroying an item: slots are
//!   reserved under the lock (`creating`), the slow work happens outside it.
//! * Waiters are served strictly in arrival order: every `acquire` takes a ticket and only
//!   the ticket at the head of the queue may take an idle item or reserve a creation slot.
//! * `alive = idle + in_use + creating` never exceeds `max`.
//! * With `recycle_on_release` a returned item is destroyed and a fresh one is created in
//!   the background, so nothing one user did is visible to the next.
//! * A maintenance thread keeps at least `min` items alive, replaces idle items that died,
//!   and retires idle items above `min` after `idle_timeout`.
//! * A failed creation is retried once, then reported to the waiter at the head.
//!
//! Nothing here knows about QEMU; the unit tests use a counting factory.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// Makes, checks and destroys pool items.
pub trait Factory: Send + Sync + 'static {
    type Item: Send + 'static;
    /// Creates a fresh item (e.g. restores a VM from a snapshot).
    fn create(&self) -> Result<Self::Item, String>;
    /// Whether an idle item is still usable.
    fn is_alive(&self, item: &Self::Item) -> bool;
    /// Destroys an item (kills the VM). Must not block for long.
    fn destroy(&self, item: Self::Item);
}

/// Pool sizing and timing.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    pub min: usize,
    pub max: usize,
    /// `None` waits forever.
    pub acquire_timeout: Option<Duration>,
    /// Idle items above `min` are retired after this long. `None` keeps them.
    pub idle_timeout: Option<Duration>,
    pub recycle_on_release: bool,
}

/// Snapshot of the pool's counters, cheap to poll.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PoolStats {
    pub alive: usize,
    pub in_use: usize,
    pub idle: usize,
    pub creating: usize,
    pub waiting: usize,
    pub min: usize,
    pub max: usize,
    /// Latencies of the most recent acquires (how long callers waited), newest last.
    pub recent_acquire_ms: Vec<f64>,
    /// Latencies of the most recent item creations (restores), newest last.
    pub recent_create_ms: Vec<f64>,
}

/// Why an acquire failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolError {
    /// The pool was shut down.
    Shutdown,
    /// No item became free within the acquire timeout.
    Timeout { waited_ms: u64, stats: String },
    /// Creating an item failed twice in a row.
    CreateFailed(String),
    /// The configuration cannot work.
    Config(String),
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolError::Shutdown => write!(f, "the pool has been shut down"),
            PoolError::Timeout { waited_ms, stats } => write!(
                f,
                "no VM became free within {waited_ms} ms ({stats}); raise max or acquire_timeout_ms, or release VMs sooner"
            ),
            PoolError::CreateFailed(e) => write!(f, "could not start a pool VM (tried twice): {e}"),
            PoolError::Config(e) => write!(f, "invalid pool configuration: {e}"),
        }
    }
}

impl std::error::Error for PoolError {}

const LATENCY_HISTORY: usize = 32;

struct State<T> {
    idle: VecDeque<(T, Instant)>,
    in_use: usize,
    creating: usize,
    queue: VecDeque<u64>,
    next_ticket: u64,
    shutdown: bool,
    /// A creation error to hand to the head waiter.
    create_error: Option<String>,
    acquire_ms: VecDeque<f64>,
    create_ms: VecDeque<f64>,
}

impl<T> State<T> {
    fn alive(&self) -> usize {
        self.idle.len() + self.in_use + self.creating
    }
}

struct Inner<F: Factory> {
    factory: F,
    cfg: PoolConfig,
    state: Mutex<State<F::Item>>,
    changed: Condvar,
}

/// The pool. Cloning gives another handle to the same pool.
pub struct Pool<F: Factory> {
    inner: Arc<Inner<F>>,
}

impl<F: Factory> Clone for Pool<F> {
    fn clone(&self) -> Self {
        Pool { inner: self.inner.clone() }
    }
}

fn push_latency(q: &mut VecDeque<f64>, d: Duration) {
    if q.len() == LATENCY_HISTORY {
        q.pop_front();
    }
    q.push_back(d.as_secs_f64() * 1000.0);
}

impl<F: Factory> Pool<F> {
    /// Creates a pool. `seed` items (e.g. the VM that baked the image) are handed out first.
    pub fn new(factory: F, cfg: PoolConfig, seed: Vec<F::Item>) -> Result<Pool<F>, PoolError> {
        if cfg.max == 0 {
            return Err(PoolError::Config("max must be at least 1".into()));
        }
        if cfg.min > cfg.max {
            return Err(PoolError::Config(format!("min ({}) is larger than max ({})", cfg.min, cfg.max)));
        }
        if seed.len() > cfg.max {
            return Err(PoolError::Config("more seed VMs than max".into()));
        }
        let now = Instant::now();
        let state = State {
            idle: seed.into_iter().map(|i| (i, now)).collect(),
            in_use: 0,
            creating: 0,
            queue: VecDeque::new(),
            next_ticket: 0,
            shutdown: false,
            create_error: None,
            acquire_ms: VecDeque::new(),
            create_ms: VecDeque::new(),
        };
        let pool = Pool { inner: Arc::new(Inner { factory, cfg, state: Mutex::new(state), changed: Condvar::new() }) };
        pool.spawn_maintenance();
        Ok(pool)
    }

    fn lock(&self) -> MutexGuard<'_, State<F::Item>> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes an item, waiting in FIFO order if the pool is saturated.
    pub fn acquire(&self) -> Result<F::Item, PoolError> {
        let started = Instant::now();
        let deadline = self.inner.cfg.acquire_timeout.map(|t| started + t);
        let mut st = self.lock();
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        st.queue.push_back(ticket);
        let result = loop {
            if st.shutdown {
                break Err(PoolError::Shutdown);
            }
            if st.queue.front() == Some(&ticket) {
                if let Some(e) = st.create_error.take() {
                    break Err(PoolError::CreateFailed(e));
                }
                if let Some((item, _)) = st.idle.pop_front() {
                    // Liveness is checked outside the lock; a dead item is destroyed and we retry.
                    st.in_use += 1;
                    drop(st);
                    let alive = self.inner.factory.is_alive(&item);
                    st = self.lock();
                    if alive {
                        break Ok(item);
                    }
                    st.in_use -= 1;
                    drop(st);
                    self.inner.factory.destroy(item);
                    st = self.lock();
                    continue;
                }
                if st.alive() < self.inner.cfg.max {
                    st.creating += 1;
                    drop(st);
                    let made = self.create_with_retry();
                    st = self.lock();
                    st.creating -= 1;
                    match made {
                        Ok(item) if st.shutdown => {
                            drop(st);
                            self.inner.factory.destroy(item);
                            st = self.lock();
                            break Err(PoolError::Shutdown);
                        }
                        Ok(item) => {
                            st.in_use += 1;
                            break Ok(item);
                        }
                        Err(e) => break Err(PoolError::CreateFailed(e)),
                    }
                }
            }
            match deadline {
                None => st = self.inner.changed.wait(st).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        let summary = format!(
                            "alive {}, in use {}, waiting {}, max {}",
                            st.alive(),
                            st.in_use,
                            st.queue.len(),
                            self.inner.cfg.max
                        );
                        break Err(PoolError::Timeout { waited_ms: (now - started).as_millis() as u64, stats: summary });
                    }
                    st = self.inner.changed.wait_timeout(st, d - now).unwrap_or_else(|p| p.into_inner()).0;
                }
            }
        };
        st.queue.retain(|t| *t != ticket);
        if result.is_ok() {
            push_latency(&mut st.acquire_ms, started.elapsed());
        }
        drop(st);
        self.inner.changed.notify_all();
        result
    }

    fn create_with_retry(&self) -> Result<F::Item, String> {
        let t = Instant::now();
        let made = self.inner.factory.create().or_else(|first| {
            self.inner.factory.create().map_err(|second| {
                if first == second { first } else { format!("{second} (first attempt: {first})") }
            })
        });
        if made.is_ok() {
            push_latency(&mut self.lock().create_ms, t.elapsed());
        }
        made
    }

    /// Returns an item. With `recycle_on_release` it is destroyed and replaced in the background.
    pub fn release(&self, item: F::Item) {
        let mut st = self.lock();
        st.in_use = st.in_use.saturating_sub(1);
        if st.shutdown {
            drop(st);
            self.inner.factory.destroy(item);
            return;
        }
        if self.inner.cfg.recycle_on_release {
            // Reserve the replacement's slot now so waiters see the capacity is spoken for.
            st.creating += 1;
            drop(st);
            let pool = self.clone();
            thread::spawn(move || {
                pool.inner.factory.destroy(item);
                pool.finish_background_create();
            });
        } else {
            st.idle.push_back((item, Instant::now()));
            drop(st);
        }
        self.inner.changed.notify_all();
    }

    /// Like [`Pool::release`] but the item is known to be broken: destroy it, never reuse it.
    pub fn discard(&self, item: F::Item) {
        {
            let mut st = self.lock();
            st.in_use = st.in_use.saturating_sub(1);
        }
        self.inner.factory.destroy(item);
        self.inner.changed.notify_all();
    }

    /// Runs a creation whose slot (`creating`) was already reserved, and parks the result idle.
    fn finish_background_create(&self) {
        let made = self.create_with_retry();
        let mut st = self.lock();
        st.creating -= 1;
        match made {
            Ok(item) if st.shutdown => {
                drop(st);
                self.inner.factory.destroy(item);
            }
            Ok(item) => {
                st.idle.push_back((item, Instant::now()));
                drop(st);
            }
            Err(e) => {
                if !st.queue.is_empty() {
                    st.create_error = Some(e);
                }
                drop(st);
            }
        }
        self.inner.changed.notify_all();
    }

    /// Current counters.
    pub fn stats(&self) -> PoolStats {
        let st = self.lock();
        PoolStats {
            alive: st.alive(),
            in_use: st.in_use,
            idle: st.idle.len(),
            creating: st.creating,
            waiting: st.queue.len(),
            min: self.inner.cfg.min,
            max: self.inner.cfg.max,
            recent_acquire_ms: st.acquire_ms.iter().copied().collect(),
            recent_create_ms: st.create_ms.iter().copied().collect(),
        }
    }

    /// Destroys idle items, fails waiters, and makes later acquires fail. Items in use are
    /// destroyed when released. Idempotent.
    pub fn shutdown(&self) {
        let idle: Vec<_> = {
            let mut st = self.lock();
            st.shutdown = true;
            st.idle.drain(..).map(|(i, _)| i).collect()
        };
        self.inner.changed.notify_all();
        for item in idle {
            self.inner.factory.destroy(item);
        }
    }

    /// Waits until no background creation is running (used by shutdown paths and tests).
    pub fn wait_settled(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        while st.creating > 0 {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self.inner.changed.wait_timeout(st, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
        true
    }

    /// One maintenance pass: replace dead idle items, retire expired ones, top up to `min`.
    /// Returns how many creations it started.
    fn maintain(&self) -> usize {
        let cfg = &self.inner.cfg;
        // Take idle items out to check them without the lock.
        let (to_check, expired): (Vec<_>, Vec<_>) = {
            let mut st = self.lock();
            if st.shutdown {
                return 0;
            }
            let now = Instant::now();
            let mut keep_alive_budget = st.alive().saturating_sub(cfg.min);
            let mut check = Vec::new();
            let mut expired = Vec::new();
            for (item, since) in st.idle.drain(..) {
                let old = cfg.idle_timeout.is_some_and(|t| now.duration_since(since) >= t);
                if old && keep_alive_budget > 0 {
                    keep_alive_budget -= 1;
                    expired.push(item);
                } else {
                    check.push((item, since));
                }
            }
            st.in_use += check.len(); // counted while out of the idle list
            (check, expired)
        };
        for item in expired {
            self.inner.factory.destroy(item);
        }
        let mut dead = Vec::new();
        let mut back = Vec::new();
        for (item, since) in to_check {
            if self.inner.factory.is_alive(&item) {
                back.push((item, since));
            } else {
                dead.push(item);
            }
        }
        let to_create = {
            let mut st = self.lock();
            st.in_use -= back.len() + dead.len();
            // Put checked items back in front, preserving their order.
            for entry in back.into_iter().rev() {
                st.idle.push_front(entry);
            }
            let n = if st.shutdown { 0 } else { cfg.min.saturating_sub(st.alive()) };
            st.creating += n;
            n
        };
        for item in dead {
            self.inner.factory.destroy(item);
        }
        for _ in 0..to_create {
            let pool = self.clone();
            thread::spawn(move || pool.finish_background_create());
        }
        self.inner.changed.notify_all();
        to_create
    }

    fn spawn_maintenance(&self) {
        let weak = Arc::downgrade(&self.inner);
        thread::spawn(move || loop {
            let Some(inner) = weak.upgrade() else { return };
            let pool = Pool { inner };
            if pool.lock().shutdown {
                return;
            }
            pool.maintain();
            let period = Duration::from_millis(200);
            let st = pool.lock();
            let _ = pool.inner.changed.wait_timeout(st, period);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    #[derive(Default)]
    struct Counting {
        made: AtomicUsize,
        destroyed: AtomicUsize,
        fail_next: AtomicUsize,
        delay_ms: u64,
    }

    struct Item {
        n: usize,
        alive: Arc<AtomicBool>,
    }

    impl Factory for Arc<Counting> {
        type Item = Item;
        fn create(&self) -> Result<Item, String> {
            if self.fail_next.load(Ordering::SeqCst) > 0 {
                self.fail_next.fetch_sub(1, Ordering::SeqCst);
                return Err("restore failed".into());
            }
            thread::sleep(Duration::from_millis(self.delay_ms));
            let n = self.made.fetch_add(1, Ordering::SeqCst);
            Ok(Item { n, alive: Arc::new(AtomicBool::new(true)) })
        }
        fn is_alive(&self, item: &Item) -> bool {
            item.alive.load(Ordering::SeqCst)
        }
        fn destroy(&self, _item: Item) {
            self.destroyed.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn cfg(min: usize, max: usize, timeout_ms: Option<u64>, recycle: bool) -> PoolConfig {
        PoolConfig {
            min,
            max,
            acquire_timeout: timeout_ms.map(Duration::from_millis),
            idle_timeout: None,
            recycle_on_release: recycle,
        }
    }

    fn eventually(mut f: impl FnMut() -> bool) -> bool {
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if f() {
                return true;
            }
            thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn seed_item_is_handed_out_first() {
        let f = Arc::new(Counting::default());
        let seed = Item { n: 999, alive: Arc::new(AtomicBool::new(true)) };
        let pool = Pool::new(f.clone(), cfg(0, 2, None, false), vec![seed]).unwrap();
        assert_eq!(pool.acquire().unwrap().n, 999);
        pool.shutdown();
    }

    #[test]
    fn keeps_min_alive() {
        let f = Arc::new(Counting::default());
        let pool = Pool::new(f.clone(), cfg(2, 4, None, false), vec![]).unwrap();
        assert!(eventually(|| pool.stats().idle == 2));
        assert_eq!(f.made.load(Ordering::SeqCst), 2);
        pool.shutdown();
        assert_eq!(f.destroyed.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn saturation_times_out_with_clear_error() {
        let f = Arc::new(Counting::default());
        let pool = Pool::new(f.clone(), cfg(0, 1, Some(100), false), vec![]).unwrap();
        let held = pool.acquire().unwrap();
        let t = Instant::now();
        let err = pool.acquire().err().unwrap();
        assert!(t.elapsed() >= Duration::from_millis(100));
        assert!(matches!(err, PoolError::Timeout { .. }), "{err}");
        assert!(err.to_string().contains("max 1"));
        pool.release(held);
        assert!(pool.acquire().is_ok());
        pool.shutdown();
    }

    #[test]
    fn waiters_are_served_in_fifo_order() {
        let f = Arc::new(Counting::default());
        let pool = Pool::new(f.clone(), cfg(0, 1, None, false), vec![]).unwrap();
        let held = pool.acquire().unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut handles = Vec::new();
        for i in 0..5 {
            let (p, o) = (pool.clone(), order.clone());
            handles.push(thread::spawn(move || {
                let item = p.acquire().unwrap();
                o.lock().unwrap().push(i);
                thread::sleep(Duration::from_millis(5));
                p.release(item);
            }));
            // make arrival order deterministic
            assert!(eventually(|| pool.stats().waiting == i + 1));
        }
        pool.release(held);
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
        pool.shutdown();
    }

    #[test]
    fn recycle_on_release_never_reuses_an_item() {
        let f = Arc::new(Counting::default());
        let pool = Pool::new(f.clone(), cfg(0, 1, None, true), vec![]).unwrap();
        let a = pool.acquire().unwrap();
        let a_n = a.n;
        pool.release(a);
        let b = pool.acquire().unwrap();
        assert_ne!(a_n, b.n);
        assert_eq!(f.destroyed.load(Ordering::SeqCst), 1);
        pool.release(b);
        assert!(pool.wait_settled(Duration::from_secs(5)));
        assert_eq!(pool.stats().alive, 1, "replacement keeps the pool at its size");
        pool.shutdown();
    }

    #[test]
    fn dead_idle_item_is_replaced() {
        let f = Arc::new(Counting::default());
        let pool = Pool::new(f.clone(), cfg(1, 2, None, false), vec![]).unwrap();
        assert!(eventually(|| pool.stats().idle == 1));
        let item = pool.acquire().unwrap();
        let flag = item.alive.clone();
        pool.release(item);
        flag.store(false, Ordering::SeqCst);
        assert!(eventually(|| f.destroyed.load(Ordering::SeqCst) == 1 && pool.stats().idle == 1));
        let fresh = pool.acquire().unwrap();
        assert!(fresh.alive.load(Ordering::SeqCst));
        pool.shutdown();
    }

    #[test]
    fn failed_create_is_retried_once_then_reported() {
        let f = Arc::new(Counting::default());
        let pool = Pool::new(f.clone(), cfg(0, 1, Some(2000), false), vec![]).unwrap();
        f.fail_next.store(1, Ordering::SeqCst);
        let ok = pool.acquire().unwrap();
        pool.release(ok);
        let pool2 = Pool::new(f.clone(), cfg(0, 1, Some(2000), false), vec![]).unwrap();
        f.fail_next.store(2, Ordering::SeqCst);
        let err = pool2.acquire().err().unwrap();
        assert!(matches!(err, PoolError::CreateFailed(_)), "{err}");
        assert!(err.to_string().contains("restore failed"));
        assert_eq!(pool2.stats().alive, 0);
        pool.shutdown();
        pool2.shutdown();
    }

    #[test]
    fn shutdown_fails_waiters() {
        let f = Arc::new(Counting::default());
        let pool = Pool::new(f.clone(), cfg(0, 1, None, false), vec![]).unwrap();
        let _held = pool.acquire().unwrap();
        let p = pool.clone();
        let waiter = thread::spawn(move || p.acquire());
        assert!(eventually(|| pool.stats().waiting == 1));
        pool.shutdown();
        assert_eq!(waiter.join().unwrap().err(), Some(PoolError::Shutdown));
    }

    #[test]
    fn idle_items_above_min_retire() {
        let f = Arc::new(Counting::default());
        let mut c = cfg(1, 3, None, false);
        c.idle_timeout = Some(Duration::from_millis(50));
        let pool = Pool::new(f.clone(), c, vec![]).unwrap();
        let a = pool.acquire().unwrap();
        let b = pool.acquire().unwrap();
        pool.release(a);
        pool.release(b);
        assert!(eventually(|| pool.stats().alive == 1));
        pool.shutdown();
    }

    #[test]
    fn config_is_checked() {
        let f = Arc::new(Counting::default());
        assert!(matches!(Pool::new(f.clone(), cfg(3, 2, None, false), vec![]).err(), Some(PoolError::Config(_))));
        assert!(matches!(Pool::new(f, cfg(0, 0, None, false), vec![]).err(), Some(PoolError::Config(_))));
    }

    #[test]
    fn concurrent_stress_never_exceeds_max() {
        let f = Arc::new(Counting { delay_ms: 1, ..Default::default() });
        let pool = Pool::new(f.clone(), cfg(1, 3, None, true), vec![]).unwrap();
        let peak = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (p, peak) = (pool.clone(), peak.clone());
                thread::spawn(move || {
                    for _ in 0..20 {
                        let it = p.acquire().unwrap();
                        let s = p.stats();
                        assert!(s.alive <= 3, "{s:?}");
                        peak.fetch_max(s.in_use, Ordering::SeqCst);
                        p.release(it);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert!(peak.load(Ordering::SeqCst) <= 3);
        assert!(pool.wait_settled(Duration::from_secs(5)));
        pool.shutdown();
        assert!(pool.wait_settled(Duration::from_secs(5)));
        assert_eq!(f.made.load(Ordering::SeqCst), f.destroyed.load(Ordering::SeqCst));
    }
}
