"""chatrpc: the Chat Completions API on local models.

`chatrpc.v1` holds the wire types generated from protos/chatrpc/v1/chat.proto (never edited by
hand) and `chatrpc.v1.wire`, the wire-level names the generated code does not carry; `chatrpc.cli`
is the `chatrpc` command.
"""
