"""Adapters that put other protocols in front of the chatrpc gRPC service."""
