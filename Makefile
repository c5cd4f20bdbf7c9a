# Everything runs from a local virtualenv that `make` builds from nothing.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
FACES   ?= ../shared/data/lfw

SD_DIR  ?= runs/prometheus_sd

.PHONY: test demo venv clean bench monitor

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,export]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/facesr demo --faces $(FACES)

bench: $(STAMP)
	$(BIN)/facesr bench step --preset tiny
	$(BIN)/facesr bench step --preset paper

# Prometheus on loopback, scraping every exporter listed in $(SD_DIR) (file_sd).
monitor: $(STAMP)
	$(BIN)/python -m cluster.monitor --sd-dir $(SD_DIR) --install

clean:
	rm -rf $(VENV) runs out
