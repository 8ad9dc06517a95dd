"""DecodeInterrupt: the C callback llama.cpp calls reads the flag that Python raises and clears."""

from __future__ import annotations

import ctypes
import threading

from sampler_ext import DecodeInterrupt

# ggml_abort_callback: bool (*)(void * data)
CALLBACK = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p)


def test_the_callback_reads_the_flag_it_is_given():
    interrupt = DecodeInterrupt()
    requested = CALLBACK(interrupt.callback)
    assert requested(interrupt.data) is False
    interrupt.raise_()
    assert interrupt.is_raised
    assert requested(interrupt.data) is True
    interrupt.clear()
    assert requested(interrupt.data) is False


def test_each_interrupt_has_its_own_flag_and_any_thread_may_raise_it():
    first, second = DecodeInterrupt(), DecodeInterrupt()
    assert first.data != second.data
    assert first.callback == second.callback  # one C function, the flag is its argument
    raiser = threading.Thread(target=second.raise_)
    raiser.start()
    raiser.join()
    requested = CALLBACK(first.callback)
    assert requested(second.data) is True
    assert requested(first.data) is False
