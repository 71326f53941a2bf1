//! What every benchmark reports with: medians of repeated runs, so one noisy sample on a shared
//! machine does not decide a figure.

use std::time::Duration;

/// The median of `samples` (the upper one for an even count). Panics on no samples.
pub fn median<T: Ord + Copy>(mut samples: Vec<T>) -> T {
    assert!(!samples.is_empty(), "a median needs samples");
    samples.sort();
    samples[samples.len() / 2]
}

/// Runs `f` `rounds` times and returns the median wall time.
pub fn median_time(
    rounds: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Duration> {
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let start = std::time::Instant::now();
        f()?;
        times.push(start.elapsed());
    }
    Ok(median(times))
}
