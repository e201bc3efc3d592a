# Two entry points for a new user (README "Quick start"):
#   make demo   set up .venv and train on the built-in phantom with `mlflow run` (ARCH=densenet)
#   make serve  serve models:/spinemri@champion on http://127.0.0.1:$(PORT) (after make demo)
#   make study-demo  the two-stage study-level pipeline on the same phantom (runs make demo first if needed)
#   make pacs-demo  a local Orthanc, phantom studies uploaded, `spinemri pacs` reports them as DICOM SR (after study-demo)
#   make test   set up .venv and run the test suite (what .ci/run calls)
#   make bench  the seven benchmarks of docs/benchmarks.md (BENCH_ARGS=--quick for a smoke run)
#   make ablation  the study pipeline and each addition cross-validated on a 120-study phantom (about an hour)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO_DIR ?= data/phantom
STUDIES  ?= 40
PYTEST_ARGS ?= -n 3 --dist loadgroup

.PHONY: venv demo study-demo pacs-demo serve serve-study test browser postgres orthanc bench ablation clean

venv: $(VENV)/.installed

# Reinstall whenever the dependency list changes.
$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "spinemri needs Python >= 3.11, found " + sys.version.split()[0]'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,export]'
	touch $@

# One tracking store shared by training, `mlflow ui` and serving.
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
ARCH ?= densenet

demo: venv
	@# The phantom is written once; delete $(DEMO_DIR) to regenerate it. The run logs the folder's
	@# absolute path, as `spinemri train` does, so that runs from either compare equal in the UI.
	@echo "[1/4] the phantom: $(STUDIES) synthetic studies in the RSNA layout ($(DEMO_DIR))"
	test -f $(DEMO_DIR)/train.csv || $(BIN)/spinemri data synth --out $(DEMO_DIR) --studies $(STUDIES) --seed 0
	@echo "[2/4] data check: the dataset read as training reads it"
	$(BIN)/spinemri data check $(DEMO_DIR)
	@echo "[3/4] data prepare: the preprocessed cache"
	$(BIN)/spinemri data prepare $(DEMO_DIR) --experiment quick
	@echo "[4/4] training $(ARCH) with mlflow run, judged against its floor and registered"
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/mlflow run . --env-manager local --experiment-name spinemri-classify \
		-P arch=$(ARCH) -P data_dir=$(abspath $(DEMO_DIR))
	@echo "See the runs: $(BIN)/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI), then open the run link above"

# Stage 1 localizers (one MLflow run per series type, through MLproject), then study-level
# prediction on the classifier's held-out studies, the competition score against the prior
# baseline, and the packaged two-stage model (registered as spinemri-study).
study-demo: venv
	@$(BIN)/spinemri registry list --name spinemri >/dev/null 2>&1 || $(MAKE) demo
	for series in sagittal_t2 sagittal_t1 axial_t2; do \
		PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/mlflow run . --env-manager local --experiment-name spinemri-localize \
			-e localize -P series=$$series -P data_dir=$(DEMO_DIR) || exit 1; \
	done
	$(BIN)/spinemri predict-study --data $(DEMO_DIR) --split test --out submission.csv
	$(BIN)/spinemri evaluate-study --data $(DEMO_DIR) --submission submission.csv
	$(BIN)/spinemri package-study --data $(DEMO_DIR) --split test

# The PACS loop on a local Orthanc (installed by `make orthanc` where it can be): phantom studies uploaded over
# its REST API, `spinemri pacs --once` reports each as a DICOM SR, the findings read back and printed.
# PACS_DEMO_ARGS=--keep leaves Orthanc running to browse the studies and reports in its web interface.
PACS_DEMO_ARGS ?=
pacs-demo: venv orthanc
	@$(BIN)/spinemri registry list --name spinemri-study >/dev/null 2>&1 || $(MAKE) study-demo
	$(BIN)/python -m spinemri.pacs.demo --data $(DEMO_DIR) $(PACS_DEMO_ARGS)

# Serve the registry's champion (after `make demo`); see README "Serving" for a curl request.
PORT ?= 5001
serve: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/mlflow models serve -m models:/spinemri@champion --env-manager local -h 127.0.0.1 -p $(PORT)

# Serve the two-stage study model (after make study-demo): a zipped DICOM study in, 25 rows out.
STUDY_PORT ?= 5002
serve-study: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/mlflow models serve -m models:/spinemri-study@champion --env-manager local -h 127.0.0.1 -p $(STUDY_PORT)

test: venv browser postgres orthanc
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# tests/tracking/test_ui_browser.py renders the MLflow UI in a headless Chromium: installed here when
# missing on Debian as root; elsewhere that test is skipped (or set SPINEMRI_CHROMIUM to a Chrome binary).
browser:
	@if [ -n "$$SPINEMRI_CHROMIUM" ] || command -v chromium || command -v chromium-browser || command -v google-chrome; \
	then :; elif command -v apt-get && [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium (apt-get) for the headless-browser check of the MLflow UI" >&2; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
			|| echo "note: installing chromium failed; the MLflow UI browser test will be skipped" >&2; \
	else echo "note: no chromium or google-chrome on PATH; the MLflow UI browser test will be skipped" >&2; fi >/dev/null

# The PostgreSQL tests (tuning and tracking shared by several machines) start their own server from initdb
# and pg_ctl: installed here when missing on Debian as root; elsewhere set SPINEMRI_PG_BINDIR or install it.
postgres:
	@if [ -n "$$SPINEMRI_PG_BINDIR" ] || command -v initdb || ls /usr/lib/postgresql/*/bin/initdb; \
	then :; elif command -v apt-get && [ "$$(id -u)" = 0 ]; then \
		echo "installing postgresql (apt-get) for the multi-machine tuning and tracking-server tests" >&2; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql \
			|| echo "note: installing postgresql failed; the PostgreSQL tests will be skipped" >&2; \
	else echo "note: no PostgreSQL (initdb) found; the PostgreSQL tests will be skipped" >&2; fi >/dev/null

# The PACS tests and `make pacs-demo` start a real Orthanc with its DICOMweb plugin: installed here when missing on
# Debian as root; elsewhere install Orthanc or set SPINEMRI_ORTHANC and SPINEMRI_ORTHANC_DICOMWEB.
orthanc:
	@if { [ -n "$$SPINEMRI_ORTHANC" ] || command -v Orthanc || test -x /usr/sbin/Orthanc; } && \
		{ [ -n "$$SPINEMRI_ORTHANC_DICOMWEB" ] || ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so; }; \
	then :; elif command -v apt-get && [ "$$(id -u)" = 0 ]; then \
		echo "installing orthanc and orthanc-dicomweb (apt-get) for the PACS tests" >&2; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb \
			|| echo "note: installing Orthanc failed; the PACS tests will be skipped" >&2; \
	else echo "note: no Orthanc found; the PACS tests will be skipped" >&2; fi >/dev/null

# One JSON line and one summary line per benchmark; stdout collects them, stderr has the logs.
BENCHMARKS ?= preprocess pipeline memory serve tune feed scale
BENCH_ARGS ?=
bench: venv
	@for name in $(BENCHMARKS); do $(BIN)/python bench/$$name.py $(BENCH_ARGS) || exit 1; done

# The ablation table of docs/study.md: localizers and classifiers cross-validated on the same folds.
ABLATION_ARGS ?=
ablation: venv
	$(BIN)/spinemri ablation $(ABLATION_ARGS)

clean:
	rm -rf $(VENV) data .pytest_cache
