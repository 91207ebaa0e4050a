# make demo: venv, install, a real loopback migration, verified.   make test: the whole suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: all venv certs demo test fuzz bench iperf3 qemu clean

all: test

# A fresh Debian python3 may lack ensurepip (package python3-venv): install it when we can.
$(STAMP): pyproject.toml
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  echo "python3 -m venv failed; installing python3-venv with apt-get" >&2; \
	  rm -rf $(VENV); apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && \
	  $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,plot]'
	@touch $@

venv: $(STAMP)

# A development CA, receiver and sender certificates under certs/ (QEMU's file names), made
# once; the keys are never committed. `multifd-certs --force` replaces them.
CERTS := certs/ca-cert.pem certs/server-cert.pem certs/server-key.pem \
         certs/client-cert.pem certs/client-key.pem
certs: $(CERTS)
$(CERTS) &: | $(STAMP)
	$(VENV)/bin/multifd-certs certs --server-name localhost --server-name 127.0.0.1 \
	  --server-name ::1

demo: venv certs
	$(PY) -m multifd.tools.demo --tls certs

# Two workers: most of the suite waits on timeouts and peers, not on the CPU.
test: venv qemu iperf3
	$(PY) -m pytest -q -n 2

# The wire decoders on hostile bytes, far longer than in make test (new inputs every run).
FUZZ_EXAMPLES ?= 20000
fuzz: venv
	MULTIFD_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q --timeout 3600 tests/test_wire.py \
	  tests/test_qemu_wire.py

iperf3:
	@command -v iperf3 >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iperf3 >/dev/null; }

# A real QEMU for the tests that migrate one (multifd.tools.qemu). All it opens for them comes
# from hard dependencies (seabios: bios-256k.bin; qemu-system-data: kvmvapic.bin;
# qemu-system-common: the TCG module); the Recommends (GUI, audio, block drivers, OVMF) are unused.
# binutils assembles the live benchmark's guest (multifd/tools/dirtyguest.S) for the test that
# checks the bytes multifd ships against it.
qemu:
	@command -v qemu-system-x86_64 >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	  qemu-system-x86 >/dev/null; }
	@command -v as >/dev/null && command -v ld >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq binutils >/dev/null; }

# The standard matrix, with QEMU and live precopy (multifd's and QEMU's) beside it: the table,
# its JSON and plots in bench-results/ (about 10 minutes on a 2-core machine).
BENCH_ARGS ?= --size 1G --channels 1,4,8 --tls off,on --image random,mixed,zero \
  --mode file,discard --repeat 3 --qemu --live-rates 0,100MB/s,400MB/s
bench: venv iperf3 qemu
	mkdir -p bench-results
	$(VENV)/bin/multifd-bench $(BENCH_ARGS) --json bench-results/bench.json \
	  --plot bench-results/bench.png > bench-results/bench.md
	cat bench-results/bench.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis bench-results
