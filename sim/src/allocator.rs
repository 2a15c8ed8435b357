//! The heap: mimalloc, asked for word-aligned blocks through its plain entry points.
//!
//! The `mimalloc` crate's allocator passes every request to `mi_malloc_aligned`. In mimalloc 3 that call's fast path
//! serves only blocks of up to 1 KiB from a page with a free block; anything else (a larger block, or a small one
//! whose page is full) goes to a generic path that over-allocates by the alignment whenever the size is not a power
//! of two, and moves such blocks into the next size class. Every mimalloc block is aligned to the machine word, so a
//! request for no more than that needs no aligned entry point at all. In the 10,000-node benchmark's first minute,
//! the over-allocating path alone took 5% of the samples.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

/// What every block mimalloc hands out is aligned to.
const WORD: usize = size_of::<usize>();

pub struct WordAlignedMimalloc;

/// `plain(size)` when a word's alignment is enough, else `aligned(size, align)`.
#[inline]
fn by_alignment(
    layout: Layout,
    plain: unsafe extern "C" fn(usize) -> *mut c_void,
    aligned: unsafe extern "C" fn(usize, usize) -> *mut c_void,
) -> *mut u8 {
    // SAFETY: mimalloc's allocation functions take any size and a power-of-two alignment, which a `Layout` has.
    let block =
        unsafe { if layout.align() <= WORD { plain(layout.size()) } else { aligned(layout.size(), layout.align()) } };
    block.cast()
}

// SAFETY: each call forwards to the mimalloc function for the same job, with an alignment it guarantees (a word,
// which every block has, or the layout's own through the aligned entry points); `mi_free` takes both kinds.
unsafe impl GlobalAlloc for WordAlignedMimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        by_alignment(layout, libmimalloc_sys::mi_malloc, libmimalloc_sys::mi_malloc_aligned)
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        by_alignment(layout, libmimalloc_sys::mi_zalloc, libmimalloc_sys::mi_zalloc_aligned)
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        unsafe { libmimalloc_sys::mi_free(ptr.cast()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let block = if layout.align() <= WORD {
            unsafe { libmimalloc_sys::mi_realloc(ptr.cast(), new_size) }
        } else {
            unsafe { libmimalloc_sys::mi_realloc_aligned(ptr.cast(), new_size, layout.align()) }
        };
        block.cast()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of every size up to a few pages, and over-aligned ones, come back aligned, keep their contents
    /// through a reallocation, and zeroed ones are zero.
    #[test]
    fn blocks_are_aligned_and_keep_their_contents() {
        let heap = WordAlignedMimalloc;
        for size in (1..5000).step_by(37) {
            for align in [1, 2, 4, 8, 16, 64, 4096] {
                let layout = Layout::from_size_align(size, align).expect("a valid layout");
                // SAFETY: the layouts have a non-zero size; each block is used within its size and freed once.
                unsafe {
                    let block = heap.alloc(layout);
                    assert!(!block.is_null() && block.addr().is_multiple_of(align), "size {size} align {align}");
                    block.write_bytes(0xA5, size);
                    let grown = heap.realloc(block, layout, size * 3);
                    assert!(
                        grown.addr().is_multiple_of(align),
                        "realloc keeps the alignment: size {size} align {align}"
                    );
                    assert!((0..size).all(|i| *grown.add(i) == 0xA5), "realloc keeps the contents");
                    heap.dealloc(grown, Layout::from_size_align(size * 3, align).expect("valid"));
                    let zeroed = heap.alloc_zeroed(layout);
                    assert!(zeroed.addr().is_multiple_of(align) && (0..size).all(|i| *zeroed.add(i) == 0));
                    heap.dealloc(zeroed, layout);
                }
            }
        }
    }
}
