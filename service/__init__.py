"""chatrpc's gRPC service: the Chat Completions API on local models through llama.cpp.

- ``server.py``: the grpc.aio server (health, reflection, shutdown); ``auth.py``: API keys, and whose request a call is.
- ``servicer.py``: the RPCs, each a few lines: check, run on the engine, answer.
- ``errors.py``: every error the service reports and its one mapping onto gRPC status codes.
- ``request.py``: the checks of a request and the generation it becomes.
- ``chat_template.py``, ``tool_calls.py``: messages and tools into the prompt, and calls back out.
- ``detokenizer.py``, ``stop_strings.py``: tokens into text, and where a stop string ends it.
- ``choice_output.py``, ``responses.py``: a choice's text as content or tool calls, and the
  response messages.
- ``models.py``: the models served and their engines; ``engine_settings.py``: how each engine is
  sized (the engine flags' defaults); ``engine/``: generation.
"""
