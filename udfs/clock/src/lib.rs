//! A module that declares itself nondeterministic: it gets the real clock, which the host's
//! tests compare with the frozen clock deterministic modules see, and real sleeps.

use std::time::{SystemTime, UNIX_EPOCH};

use riffle_udf::{Timestamp, export_udfs, scalar};

/// The current wall-clock time, once per row.
#[scalar(nondeterministic)]
pub fn now() -> Timestamp {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(-1);
    Timestamp(micros)
}

/// Really sleeps (this module lives in real time): the host bounds the sleep by the call's CPU
/// deadline.
#[scalar(nondeterministic)]
pub fn sleep_ms(ms: i64) -> i64 {
    std::thread::sleep(std::time::Duration::from_millis(ms as u64));
    ms
}

export_udfs!(now, sleep_ms);
