"""chatrpc: the Chat Completions API on local models.

`chatrpc.v1` holds the wire types generated from protos/chatrpc/v1/chat.proto (never edited by
hand); `chatrpc.cli` is the `chatrpc` command.
"""
