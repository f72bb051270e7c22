# The README's contract: `make demo` and `make test`; both depend on the idempotent `make setup`.
PY := .venv/bin/python
export OMP_NUM_THREADS ?= 2

.PHONY: setup demo test bench clean

setup:
	bash scripts/setup_venv.sh

# A fresh folder each time: Detectron2 appends to an existing log.txt and metrics.json.
demo: setup
	rm -rf output/demo
	$(PY) train_net.py --config-file configs/demo.yaml OUTPUT_DIR output/demo

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/data_loading.py
	$(PY) benchmarks/metrics_speed.py
	$(PY) benchmarks/mask_head_speed.py
	$(PY) benchmarks/train_speed.py
	$(PY) benchmarks/predict_speed.py

clean:
	rm -rf output .pytest_cache
