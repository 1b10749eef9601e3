//! Many Raft groups appending at once, on real files with fsync: all groups
//! in one shared log ([`GroupLog`]) against one log per group (each its own
//! group commit and fsyncs). Prints entries per second and entries per
//! fsync for both, and their ratio.
//!
//!     cargo bench -p warren-storage --bench groups [-- GROUPS SECONDS DIR]
//!
//! DIR defaults to a directory under the system's temporary directory; put
//! it on the disk the broker's data lives on.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use warren_storage::groups::GroupLog;
use warren_storage::{FsBackend, FsyncPolicy, GroupCommit, Log, LogOptions};

const PAYLOAD: usize = 1024;

/// Each group has one writer thread that appends an entry and waits for it
/// to be durable before the next (a Raft leader with one entry in flight).
fn run(
    groups: u64,
    seconds: u64,
    append: Arc<dyn Fn(u64) -> u64 + Send + Sync>,
    durable: Arc<dyn Fn(u64) -> u64 + Send + Sync>,
) -> u64 {
    let stop = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..groups)
        .map(|group| {
            let (stop, total, append, durable) = (stop.clone(), total.clone(), append.clone(), durable.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let wal = append(group);
                    while durable(group) < wal {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                    total.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        let _ = thread.join();
    }
    total.load(Ordering::Relaxed)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let groups: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(100);
    let seconds: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let dir: PathBuf = args
        .get(2)
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join(format!("warren-groups-bench-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir);
    let payload = vec![7u8; PAYLOAD];

    // One shared log.
    let shared_dir = dir.join("shared");
    let next_index: Arc<Vec<AtomicU64>> = Arc::new((0..groups).map(|_| AtomicU64::new(1)).collect());
    let log =
        Arc::new(GroupLog::open(Arc::new(FsBackend), &shared_dir, LogOptions::default(), FsyncPolicy::Always, |_| {})?);
    let (l1, l2, p1, n1) = (log.clone(), log.clone(), payload.clone(), next_index.clone());
    let append: Arc<dyn Fn(u64) -> u64 + Send + Sync> = Arc::new(move |group| {
        let index = n1[warren_storage::usize_of(group)].fetch_add(1, Ordering::Relaxed);
        l1.append(group, [(index, 1, &p1[..])]).unwrap_or(u64::MAX)
    });
    let durable: Arc<dyn Fn(u64) -> u64 + Send + Sync> = Arc::new(move |_| l2.durable_index());
    let started = Instant::now();
    let shared_entries = run(groups, seconds, append, durable);
    let shared_rate = shared_entries as f64 / started.elapsed().as_secs_f64();
    let shared_syncs = log.stats().syncs;
    log.shutdown();

    // One log per group.
    let logs: Vec<Arc<GroupCommit>> = (0..groups)
        .map(|group| -> Result<Arc<GroupCommit>, Box<dyn std::error::Error>> {
            let (log, _) = Log::open(Arc::new(FsBackend), &dir.join(format!("own-{group}")), LogOptions::default())?;
            Ok(Arc::new(GroupCommit::start(log, FsyncPolicy::Always, |_| {})?))
        })
        .collect::<Result<_, _>>()?;
    let logs = Arc::new(logs);
    let (g1, g2, p2) = (logs.clone(), logs.clone(), payload.clone());
    let append: Arc<dyn Fn(u64) -> u64 + Send + Sync> =
        Arc::new(move |group| g1[warren_storage::usize_of(group)].append(&p2).unwrap_or(u64::MAX));
    let durable: Arc<dyn Fn(u64) -> u64 + Send + Sync> =
        Arc::new(move |group| g2[warren_storage::usize_of(group)].durable_index());
    let started = Instant::now();
    let own_entries = run(groups, seconds, append, durable);
    let own_rate = own_entries as f64 / started.elapsed().as_secs_f64();
    let own_syncs: u64 = logs.iter().map(|l| l.stats().syncs).sum();
    for log in logs.iter() {
        log.shutdown();
    }
    println!("{groups} groups, {PAYLOAD}-byte entries, one in flight per group, {seconds} s, fsync always");
    println!(
        "one shared log:     {shared_rate:>9.0} entries/s  {:>7.1} entries per fsync",
        shared_entries as f64 / shared_syncs.max(1) as f64
    );
    println!(
        "one log per group:  {own_rate:>9.0} entries/s  {:>7.1} entries per fsync",
        own_entries as f64 / own_syncs.max(1) as f64
    );
    println!("ratio: {:.1}x", shared_rate / own_rate.max(1.0));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
