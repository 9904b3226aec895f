//! `tern_protocol::shipping::admit`, the rule by which a broker stores
//! shipped entries, over arbitrary `done`, `base`, `handed_up_to` and seqs
//! (contiguous runs near 0 and near `u64::MAX`, or any list).
//!
//! Asserts: no panic (no overflow: fuzz builds keep debug assertions), and
//! the contract of protocol/src/shipping.rs (see `check_admit`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_fuzz::{check_admit, Input};

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mode = input.u8();
    let anchor = match mode & 3 {
        0 => 0,
        1 => u64::MAX - 300,
        _ => input.u64(),
    };
    let near = |v: u64| anchor.wrapping_add(v & 0x1ff);
    let done = near(input.u64());
    let base = if mode & 4 == 0 { near(input.u64()) } else { input.u64() };
    let handed_up_to = match mode & 0x18 {
        0 => 0,
        0x08 => near(input.u64()),
        _ => input.u64(),
    };
    let seqs: Vec<u64> = if mode & 0x20 == 0 {
        let first = near(input.u64());
        let n = usize::from(input.u8());
        (0..n as u64).map_while(|i| first.checked_add(i)).collect()
    } else {
        input.rest().chunks(8).map(|c| near(c.iter().fold(0, |a, b| a << 8 | u64::from(*b)))).collect()
    };
    check_admit(done, base, handed_up_to, &seqs);
});
