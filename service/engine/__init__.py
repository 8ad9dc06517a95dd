"""The generation engine: a llama.cpp model, its context and the continuous-batching scheduler.

One file per part (docs/engine.md explains how they work together):

- ``model.py``: a GGUF loaded through llama.cpp's C API (weights, vocabulary, context, template).
- ``scheduler.py``: the step loop, on one thread per model.
- ``admission.py``: the waiting requests, a queue per API key, admitted the keys in turn.
- ``sequence.py``: one choice being generated (detokenizer, stop strings, finish).
- ``choices.py``: the n choices of a request (seeds, one prefill shared by all).
- ``slots.py``: the sequence slots of the context, handed out and taken back.
- ``prefix_cache.py``: the prompt prefixes free slots keep, and when they may be reused.
- ``idle_prefill.py``: prefilling finished sequences' answers again while idle.
- ``speculation.py``: prompt-lookup guesses; ``speculative_step.py``: the step that checks them.
- ``batch.py``: a step's llama_decode (its token batch and its logits).
- ``sampling.py``: a step's rows through the Rust sampler, with the constraints' token masks.
- ``json_constraints.py``: JSON schemas compiled into llguidance grammars and token masks.
- ``openmp.py``: letting llama.cpp's worker threads go when there is nothing to decode.
- ``timings.py``: where the scheduler thread's time goes.
"""
