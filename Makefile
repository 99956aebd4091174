# heloguard: two commands on a fresh Debian machine.
#   make run    start the milter with the embedded defaults
#   make test   install what the tests need, then lint, type-check and test
#
# milter/ is the import package `heloguard` (pymilter owns the name `milter`).
# PYTHONSAFEPATH keeps the checkout's own folders off sys.path, so that
# `import milter` always finds pymilter's extension, never our folder.
export PYTHONSAFEPATH := 1

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Debian packages: what building pymilter needs, and what the tests run.
DEB_BUILD := libmilter-dev gcc
# Postfix is installed; Sendmail conflicts with it, so the tests unpack Debian's
# sendmail packages into a private root (.cache/) and need only its libraries.
# NSD (a third-party DNS server for tests/test_foreign_dns.py) is installed by
# that test itself, with service start-up blocked so it never takes port 53.
# man-db and groff-base: tests/test_docs.py renders the man pages.
# postgresql: the greylist's PostgreSQL backend is tested against a real server,
# a throwaway cluster the tests start from its binaries (tests/pgserver.py).
DEB_TEST  := postfix libsasl2-modules iproute2 util-linux sqlite3 man-db groff-base \
             libdb5.3 libldap-2.5-0 libnsl2 libsasl2-2 libssl3 postgresql \
             chromium fonts-dejavu-core
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all venv run test lint type unit bench clean deps-build deps-test soak

all: test

# Install the Debian packages named in $(1) that are missing (no-op when all are there).
define apt_ensure
	@missing=""; for p in $(1); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  echo "postfix postfix/main_mailer_type select No configuration" | $(SUDO) debconf-set-selections; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi
endef

deps-build:
	$(call apt_ensure,$(DEB_BUILD))
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { $(call apt_ensure,python3-venv python3-dev) ; }

deps-test: deps-build
	$(call apt_ensure,$(DEB_TEST))

# The strict editable install links each module file: reinstall when the set of
# files changes (not on every edit).
MODULES := $(sort $(wildcard milter/*.py milter/*.toml rules/*.py))
_ := $(shell mkdir -p build && echo '$(MODULES)' | cmp -s - build/.modules || echo '$(MODULES)' > build/.modules)

# pymilter is built against our own libmilter, a thread per connection
# (contrib/libmilter.py says why), found through its run path; never from
# pip's wheel cache, which may hold one linked to Debian's worker pool.
LIBMILTER := $(CURDIR)/$(VENV)/lib/libmilter

$(STAMP): pyproject.toml build/.modules contrib/libmilter.py | deps-build
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python contrib/libmilter.py $(LIBMILTER)
	LDFLAGS="-L$(LIBMILTER) -Wl,-rpath,$(LIBMILTER)" $(BIN)/pip install -q --no-cache-dir \
		--no-binary pymilter --no-deps --force-reinstall 'pymilter>=1.0.5'
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=strict
	touch $@

venv: $(STAMP)

# The embedded defaults, with the socket and state under the checkout.
run: $(STAMP)
	@mkdir -p var
	$(BIN)/heloguard serve --socket unix:$(CURDIR)/var/heloguard.sock \
		--greylist $(CURDIR)/var/greylist.sqlite

lint: $(STAMP)
	$(BIN)/ruff check milter rules tests bench contrib
	$(BIN)/ruff format --check milter rules tests bench contrib

type: $(STAMP)
	$(BIN)/mypy -p heloguard
	$(BIN)/mypy tests bench contrib/libmilter.py

unit: $(STAMP)
	$(BIN)/pytest -q -m 'not integration'

test: $(STAMP) deps-test lint type
	$(BIN)/pytest -q

# The protocol benchmark builds a C filter on libmilter; the Postfix one runs the
# private Postfix of the tests: the same Debian packages as the tests, and perf
# for the system-call counts (bench/syscalls.py).
bench: $(STAMP) deps-test
	$(call apt_ensure,linux-perf)
	$(BIN)/python bench/run.py

# Not in CI: 50,000 sessions at concurrency 256 with 5 % random DNS faults (docs/security.md).
soak: $(STAMP)
	$(BIN)/python bench/soak.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
