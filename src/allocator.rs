//! The process's memory allocator (mimalloc, the binary's and the pipeline bench's global
//! allocator): freed memory goes back to the system at once instead of a second later.
//!
//! mimalloc 3 keeps freed pages for a second (`purge_delay` 1000 ms) before returning them.
//! The relay and the fold free tens of megabytes a second, so a second of freed pages was a
//! fifth of the instance's peak resident memory: one command of a million products peaked
//! at 197–216 MB, and at 156–163 MB with immediate purging, for the same run time
//! (`cargo bench --bench pipeline`, `case=million`).

/// mimalloc's `mi_option_purge_delay` (the position in its `mi_option_e`, the same in
/// versions 2 and 3; `libmimalloc-sys` names it in neither).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Makes mimalloc return freed pages to the system as soon as they are free. Call first thing
/// in `main`.
pub fn return_freed_memory_at_once() {
    // SAFETY: sets one of mimalloc's option values; any value of this option is valid, and
    // the option table is mimalloc's own, safe to write from any thread at any time.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, 0) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_option_set_is_the_purge_delay() {
        // mimalloc 3's documented default purge delay: the position names that option.
        // SAFETY: reads an option value.
        assert_eq!(unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) }, 1000);
        return_freed_memory_at_once();
        // SAFETY: reads an option value.
        assert_eq!(unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) }, 0);
    }
}
