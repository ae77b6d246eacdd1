# Two commands: `make demo` (set up + run the main job on embedded data) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast slurm-start slurm-stop clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The whole chain on the embedded data (generated on first use): MoCo on the object images, export, then the
# pretrained vs a random-init backbone on MTL fine-tuning, probes, DAVIS and retrieval -> runs/demo/summary.*
demo: setup
	OMP_NUM_THREADS=2 $(PY) launch/demo.py --output-dir runs/demo
	@echo "TensorBoard: $(VENV)/bin/tensorboard --logdir runs/demo"

test: setup
	$(PY) -m pytest -q -rs --durations=15

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not slurm"

slurm-start:
	bash tests/slurm/cluster.sh start

slurm-stop:
	bash tests/slurm/cluster.sh stop

clean:
	rm -rf $(VENV) runs
