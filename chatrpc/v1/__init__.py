"""Generated from protos/chatrpc/v1/chat.proto by `make proto`; do not edit the *_pb2 files."""
