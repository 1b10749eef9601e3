//! Recovery of a damaged log: a segment file made of some valid records
//! followed by arbitrary bytes (a torn or corrupted tail), with one byte
//! optionally flipped, on the simulated disk. Opening must never panic;
//! whatever it recovers must read back with valid checksums.

#![no_main]

use std::path::Path;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use warren_storage::log::{encode_record, Log, LogOptions};
use warren_storage::sim::SimBackend;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let records = usize::from(data[0] % 8);
    let flip_at = usize::from(u16::from_be_bytes([data[1], data[2]]));
    let mut rest = &data[3..];
    let mut segment = Vec::new();
    for index in 1..=records as u64 {
        let take = rest.first().map_or(0, |n| usize::from(*n % 64)).min(rest.len().saturating_sub(1));
        let payload = rest.get(1..1 + take).unwrap_or_default();
        encode_record(&mut segment, index, 0, payload);
        rest = rest.get(1 + take..).unwrap_or_default();
    }
    segment.extend_from_slice(rest);
    if flip_at < segment.len() && data[0] & 0x80 != 0 {
        segment[flip_at] ^= 0x5a;
    }
    let sim = SimBackend::new();
    let dir = Path::new("/wal");
    sim.put_file(&dir.join(format!("{:020}.wal", 1)), &segment);
    if let Ok((log, _recovery)) = Log::open(Arc::new(sim), dir, LogOptions::default()) {
        for index in log.first_index()..log.next_index() {
            let entry = log.read(index).expect("a recovered entry reads back");
            assert_eq!(entry.index, index);
        }
    }
});
