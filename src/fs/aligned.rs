//! Page-aligned buffers for `O_DIRECT` IO on the backing file: the kernel
//! hands the daemon write data at an arbitrary offset in its request
//! buffer, which `O_DIRECT` refuses. One buffer per FUSE thread, reused.

use std::cell::RefCell;

/// Alignment `O_DIRECT` needs at most (the page size here).
const ALIGN: usize = 4096;

thread_local! {
    /// This thread's buffer; grown to the largest request seen.
    static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on a page-aligned slice of `len` bytes (contents unspecified).
pub fn with_buffer<T>(len: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
    BUFFER.with(|cell| {
        let mut vec = cell.borrow_mut();
        if vec.len() < len + ALIGN {
            vec.resize(len + ALIGN, 0);
        }
        let skip = vec.as_ptr().align_offset(ALIGN);
        f(&mut vec[skip..skip + len])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_are_aligned_and_sized() {
        for len in [1, 4096, 65536, 1 << 20] {
            with_buffer(len, |b| {
                assert_eq!(b.len(), len);
                assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            });
        }
    }
}
