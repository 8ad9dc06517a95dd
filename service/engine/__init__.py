"""The generation engine: a llama.cpp model, its context and the continuous-batching scheduler."""
