# Everything runs from a local virtualenv that `make` builds from nothing.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
FACES   ?= ../shared/data/lfw

SD_DIR  ?= runs/prometheus_sd

.PHONY: test demo identity-term venv clean bench monitor train-cpu shards-id eval identity identity-embedder export gpu-check gpu-pack table1

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[train,test,export,faces]'
	$(BIN)/python -m launch.build_ops  # DeepSpeed's CPU comm op, ~25 s now rather than in the first run
	touch $(STAMP)

# System parts first (Prometheus and promtool from Debian's packages, as root), then the suite; under CI=true a
# part that cannot be installed, missing ../shared/data or any skip but a GPU test's is a failure (tests/conftest.py).
test: $(STAMP)
	$(BIN)/python -m tests.system
	$(BIN)/python -m pytest -q tests $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/facesr demo --faces $(FACES)

RUN     ?= runs/demo/runs/demo
SHARDS  ?= runs/demo/shards

# Issue 25's identity term (launch/configs/identity-term.yaml): a face recognizer on LFW + CelebA less the demo's
# val and test people (its face set prepped first, ~30 s), then the demo's stage 2 with the identity term through
# it, then the cascade's detail gate (stage 3), on the demo's shards (`make demo` first; ~26 min of training on 2
# cores); then its identity table beside the demo's model on the validation identities, every row (~15 min).
DEGRADATIONS ?= paper,decimate0,bicubic_aa,area,bilinear_noise,jpeg50,heldout
identity-term: $(STAMP)
	$(BIN)/facesr prep $(FACES) ../shared/data/celeba-ids runs/demo/shards-rec --split-by none --exclude $(SHARDS) \
		--members raw
	$(BIN)/facesr train --config launch/configs/identity-term.yaml
	$(BIN)/facesr eval identity $(RUN) runs/demo/runs/identity-term --judge dlib --workers 2 --manifest $(SHARDS) \
		--split val --degradations $(DEGRADATIONS) --drift-all --out runs/demo/runs/identity-term/identity-val

bench: $(STAMP)
	$(BIN)/facesr bench step --preset tiny
	$(BIN)/facesr bench step --preset paper
	$(BIN)/facesr bench data --faces $(FACES)

# On a GPU machine, even a bare one (python3 with a CUDA torch, no venv, no network; .gpupack/ copied beside):
# driver, the worker step under CUDA's sync check, step benchmarks eager / CUDA graphs / compiled, DeepSpeed on
# NCCL, GPU tests, and on a full host a train -> kill -> resume; bench/gpu/gpu_check.json after every stage.
gpu-check:
	$(PY) -m launch.gpu_check --out bench/gpu

# Here (PyPI and ../shared/data): what a bare GPU host lacks for gpu-check, into .gpupack/ (<= 64 MiB).
gpu-pack: $(STAMP)
	$(BIN)/python -m launch.gpu_pack --out .gpupack

# A short two-stage run on CelebA identities (the cpu.yaml smoke config).
train-cpu: $(STAMP)
	$(BIN)/facesr prep ../shared/data/celeba-ids data/shards/demo --shard-size 200
	$(BIN)/facesr train --config launch/configs/cpu.yaml

# Shards for priors that recognize (cpu-2h.yaml): LFW + CelebA identities with >= 10 images are prior
# classes, 3 images of each held out (split prior_val) to score them on (`facesr eval priors RUN`).
shards-id: $(STAMP)
	$(BIN)/facesr prep $(FACES) ../shared/data/celeba-ids runs/id/shards --min-images 10 --prior-holdout 3

eval: $(STAMP)
	$(BIN)/facesr eval quality $(RUN) --data $(FACES) --manifest $(SHARDS) --split test --limit 500 --grid 6 --out $(RUN)/eval

# The paper's Table 1 at CPU scale (issue 17): C-SRIP, the cascade with SSIM only, SRCNN, VDSR, SRGAN, ℓp on
# SqueezeNets trained here on whole faces (its own stage 1), ℓp on the identity priors' features and ℓp on ImageNet
# SqueezeNet's, each stage 2 of launch/configs/table1-<peer>.yaml (the demo's shards and priors: run `make demo`
# first; the same 1,920 steps at batch 8), then all scored in one table on every
# face of the LFW test identities, and Fig. 3's grid (x8). A finished run is skipped, an interrupted one resumes;
# TABLE1="srcnn vdsr" trains and scores a subset. lp (ImageNet) is in only when squeezenet1_1-b8a52dc0.pth is in
# torch hub's cache or can be downloaded there (README).
LP       = $(shell $(BIN)/python -c "from facesr.weights import squeezenet_file; squeezenet_file('imagenet')" >/dev/null 2>&1 && echo lp)
TABLE1  ?= csrip ssim srcnn vdsr srgan lp-faces lp-priors $(LP)

table1: $(STAMP)
	@case " $(TABLE1) " in *" lp "*) ;; *) echo "table1: without lp (ImageNet SqueezeNet weights absent and not downloadable; README)";; esac
	for p in $(TABLE1); do $(BIN)/facesr train --config launch/configs/table1-$$p.yaml || exit 1; done
	$(BIN)/facesr eval quality $(addprefix runs/table1/,$(TABLE1)) --data $(FACES) --manifest $(SHARDS) \
		--split test --grid 6 --scales x8 --out runs/table1/eval

# LFW verification judged by dlib's pretrained recognizer (the dlib extra, installed by `make venv`).
identity: $(STAMP)
	$(BIN)/facesr eval identity $(RUN) --judge dlib --manifest $(SHARDS) --split test --out $(RUN)/identity

# The same judged by the ResNet facesr trains itself on identities outside the pairs.
runs/embedder/embedder.safetensors: $(STAMP)
	$(BIN)/facesr eval embedder $@

identity-embedder: runs/embedder/embedder.safetensors
	$(BIN)/facesr eval identity $(RUN) --embedder $< --manifest $(SHARDS) --split test --out $(RUN)/identity-embedder

export: $(STAMP)
	$(BIN)/facesr export $(RUN) $(RUN)/export

# Prometheus on loopback, scraping every exporter of every run: those registered with the Ray cluster's target
# registry (HTTP SD; the cluster at $RAY_ADDRESS, else one started here with `ray start`, e.g. on the head: no
# shared folder needed) and those listed in $(SD_DIR) (file_sd: one machine or a shared mount).
monitor: $(STAMP)
	$(BIN)/python -m cluster.monitor --sd-dir $(SD_DIR) --install

clean:
	rm -rf $(VENV) runs out
