# Two commands do everything on a fresh Debian machine with Python 3.11:
#   make demo   -- install, fine-tune the shipped base model on Fashion-MNIST subclasses, sample, evaluate, report
#   make test   -- install, run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= test,data,fid,lora,web,latent

comma := ,

.PHONY: setup data data-all browser test demo clean
setup: $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

$(VENV)/.installed-%: pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "installing efdit[$(EXTRAS)] into $(VENV) (pinned by constraints.txt)"
	@$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]" >$(VENV)/pip.log 2>&1; rc=$$?; \
	  grep -v "is ignored: it is neither" $(VENV)/pip.log || true; exit $$rc
	@$(PY) -c "import torch, efdit; print('efdit', efdit.__version__, 'torch', torch.__version__)"
	@touch $@

data:
	@bash scripts/install_data.sh

# Debian's Chromium + ChromeDriver for the browser test (tests/test_web.py), when missing and apt is usable;
# without them that test is skipped, saying so.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo="sudo -n"; t0=$$(date +%s); \
	  echo "installing Debian's chromium and chromium-driver (for the browser test)"; \
	  if $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  then echo "chromium installed in $$(( $$(date +%s) - t0 )) s"; \
	  else echo "could not install chromium: the browser test will be skipped"; fi; \
	else echo "no apt-get: the browser test will be skipped"; fi

data-all:
	@bash scripts/install_data.sh --emoji

test: setup data-all browser
	@$(PY) -m ruff check --quiet efdit tests benchmarks scripts || { echo "ruff: lint errors above"; exit 1; }
	@$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure"; exit 1; fi; exit $$rc

demo: setup data
	$(VENV)/bin/efdit demo

clean:
	rm -rf $(VENV) runs .cache
