//! One worker thread per core, for the CPU-bound block work of both wings
//! (compressing on the primary, decompressing and hash-checking on the
//! secondary). The threads live as long as the process, so what they keep
//! per thread (zstd contexts, see `block`) is made once, and a batch costs
//! two channel hand-offs per core, not a thread spawn.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};

type Job = Box<dyn FnOnce() + Send>;

/// The queue every worker takes jobs from.
struct Workers {
    jobs: Mutex<Sender<Job>>,
    count: usize,
}

fn workers() -> &'static Workers {
    static WORKERS: OnceLock<Workers> = OnceLock::new();
    WORKERS.get_or_init(|| {
        let count = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..count {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("hbrfs-work-{i}"))
                .spawn(move || work(&rx));
            if let Err(e) = spawned {
                log::warn!("starting block worker {i}: {e}; fewer workers");
            }
        }
        Workers {
            jobs: Mutex::new(tx),
            count,
        }
    })
}

/// A worker: runs jobs until the process ends. A job that panics loses its
/// result (its caller sees that), not the worker.
fn work(rx: &Mutex<Receiver<Job>>) {
    loop {
        let job = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
    }
}

/// How many workers there are: the cores.
pub fn count() -> usize {
    workers().count
}

/// `f` of every item, computed by the workers in contiguous parts (one per
/// worker), returned in the items' order. Blocks the calling thread (never
/// call it from a worker or an async task). `None` if a part was lost (a
/// job panicked, or no worker runs).
pub fn map<T, R, F>(items: Vec<T>, f: F) -> Option<Vec<R>>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> R + Send + Sync + 'static,
{
    let n = items.len();
    if n == 0 {
        return Some(Vec::new());
    }
    let w = workers();
    let per_part = n.div_ceil(w.count);
    let f = Arc::new(f);
    let (tx, rx) = mpsc::channel::<(usize, Vec<R>)>();
    let mut items = items.into_iter();
    let mut parts = 0;
    {
        let jobs = w.jobs.lock().ok()?;
        loop {
            let part: Vec<T> = items.by_ref().take(per_part).collect();
            if part.is_empty() {
                break;
            }
            let (f, tx) = (f.clone(), tx.clone());
            let index = parts;
            let job: Job = Box::new(move || {
                let _ = tx.send((index, part.into_iter().map(|t| f(t)).collect()));
            });
            jobs.send(job).ok()?;
            parts += 1;
        }
    }
    drop(tx);
    let mut done: Vec<Option<Vec<R>>> = (0..parts).map(|_| None).collect();
    for (index, results) in rx.iter() {
        done[index] = Some(results);
    }
    let mut out = Vec::with_capacity(n);
    for part in done {
        out.extend(part?);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_in_order_and_a_panic_loses_only_its_batch() {
        let squares = map((0..1000u64).collect(), |x| x * x).unwrap();
        assert_eq!(squares, (0..1000u64).map(|x| x * x).collect::<Vec<_>>());
        assert_eq!(map(Vec::<u8>::new(), |x| x), Some(Vec::new()));
        let lost = map(vec![1, 2, 3], |x: i32| {
            assert!(x != 2, "a bad item");
            x
        });
        assert_eq!(lost, None);
        // The workers survived the panic.
        assert_eq!(map(vec![1, 2, 3], |x: i32| x + 1), Some(vec![2, 3, 4]));
    }
}
