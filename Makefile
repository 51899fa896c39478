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
SAMPLE_ARGS := --sampler ddim --num-sampling-steps 50 --cfg-scale 1 --static-warp hard --voxel-warp --num-samples 4 \
	--seed 0

.PHONY: setup test test-all demo study forecast showcase showcase-fill-head clean-demo

setup: $(INSTALLED)

$(INSTALLED): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

test: setup
	$(PY) -m pytest -m "not slow" -q

test-all: setup
	$(PY) -m pytest -q

demo: setup $(DEMO)/vis/clip0.gif $(DEMO)/vis_reconstruction/clip0.gif $(DEMO)/control.json
	@echo "demo done: GIFs under $(DEMO)/vis (samples) and $(DEMO)/vis_reconstruction (ground truth | reconstruction), trajectory control in $(DEMO)/control.json (as decoded: control_decoded.json)"

# a counterfactual town: every start driven straight, left and right (12 train scenes, 6 val)
$(WORLD)/nuscenes_infos_val_temporal_v3_scene.pkl:
	$(PY) -m dataset.synthetic --out $(WORLD) --counterfactual --scenes 6 --val-scenes 2

# train_1 resumes from its latest.pth, so an interrupted demo picks up where it stopped
$(VQ)/.trained: $(WORLD)/nuscenes_infos_val_temporal_v3_scene.pkl
	$(PY) train_1.py --py-config config/demo_vqvae.py --work-dir $(VQ)
	touch $@

$(VQ)/tokens/meta.json: $(VQ)/.trained
	$(PY) step02.py --py-config config/demo_vqvae.py --work-dir $(VQ) --stride 4 --batch-size 4 --overwrite

$(DIT_CKPT): $(VQ)/tokens/meta.json
	rm -rf $(DEMO)/results
	$(PY) train_2.py --py-config config/demo_dit.py --data-path $(VQ)/tokens --results-dir $(DEMO)/results

$(DEMO)/samples/%.npz: $(DIT_CKPT)
	$(PY) sample.py --ckpt $(DIT_CKPT) --traj $* $(SAMPLE_ARGS) --out $@

# control of the samples (their static voxels moved along the trajectory), and of the clips as decoded
$(DEMO)/control.json: $(foreach t,$(TRAJECTORIES),$(DEMO)/samples/$(t).npz)
	$(PY) -m evaluation.control --samples $^ --decoded --out $(DEMO)/control_decoded.json
	$(PY) -m evaluation.control --samples $^ --out $@

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

# The showcase (at most 60 min on a free 2-core CPU): a counterfactual town (every start driven straight, left and
# right), stage 1 trained 15 min with its learning curve, tokens, the DiT of config/showcase_dit.py, 8 samples per
# manoeuvre (same seeds, the static warp held open, static voxels moved along the trajectory after decoding) scored
# for trajectory control at guidance 1 / 2 / 4 / 7.5 (cfg<g>.json, and cfg<g>_decoded.json for the clips as
# decoded), the forecast protocol (two windows: +1 / +2 / +3 s and the seams) and one forecast beside its ground
# truth, a 64-frame rollout under the left preset (its seams and heading, also as decoded) and GIFs
SHOWCASE := out/showcase
SHOWCASE_WORLD := data/synthetic_showcase
SHOWCASE_VQ := $(SHOWCASE)/vqvae
SHOWCASE_DIT := $(SHOWCASE)/results/000-DiT-demo/checkpoints/latest.pt
GUIDANCE := 1 2 4 7.5
SHOWCASE_SAMPLE_ARGS := --sampler ddim --num-sampling-steps 50 --static-warp hard --voxel-warp --num-samples 8 --seed 0

showcase: setup $(SHOWCASE)/vis_reconstruction/clip0.gif $(foreach g,$(GUIDANCE),$(SHOWCASE)/control/cfg$(g).json) \
		$(SHOWCASE)/vis/clip0.gif $(SHOWCASE)/forecast.json $(SHOWCASE)/vis_forecast/clip0.gif \
		$(SHOWCASE)/vis_rollout/clip0.gif
	$(PY) -m evaluation.learning_curves $(SHOWCASE_VQ) --plot $(SHOWCASE)/tokenizer_curve.png
	@echo "showcase done: $(SHOWCASE)/control/cfg*.json (trajectory control), $(SHOWCASE)/forecast.json, $(SHOWCASE)/rollout/*.json, GIFs under $(SHOWCASE)/vis*"

$(SHOWCASE_WORLD)/nuscenes_infos_val_temporal_v3_scene.pkl:
	$(PY) -m dataset.synthetic --out $(SHOWCASE_WORLD) --counterfactual --scenes 20 --val-scenes 4

$(SHOWCASE_VQ)/.trained: $(SHOWCASE_WORLD)/nuscenes_infos_val_temporal_v3_scene.pkl
	$(PY) train_1.py --py-config config/showcase_vqvae.py --work-dir $(SHOWCASE_VQ)
	touch $@

$(SHOWCASE)/vis_reconstruction/clip0.gif: $(SHOWCASE_VQ)/.trained
	$(PY) visualize_demo.py --py-config config/showcase_vqvae.py --work-dir $(SHOWCASE_VQ) --num-clips 1 \
		--out-dir $(SHOWCASE)/vis_reconstruction

