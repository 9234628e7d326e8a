# ssl-xai-course — `make run` executes the whole course, `make test` checks it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))

.PHONY: setup run test lab bench student binder-check clean clean-all

## setup: create .venv and install requirements + course_utils (editable); skipped when nothing changed
setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "Installing the course environment into $(VENV) (first time: a few minutes; log in $(VENV)/install.log)"
	@$(BIN)/python -m pip install -r requirements.txt -e . > $(VENV)/install.log 2>&1 \
		|| { tail -n 30 $(VENV)/install.log; echo "pip failed: see $(VENV)/install.log"; exit 1; }
	@$(BIN)/python -c "import course_utils, torch; print('course_utils', course_utils.__version__, '| torch', torch.__version__)"
	@touch $(STAMP)

## run: execute every notebook in order at full settings, in place (figures go to figures/)
run: setup
	@test -n "$(NOTEBOOKS)" || { echo "no notebooks found in notebooks/"; exit 1; }
	@for nb in $(NOTEBOOKS); do \
		start=$$(date +%s); echo "== executing $$nb (full settings)"; \
		out=notebooks/.executing-$$(basename $$nb); \
		COURSE_QUICK=0 $(BIN)/papermill --cwd notebooks -k python3 --log-level WARNING "$$nb" "$$out" \
			|| { echo "   failed: $$nb is unchanged; the run with the error is in $$out"; exit 1; }; \
		mv "$$out" "$$nb"; \
		echo "   done in $$(( $$(date +%s) - start )) s"; \
	done

## test: unit tests + every notebook executed in quick mode (papermill), then nbval over the committed notebooks
test: setup
	COURSE_QUICK=1 $(BIN)/python -m pytest --durations=15 tests
	COURSE_QUICK=1 COURSE_FIGURES_DIR=$$(mktemp -d) $(BIN)/python -m pytest --nbval-lax --nbval-cell-timeout=600 -p no:cacheprovider \
		--ignore=notebooks/student notebooks

## student: exercise versions of the notebooks (solutions replaced by stubs) in notebooks/student/
student: setup
	$(BIN)/python -m course_utils.student

## lab: open the course in JupyterLab
lab: setup
	$(BIN)/jupyter lab notebooks

## bench: the performance table (ratios against the naive pipelines, same run)
bench: setup
	$(BIN)/python -m course_utils.bench

## binder-check: build a fresh venv from binder/ alone (as a Binder launch would), import course_utils and
## execute 00_welcome in it; minutes, not part of `make test` (which checks that binder/ agrees with requirements.txt)
BINDER_VENV := build/binder-venv
binder-check:
	rm -rf $(BINDER_VENV) && mkdir -p build
	$(PYTHON) -m venv $(BINDER_VENV)
	@echo "Installing binder/requirements.txt into $(BINDER_VENV) (log in build/binder-install.log)"
	@$(BINDER_VENV)/bin/python -m pip install --retries 1 --timeout 15 -r binder/requirements.txt \
		> build/binder-install.log 2>&1 || { tail -n 30 build/binder-install.log; exit 1; }
	PATH="$(abspath $(BINDER_VENV))/bin:$$PATH" bash binder/postBuild > build/binder-postbuild.log 2>&1
	cd build && $(abspath $(BINDER_VENV))/bin/python -c "import course_utils, torch, ipywidgets; \
		print('binder venv:', course_utils.__file__, '| torch', torch.__version__, '| ipywidgets', ipywidgets.__version__)"
	COURSE_QUICK=1 COURSE_FIGURES_DIR=$(abspath build)/binder-figures $(BINDER_VENV)/bin/python -m papermill --cwd notebooks \
		-k python3 --log-level WARNING notebooks/00_welcome.ipynb build/binder-00_welcome.ipynb
	@echo "binder-check passed: 00_welcome executed in the Binder environment (build/binder-00_welcome.ipynb)"

## clean: remove generated figures and caches (keeps .venv and data/cache)
clean:
	rm -rf figures .pytest_cache build *.egg-info notebooks/student
	find . -name __pycache__ -prune -not -path "./$(VENV)/*" -exec rm -rf {} +

## clean-all: also remove the environment and downloaded/trained data in data/cache
clean-all: clean
	rm -rf $(VENV) data/cache
