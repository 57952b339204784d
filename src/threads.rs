//! Work shared over threads, some of which the system may not start.
//!
//! Both parallel loops of the project — `modelmeter sweep`'s points
//! ([`crate::sweep::evaluate_all`]) and the reference modules' weight draws
//! (`modelmeter_reference::draws`) — split their work into parts that whichever thread is
//! free takes next, so a thread that cannot be started (a process or memory limit) only
//! leaves its part to the others. This is the one place that starts them.

/// Runs `work` on this thread and on up to `helpers` more (scoped threads started with
/// [`std::thread::Builder`]): a helper the system cannot start is not an error, and no more
/// are tried. `work` takes its share itself (from a queue or a counter the runs share), so
/// the runs that did start do all of it. Returns each run's result, this thread's first;
/// a panic in a helper goes on as a panic here.
pub fn on_threads<T: Send, F: Fn() -> T + Sync>(helpers: usize, work: &F) -> Vec<T> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..helpers)
            .map_while(|_| std::thread::Builder::new().spawn_scoped(scope, work).ok())
            .collect();
        let mut results = vec![work()];
        for h in handles {
            results.push(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        }
        results
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_run_returns_this_threads_first() {
        let main = std::thread::current().id();
        let runs = AtomicUsize::new(0);
        let results = on_threads(3, &|| {
            runs.fetch_add(1, Ordering::Relaxed);
            std::thread::current().id()
        });
        assert_eq!(results.len(), 4);
        assert_eq!(runs.into_inner(), 4);
        assert_eq!(results[0], main);
        assert!(results[1..].iter().all(|id| *id != main));
        assert_eq!(on_threads(0, &|| 7), [7]);
    }

    #[test]
    fn a_helpers_panic_goes_on_as_a_panic() {
        let main = std::thread::current().id();
        let ran = std::panic::catch_unwind(|| {
            on_threads(1, &|| {
                if std::thread::current().id() != main {
                    panic!("a helper's bug");
                }
            })
        });
        assert!(ran.is_err());
    }
}
