//! Resident memory over time: a background thread samples the process's RSS once a second,
//! with the number of tokens scored so far, so a long run can show that its memory stays flat
//! (the paper's Figure 5 claim). Written as `memory.csv` next to the run's NLL log.
//!
//! ```no_run
//! use streamppl::memory::MemorySampler;
//! let bar = indicatif::ProgressBar::hidden();
//! let sampler = MemorySampler::start(bar.clone(), std::time::Duration::from_secs(1));
//! // ... the run advances `bar` ...
//! let samples = sampler.stop();
//! streamppl::records::memory::write_csv(&samples, "memory.csv".as_ref()).unwrap();
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;

use crate::records::memory::MemorySample;

/// Current resident set size of this process (Linux `VmRSS`), in MiB.
pub fn current_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Samples RSS on a background thread until stopped.
pub struct MemorySampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<MemorySample>>,
}

impl MemorySampler {
    /// Starts sampling now and then every `every`; `progress`'s position is the token count.
    pub fn start(progress: ProgressBar, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let started = Instant::now();
            let mut samples = Vec::new();
            // The first reading after one interval: a resumed run moves `progress` past its
            // checkpoint only once the engine has loaded it.
            let mut next = every;
            while !flag.load(Ordering::Relaxed) {
                if started.elapsed() >= next {
                    if let Some(rss_mib) = current_rss_mib() {
                        samples.push(MemorySample {
                            seconds: started.elapsed().as_secs_f64(),
                            tokens: progress.position(),
                            rss_mib,
                        });
                    }
                    next += every;
                }
                // Short sleeps, so that stopping never waits a whole interval.
                std::thread::sleep(Duration::from_millis(50).min(every));
            }
            samples
        });
        MemorySampler { stop, handle }
    }

    /// Stops the thread and returns its samples.
    pub fn stop(self) -> Vec<MemorySample> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::memory::{read_csv, write_csv};

    #[test]
    fn sampler_records_rss_and_progress_and_csv_round_trips() {
        let bar = ProgressBar::hidden();
        let sampler = MemorySampler::start(bar.clone(), Duration::from_millis(20));
        bar.set_position(7);
        std::thread::sleep(Duration::from_millis(120));
        let samples = sampler.stop();
        assert!(samples.len() >= 2, "{samples:?}");
        assert!(samples.iter().all(|s| s.rss_mib > 1.0));
        assert_eq!(samples.last().unwrap().tokens, 7);
        let path = std::env::temp_dir().join(format!("streamppl-mem-{}.csv", std::process::id()));
        write_csv(&samples, &path).unwrap();
        let back = read_csv(&path).unwrap();
        assert_eq!(back.len(), samples.len());
        assert_eq!(back[0].tokens, samples[0].tokens);
        std::fs::write(&path, "nope\n").unwrap();
        let err = read_csv(&path).unwrap_err().to_string();
        assert!(err.contains("memory.csv"), "{err}");
        let _ = std::fs::remove_file(&path);
    }
}
