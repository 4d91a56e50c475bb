//! libtorch errors reach Rust as panics (tch's infallible ops unwrap them). Where work must go on
//! after one (the server's worker, a CUDA graph recording that fails), the panic is caught as its
//! message.

use std::panic::{catch_unwind, AssertUnwindSafe};

/// `f()`, or the message of the panic it raised.
pub fn caught<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into())
    })
}
