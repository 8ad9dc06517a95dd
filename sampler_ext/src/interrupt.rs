//! A flag another thread raises to stop a running `llama_decode` early.
//!
//! llama.cpp's CPU backend calls a `ggml_abort_callback`, `bool (*)(void *)`, between the nodes of
//! the graph it computes, on the thread that called `llama_decode`, which holds no GIL then. A
//! Python callback would have to take the GIL at every node (hundreds per decode) and wait on the
//! asyncio loop; this one is a plain C function that reads an atomic, so the scheduler can hand
//! llama.cpp its address and the flag's, and the loop thread raises the flag without a lock.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether the flag at `data` is raised: the `ggml_abort_callback` llama.cpp calls.
///
/// # Safety
/// `data` must point to a live [`AtomicBool`] (the one a [`DecodeInterrupt`] owns).
pub unsafe extern "C" fn interrupt_requested(data: *mut c_void) -> bool {
    // SAFETY: the caller passes the address of the AtomicBool the DecodeInterrupt keeps alive.
    unsafe { (*(data as *const AtomicBool)).load(Ordering::Acquire) }
}

/// The flag, boxed so that its address stays the same while llama.cpp holds it.
#[derive(Debug, Default)]
pub struct DecodeInterrupt {
    flag: Box<AtomicBool>,
}

impl DecodeInterrupt {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn raise(&self) {
        self.flag.store(true, Ordering::Release);
    }

    pub fn clear(&self) {
        self.flag.store(false, Ordering::Release);
    }

    pub fn is_raised(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// The address to pass as the callback's `data`.
    pub fn data_address(&self) -> usize {
        &*self.flag as *const AtomicBool as usize
    }

    /// The address of [`interrupt_requested`], to pass as the callback.
    pub fn callback_address() -> usize {
        interrupt_requested as *const () as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_callback_reads_the_flag_through_its_address() {
        let interrupt = DecodeInterrupt::new();
        let data = interrupt.data_address() as *mut c_void;
        // SAFETY: `data` is the address of the flag `interrupt` owns, alive for this whole test.
        assert!(!unsafe { interrupt_requested(data) });
        interrupt.raise();
        assert!(unsafe { interrupt_requested(data) });
        assert!(interrupt.is_raised());
        interrupt.clear();
        assert!(!unsafe { interrupt_requested(data) });
    }

    #[test]
    fn the_address_does_not_move_with_the_owner() {
        let interrupt = DecodeInterrupt::new();
        let before = interrupt.data_address();
        let moved = interrupt;
        assert_eq!(moved.data_address(), before);
    }
}
