//! Fuzzes the qcow2 parser: header, L1 and L2 tables, the map and its zero ranges, and the
//! cluster decompressors, over arbitrary bytes taken as a whole file. Nothing may panic or
//! allocate beyond a small multiple of the input.
//!
//! cargo +nightly fuzz run qcow2_map agent/fuzz/corpus/qcow2_map -- -max_total_time=60
#![no_main]

use libfuzzer_sys::fuzz_target;
use slipway_agent::image::qcow2;

fuzz_target!(|data: &[u8]| {
    if let Ok(map) = qcow2::map_from_file(data) {
        let zeros = map.zero_ranges();
        let covered: u64 = zeros.iter().map(|z| z.1).sum::<u64>() + map.data_bytes();
        assert_eq!(covered, map.size, "data and zero ranges must tile the virtual size");
        let mut out = vec![0u8; map.cluster_size.min(1 << 16) as usize];
        for e in map.extents.iter().take(64) {
            if let qcow2::Extent::Compressed { host, len, .. } = *e {
                let (h, l) = (host as usize, len as usize);
                if let Some(input) = data.get(h..h.saturating_add(l).min(data.len())) {
                    let _ = qcow2::decompress_cluster(map.compression, input, &mut out);
                }
            }
        }
    }
});
