# Two commands on a fresh clone: `make test` and `make demo`. Both create .venv and install the pins first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed-requirements
export MPLBACKEND := Agg

# The demo: synthetic world -> tokenizer -> tokens -> DiT -> samples for three trajectories -> GIFs
DEMO := out/demo
WORLD := data/synthetic
VQ := $(DEMO)/vqvae
DIT_CKPT := $(DEMO)/results/000-DiT-demo/checkpoints/latest.pt
TRAJECTORIES := straight left right
SAMPLE_ARGS := --sampler ddim --num-sampling-steps 50 --cfg-scale 2 --num-samples 2 --seed 0

.PHONY: setup test test-all demo study forecast showcase clean-demo

setup: $(INSTALLED)

$(INSTALLED): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

test: setup
	$(PY) -m pytest -m "not slow" -q

test-all: setup
	$(PY) -m pytest -q

demo: setup $(DEMO)/vis/clip0.gif $(DEMO)/vis_reconstruction/clip0.gif
	@echo "demo done: GIFs under $(DEMO)/vis (samples) and $(DEMO)/vis_reconstruction (ground truth | reconstruction)"

$(WORLD)/nuscenes_infos_val_temporal_v3_scene.pkl:
	$(PY) -m dataset.synthetic --out $(WORLD)

# train_1 resumes from its latest.pth, so an interrupted demo picks up where it stopped
$(VQ)/.trained: $(WORLD)/nuscenes_infos_val_temporal_v3_scene.pkl
	$(PY) train_1.py --py-config config/demo_vqvae.py --work-dir $(VQ)
	touch $@

$(VQ)/tokens/meta.json: $(VQ)/.trained
	$(PY) step02.py --py-config config/demo_vqvae.py --work-dir $(VQ) --stride 4 --overwrite

$(DIT_CKPT): $(VQ)/tokens/meta.json
	rm -rf $(DEMO)/results
	$(PY) train_2.py --py-config config/demo_dit.py --data-path $(VQ)/tokens --results-dir $(DEMO)/results

$(DEMO)/samples/%.npz: $(DIT_CKPT)
	$(PY) sample.py --ckpt $(DIT_CKPT) --traj $* $(SAMPLE_ARGS) --out $@

$(DEMO)/vis/clip0.gif: $(foreach t,$(TRAJECTORIES),$(DEMO)/samples/$(t).npz)
	$(PY) visualize_demo.py --input $^ --num-clips 2 --out-dir $(DEMO)/vis

$(DEMO)/vis_reconstruction/clip0.gif: $(VQ)/.trained
	$(PY) visualize_demo.py --py-config config/demo_vqvae.py --work-dir $(VQ) --num-clips 1 \
		--out-dir $(DEMO)/vis_reconstruction

# The guidance and sampler study on the demo models (docs/evaluation.md); DDPM-1000 takes most of its time
FEATURES := $(DEMO)/features.pt

$(FEATURES): $(WORLD)/nuscenes_infos_val_temporal_v3_scene.pkl
	$(PY) -m evaluation.occ_features train --py-config config/demo_vqvae.py --out $@

study: $(DIT_CKPT) $(FEATURES)
	$(PY) -m evaluation.study --ckpt $(DIT_CKPT) --features $(FEATURES) --out-dir $(DEMO)/study

# Forecasting from 4 known frames (+1/+2/+3 s, two windows per val clip) and a 64-frame rollout (docs/evaluation.md)
forecast: $(DIT_CKPT)
	$(PY) -m evaluation.forecast --ckpt $(DIT_CKPT) --rollout-windows 2 --out $(DEMO)/forecast.json
	$(PY) sample.py --ckpt $(DIT_CKPT) --traj left --num-frames 64 $(SAMPLE_ARGS) --out $(DEMO)/rollout/left64.npz
	$(PY) visualize_demo.py --input $(DEMO)/rollout/left64.npz --num-clips 1 --out-dir $(DEMO)/vis_rollout

# The showcase (at most 60 min on a free 2-core CPU): stage 1 on a larger world, trained up to 25 min with its
# learning curve; stages 2 and 3 of the showcase come with the trajectory-control and forecasting issues
SHOWCASE := out/showcase
SHOWCASE_WORLD := data/synthetic_showcase
SHOWCASE_VQ := $(SHOWCASE)/vqvae

showcase: setup $(SHOWCASE)/vis_reconstruction/clip0.gif
	$(PY) -m evaluation.learning_curves $(SHOWCASE_VQ) --plot $(SHOWCASE)/tokenizer_curve.png
	@echo "showcase done: $(SHOWCASE)/vqvae/metrics.jsonl, $(SHOWCASE)/tokenizer_curve.png, $(SHOWCASE)/vis_reconstruction"

$(SHOWCASE_WORLD)/nuscenes_infos_val_temporal_v3_scene.pkl:
	$(PY) -m dataset.synthetic --out $(SHOWCASE_WORLD) --scenes 52 --val-scenes 4

$(SHOWCASE_VQ)/.trained: $(SHOWCASE_WORLD)/nuscenes_infos_val_temporal_v3_scene.pkl
	$(PY) train_1.py --py-config config/showcase_vqvae.py --work-dir $(SHOWCASE_VQ)
	touch $@

$(SHOWCASE)/vis_reconstruction/clip0.gif: $(SHOWCASE_VQ)/.trained
	$(PY) visualize_demo.py --py-config config/showcase_vqvae.py --work-dir $(SHOWCASE_VQ) --num-clips 1 \
		--out-dir $(SHOWCASE)/vis_reconstruction

clean-demo:
	rm -rf $(WORLD) $(DEMO)
