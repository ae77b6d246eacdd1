# Two commands: `make demo` (set up + run the main job on embedded data) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# pytest-xdist workers of `make test` (one core each; whole files per worker: tests/conftest.py, SHARED_FILES)
TEST_WORKERS ?= 2
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast gpu-wheels slurm-start slurm-stop clean

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
	$(PY) -m pytest -q -rs --durations=15 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not slurm"

# Wheels the GPU device machine lacks (it has no network; its image has torch, numpy, cloudpickle, ...): the
# requirements.txt pins of kornia and submitit plus kornia's kornia_rs, built for the device's CPython, into the
# ignored folder .whl/ (~7 MiB), which travels with the run (carry .whl); launch/gpu_check.sh installs them.
GPU_PYTHON_VERSION ?= 3.12
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
GPU_WHEELS = $(shell grep -E '^(kornia|submitit)==' requirements.txt) kornia_rs==0.2.0

gpu-wheels:
	rm -rf .whl.part
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --implementation cp \
	    --python-version $(GPU_PYTHON_VERSION) $(addprefix --platform ,$(GPU_PLATFORMS)) -d .whl.part $(GPU_WHEELS)
	rm -rf .whl && mv .whl.part .whl  # one version of each: two stop the install there
	@ls -s .whl && du -sh .whl

# two hosts in network namespaces (docs/slurm.md); exit 3 = namespaces impossible here, one host started instead
slurm-start:
	bash tests/slurm/cluster.sh start || [ $$? = 3 ]

slurm-stop:
	bash tests/slurm/cluster.sh stop

clean:
	rm -rf $(VENV) runs .whl .whl.part
