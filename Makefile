# Two commands for a fresh machine: `make serve` and `make test`. Both create .venv and install
# everything into it (the Rust extension is built by maturin through pip).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
RUST_SOURCES := $(shell find sampler_ext/src -name '*.rs') sampler_ext/Cargo.toml Cargo.toml Cargo.lock
PROTO := protos/chatrpc/v1/chat.proto

.PHONY: setup serve test lint format test-rust test-python proto proto-check openapi openapi-check clean

setup: $(INSTALLED)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

# Editable install: service/, adapters/ and chatrpc/ are used from the checkout; sampler_ext is built.
$(INSTALLED): $(PY) pyproject.toml $(RUST_SOURCES)
	$(PY) -m pip install -e ".[test]"
	touch $@

serve: setup
	$(VENV)/bin/chatrpc serve

test: setup proto-check openapi-check lint test-rust test-python

# The project holds itself to its formatters and linters (settings in pyproject.toml; rustfmt and
# clippy defaults for the crate). `make format` applies the formatters.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	cargo fmt --check
	cargo clippy --release --all-targets -- -D warnings

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	cargo fmt

test-rust:
	cargo test --release

test-python: setup
	$(PY) -m pytest

# Regenerate the committed stubs in chatrpc/v1 from the .proto.
proto: setup
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO)

# Fails when the committed stubs are not what the .proto generates.
proto-check: setup
	@scratch=$$(mktemp -d) && \
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=$$scratch --pyi_out=$$scratch --grpc_python_out=$$scratch $(PROTO) && \
	for f in chat_pb2.py chat_pb2.pyi chat_pb2_grpc.py; do \
		diff -q $$scratch/chatrpc/v1/$$f chatrpc/v1/$$f >/dev/null || { echo "chatrpc/v1/$$f is stale: run 'make proto'"; rm -rf $$scratch; exit 1; }; \
	done; rm -rf $$scratch; echo "generated stubs match $(PROTO)"

# Regenerate the committed OpenAPI document, which the REST adapter serves at GET /openapi.json,
# from the .proto and the adapter's own tables (adapters/rest/openapi.py).
openapi: setup
	$(PY) -m adapters.rest.openapi

# Fails when the committed OpenAPI document is not what adapters/rest/openapi.py builds.
openapi-check: setup
	$(PY) -m adapters.rest.openapi --check

clean:
	rm -rf $(VENV) target
