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

# Pretrain a small MoCo on the embedded scenes (generated on first use), export the backbone.
demo: setup
	$(PY) launch/pretrain.py --config configs/pretrain/demo.yaml --output-dir runs/demo
	$(PY) launch/export.py runs/demo/checkpoint.pth --format torchvision --out runs/demo/backbone_torchvision.pth
	@echo "TensorBoard: $(VENV)/bin/tensorboard --logdir runs/demo"

test: setup
	$(PY) -m pytest -q -rs

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not slurm"

slurm-start:
	bash tests/slurm/cluster.sh start

slurm-stop:
	bash tests/slurm/cluster.sh stop

clean:
	rm -rf $(VENV) runs
