//! The exporter's work loop: hands fixed-size pieces of a tensor to scoped threads (the
//! quantization itself is `qatflow_nvfp4::vectorized`).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use tokio_util::sync::CancellationToken;

use crate::error::ExportError;

/// Runs `work(i)` for every `i` in `0..items` on up to `threads` scoped threads, each taking
/// the next piece when it is done with one, and returns the results in item order. Stops
/// early at the first error (the one of the lowest item is returned) or when `cancel` fires.
pub(crate) fn run_pieces<R: Send>(
    items: usize,
    threads: usize,
    cancel: &CancellationToken,
    work: impl Fn(usize) -> Result<R, ExportError> + Sync,
) -> Result<Vec<R>, ExportError> {
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let failure: Mutex<Option<(usize, ExportError)>> = Mutex::new(None);
    let worker = || {
        let mut done = Vec::new();
        loop {
            if stop.load(Ordering::Relaxed) || cancel.is_cancelled() {
                break;
            }
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= items {
                break;
            }
            match work(i) {
                Ok(r) => done.push((i, r)),
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    let mut f = failure.lock().expect("no worker panics holding it");
                    if f.as_ref().is_none_or(|(j, _)| i < *j) {
                        *f = Some((i, e));
                    }
                    break;
                }
            }
        }
        done
    };
    let workers = threads.clamp(1, items.max(1));
    let mut results: Vec<(usize, R)> = if workers == 1 {
        worker()
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers).map(|_| s.spawn(worker)).collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("export workers do not panic"))
                .collect()
        })
    };
    if let Some((_, e)) = failure.into_inner().expect("workers have finished") {
        return Err(e);
    }
    if cancel.is_cancelled() {
        return Err(ExportError::Cancelled);
    }
    results.sort_by_key(|(i, _)| *i);
    Ok(results.into_iter().map(|(_, r)| r).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_come_back_in_order_and_errors_stop_the_work() {
        let cancel = CancellationToken::new();
        let out = run_pieces(100, 4, &cancel, |i| Ok(i * 2)).unwrap();
        assert_eq!(out, (0..100).map(|i| i * 2).collect::<Vec<_>>());
        let err = run_pieces(100, 3, &cancel, |i| {
            if i >= 40 {
                Err(ExportError::Verify {
                    path: "x".into(),
                    problem: format!("piece {i}"),
                })
            } else {
                Ok(i)
            }
        })
        .unwrap_err();
        assert!(err.to_string().contains("piece 4"), "{err}");
        cancel.cancel();
        assert!(matches!(
            run_pieces(10, 2, &cancel, Ok),
            Err(ExportError::Cancelled)
        ));
    }
}