$(SHOWCASE_VQ)/tokens/meta.json: $(SHOWCASE_VQ)/.trained
	$(PY) step02.py --py-config config/showcase_vqvae.py --work-dir $(SHOWCASE_VQ) --stride 8 --batch-size 4 --overwrite

$(SHOWCASE_DIT): $(SHOWCASE_VQ)/tokens/meta.json
	rm -rf $(SHOWCASE)/results
	$(PY) train_2.py --py-config config/showcase_dit.py --data-path $(SHOWCASE_VQ)/tokens --results-dir $(SHOWCASE)/results

# samples: $(SHOWCASE)/samples/cfg<g>/<manoeuvre>.npz, scored by evaluation/control.py
$(SHOWCASE)/control/cfg%.json: $(SHOWCASE_DIT)
	for traj in $(TRAJECTORIES); do $(PY) sample.py --ckpt $(SHOWCASE_DIT) --traj $$traj --cfg-scale $* \
		$(SHOWCASE_SAMPLE_ARGS) --out $(SHOWCASE)/samples/cfg$*/$$traj.npz || exit 1; done
	$(PY) -m evaluation.control --samples $(foreach t,$(TRAJECTORIES),$(SHOWCASE)/samples/cfg$*/$(t).npz) --decoded \
		--out $(SHOWCASE)/control/cfg$*_decoded.json
	$(PY) -m evaluation.control --samples $(foreach t,$(TRAJECTORIES),$(SHOWCASE)/samples/cfg$*/$(t).npz) --out $@

$(SHOWCASE)/vis/clip0.gif: $(SHOWCASE)/control/cfg2.json
	$(PY) visualize_demo.py --input $(foreach t,$(TRAJECTORIES),$(SHOWCASE)/samples/cfg2/$(t).npz) --num-clips 2 \
		--out-dir $(SHOWCASE)/vis

$(SHOWCASE)/forecast.json: $(SHOWCASE_DIT)
	$(PY) -m evaluation.forecast --ckpt $(SHOWCASE_DIT) --num-clips 12 --rollout-windows 2 --out $@

# one val clip forecast from its first 4 frames (as the forecast protocol samples), beside its ground truth
$(SHOWCASE)/vis_forecast/clip0.gif: $(SHOWCASE_DIT)
	$(PY) -m evaluation.forecast --ckpt $(SHOWCASE_DIT) --write-clips $(SHOWCASE)/forecast_clip/ground_truth.npz \
		--num-clips 1
	$(PY) sample.py --ckpt $(SHOWCASE_DIT) --context $(SHOWCASE)/forecast_clip/ground_truth.npz --context-frames 4 \
		--traj context --sampler ddim --num-sampling-steps 50 --cfg-scale 1 --voxel-warp --seed 0 \
		--out $(SHOWCASE)/forecast_clip/forecast.npz
	$(PY) visualize_demo.py --input $(SHOWCASE)/forecast_clip/ground_truth.npz $(SHOWCASE)/forecast_clip/forecast.npz \
		--out-dir $(SHOWCASE)/vis_forecast

$(SHOWCASE)/vis_rollout/clip0.gif: $(SHOWCASE_DIT)
	$(PY) sample.py --ckpt $(SHOWCASE_DIT) --traj left --num-frames 64 --sampler ddim --num-sampling-steps 25 \
		--cfg-scale 2 --static-warp hard --voxel-warp --seed 0 --out $(SHOWCASE)/rollout/left64.npz
	$(PY) -m evaluation.forecast --seams $(SHOWCASE)/rollout/left64.npz --out $(SHOWCASE)/rollout/seams.json
	$(PY) -m evaluation.forecast --seams $(SHOWCASE)/rollout/left64.npz --decoded \
		--out $(SHOWCASE)/rollout/seams_decoded.json
	$(PY) -m evaluation.control --samples $(SHOWCASE)/rollout/left64.npz --names left \
		--out $(SHOWCASE)/rollout/control.json
	$(PY) -m evaluation.control --samples $(SHOWCASE)/rollout/left64.npz --names left --decoded \
		--out $(SHOWCASE)/rollout/control_decoded.json
	$(PY) visualize_demo.py --input $(SHOWCASE)/rollout/left64.npz --num-clips 1 --out-dir $(SHOWCASE)/vis_rollout

# After the showcase (outside its 60 min: about 8 min more): the learnt fill of the new space (evaluation/fill_head.py),
# trained on the showcase world's train split, and the forecast protocol again with it as a method
showcase-fill-head: setup $(SHOWCASE)/forecast_fill_head.json

$(SHOWCASE)/fill_head.pt: $(SHOWCASE_WORLD)/nuscenes_infos_val_temporal_v3_scene.pkl
	$(PY) -m evaluation.fill_head --py-config config/showcase_vqvae.py --context-frames 4 --stride 4 --out $@

$(SHOWCASE)/forecast_fill_head.json: $(SHOWCASE)/fill_head.pt $(SHOWCASE_DIT)
	$(PY) -m evaluation.forecast --ckpt $(SHOWCASE_DIT) --num-clips 12 --rollout-windows 2 \
		--fill-head $(SHOWCASE)/fill_head.pt --out $@

clean-demo:
	rm -rf $(WORLD) $(DEMO)
