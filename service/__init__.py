"""chatrpc's gRPC service: the Chat Completions API on local models through llama.cpp."""
