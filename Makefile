# Two entry points that work on a fresh machine (Python 3.11, gcc, a local CPU wheel of torch):
#   make demo   -- create .venv, install, round-trip every built-in model through megatron, then
#                  verify them (HF vs megatron forwards) over a small parallel matrix
#   make test   -- both tested ends of megatron-core, one after the other (what .ci/run calls):
#     make test311 -- .venv: Python 3.11 + megatron-core 0.16.1 (the oldest supported), whole suite
#     make test312 -- .venv312: Python 3.12 (pyenv's 3.12.1, or PYTHON312=...) + megatron-core 0.19.2
#                     (the newest; 0.17+ need Python >= 3.12), the subset TESTS312 below. torch for
#                     cp312 on PyPI is the CUDA build only (~4.5 GB with its NVIDIA libraries); it runs
#                     on CPU. A Python 3.12 that cannot be found is an error, never a skipped leg.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?= -n 2

MCORE312 := megatron-core==0.19.2
VENV312  := .venv312
BIN312   := $(VENV312)/bin
STAMP312 := $(VENV312)/.installed
# The 3.12 / 0.19.2 leg: the files of every version-sensitive area -- dense, MoE (incl. DeepSeek-V3's
# MLA, the grouped-experts refusal), vision-language, LoRA, torch_dist, weight sync, CLI export --
# with the models that only repeat another's code path deselected (K312: llama and qwen2 repeat
# qwen3's dense path, mixtral repeats qwen3_moe's). Override either to run more, e.g. K312=.
TESTS312 ?= tests/test_roundtrip.py tests/test_families.py tests/test_moe.py tests/test_moe_families.py \
            tests/test_multimodal.py tests/test_lora.py tests/test_torch_dist.py tests/test_sync.py \
            tests/test_export.py tests/test_quant.py tests/test_deepseek_variants.py tests/test_moefam.py \
            tests/test_gpt_oss.py tests/test_gemma.py tests/test_phi3_glm4.py tests/test_mtp.py tests/test_isolate.py \
            tests/test_published.py tests/test_core_boundaries.py \
            tests/test_qwen3_next.py tests/test_qwen3_5.py tests/test_gemma3_vl.py tests/test_internvl.py \
            tests/test_vl_training.py tests/test_sync_transport.py tests/test_deepseek_v2_eps.py \
            tests/test_deepseek_yarn_mscale.py tests/test_scale_model.py tests/test_published_moe18.py tests/test_published_families.py tests/test_qwen3_5_moe_mtp.py tests/test_gdn_padding.py tests/test_finetune_train.py tests/test_dcp_io.py \
            tests/test_qwen3_next_mtp.py tests/test_megatron_lm_train.py tests/test_finetune_example.py \
            tests/test_qwen3_5_mtp.py tests/test_startup.py tests/test_shard_writer.py tests/test_reference_torch_paths.py tests/test_fp32_calibration.py \
            tests/test_fp8_model.py tests/test_fp8_cli.py tests/test_splice.py tests/test_unsplice.py
K312     ?= not llama and not qwen2-tiny and not mixtral

.PHONY: install install312 demo test test311 test312 clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned, from wherever pip finds it first (a local CPU wheel where pip's find-links
	# offers one; PyPI's CUDA build otherwise): README "Set-up" says how to get the CPU build elsewhere
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# Python 3.12: $(PYTHON312) if given, else pyenv's 3.12.1, else python3.12 on PATH.
$(STAMP312): pyproject.toml
	@py="$(PYTHON312)"; \
	if [ -z "$$py" ]; then \
	  root=$$(pyenv root 2>/dev/null || echo "$${PYENV_ROOT:-$$HOME/.pyenv}"); \
	  py="$$root/versions/3.12.1/bin/python3.12"; \
	  [ -x "$$py" ] || py=$$(command -v python3.12 || true); \
	fi; \
	if [ -z "$$py" ] || ! "$$py" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then \
	  echo "ERROR: the Python 3.12 leg (megatron-core 0.17+ needs Python >= 3.12) found no Python 3.12:" >&2; \
	  echo "  tried PYTHON312='$(PYTHON312)', pyenv's versions/3.12.1, python3.12 on PATH." >&2; \
	  echo "  Install it (pyenv install 3.12.1) or run: make test PYTHON312=/path/to/python3.12" >&2; \
	  exit 1; \
	fi; \
	echo "Python 3.12 leg: $$py"; \
	"$$py" -m venv $(VENV312)
	$(BIN312)/python -m pip install -q --upgrade pip
	# torch for cp312 is PyPI's CUDA build (runs on CPU); its MoE path in megatron-core needs triton
	$(BIN312)/python -m pip install -q torch==2.13.0
	$(BIN312)/python -m pip install -q '$(MCORE312)' -e '.[test]'
	$(BIN312)/python -c 'import megatron.core as m; v = m.__version__; print("megatron-core", v); assert v.split("+")[0] == "$(MCORE312)".split("==")[1], v'
	touch $(STAMP312)

install: $(STAMP)

install312: $(STAMP312)

demo: $(STAMP)
	$(BIN)/mcore-bridge demo
	$(BIN)/mcore-bridge verify --report reports/latest

test: test311 test312

test311: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test312: $(STAMP312)
	$(BIN312)/python -m pytest $(PYTEST_ARGS) $(if $(K312),-k '$(K312)') $(TESTS312)

clean:
	rm -rf $(VENV) $(VENV312) .pytest_cache .hypothesis
