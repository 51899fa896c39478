"""Tests of evaluation/benchmark/ on tiny models and shapes: the FLOP counter, the matmul peak, every measurement's
JSON fields, the memory extrapolation, the process isolation, the run plan, the targets and the report."""
import multiprocessing
import time

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dataset.constants import GRID_SHAPE, NUM_CLASSES
from evaluation.benchmark import measure, report, run, steps
from model.losses import tokenizer_loss
from model.sampling import SCHEDULERS
from model.tokenizer import build_tokenizer

TINY_TOKENIZER = dict(num_classes=NUM_CLASSES, class_embed_dim=2, grid_height=4, hidden_channels=8, num_res_blocks=1,
                      attention_heads=2, downsample=(2, 2, 2), latent_channels=4, codebook_size=8)
TINY_GRID = (8, 8, 4)
TINY_DIT = dict(name='DiT-demo', latent_shape=(4, 1, 2, 2), cond_shape=(2, 2),
                overrides=dict(hidden_size=16, depth=1, num_heads=2))
TIMING = dict(device='cpu', warmup=1, repeats=2)
STEP_FIELDS = {'device', 'dtype', 'shape', 'seconds', 'seconds_min', 'seconds_all', 'in_use_bytes',
               'peak_increase_bytes', 'peak_bytes', 'memory_method', 'warmup', 'repeats'}


def test_matmul_peak_is_positive_and_stops_growing_past_the_time_limit():
    peak = measure.matmul_peak(torch.float32, 'cpu', max_size=512, repeats=2)
    assert peak['gflops'] > 0 and peak['shape'] in ([256, 256], [512, 512]) and peak['dtype'] == 'float32'
    # any product takes > 0 s, so with max_seconds = 0 only the first size is tried
    assert measure.matmul_peak(torch.float32, 'cpu', max_size=1024, repeats=1, max_seconds=0.0)['shape'] == [256, 256]
    with pytest.raises(ValueError, match='max_size'):
        measure.matmul_peak(max_size=100)


def test_flop_count_of_a_linear_layer():
    batch, fan_in, fan_out = 4, 8, 16
    layer = torch.nn.Linear(fan_in, fan_out)
    assert measure.count_flops(layer, torch.randn(batch, fan_in)) == 2 * batch * fan_in * fan_out


def test_flop_count_of_cpu_attention_matches_the_math_backend():
    q, k, v = (torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(3))
    forward = 2 * 1 * 2 * 16 * 16 * (8 + 8)                 # q k^T and (scores) v
    assert measure.count_flops(F.scaled_dot_product_attention, q, k, v) == forward

    def forward_backward():
        F.scaled_dot_product_attention(q, k, v).sum().backward()

    fused = measure.count_flops(forward_backward)          # the CPU kernel, counted through CPU_ATTENTION_FLOPS
    with sdpa_kernel(SDPBackend.MATH):
        math_path = measure.count_flops(forward_backward)  # plain bmm's, counted by torch's registry
    assert fused == 3 * forward == math_path


def test_dit_flops_are_linear_in_the_batch():
    one = steps.dit_flops_per_step(**TINY_DIT, batch_size=1)
    assert one > 0 and steps.dit_flops_per_step(**TINY_DIT, batch_size=3) == 3 * one


def test_time_steps_counts_a_long_first_step_as_the_measurement():
    calls = []
    record = measure.time_steps(lambda: calls.append(1), torch.device('cpu'), warmup=1, repeats=3)
    assert len(calls) == 4 and len(record['seconds_all']) == record['repeats'] == 3 and record['warmup'] == 1
    calls.clear()
    record = measure.time_steps(lambda: calls.append(1), torch.device('cpu'), warmup=1, repeats=3, long_step_s=0.0)
    assert len(calls) == 1 and (record['warmup'], record['repeats'], len(record['seconds_all'])) == (0, 1, 1)
    with pytest.raises(ValueError, match='repeats'):
        measure.time_steps(lambda: None, torch.device('cpu'), warmup=0, repeats=0)


def test_time_steps_sees_the_memory_a_step_allocates():
    def step():
        first = torch.ones(32 * 2 ** 20, dtype=torch.uint8)         # 32 MiB, touched, then freed
        second = first + 1                                          # 32 MiB more while the first is alive
        second.add_(1)                                              # in place: no new memory
        assert int(second[0]) == int(first[0]) + 2                   # both alive, the in-place add applied

    record = measure.time_steps(step, torch.device('cpu'), warmup=0, repeats=1, count_tensors=True)
    assert record['peak_increase_bytes'] >= 60 * 2 ** 20
    tensors = record['tensor_peak_increase_bytes']                   # the two live tensors (+ a few scalars)
    assert 64 * 2 ** 20 <= tensors <= 64 * 2 ** 20 + 64 and measure.step_peak(record) == tensors
    assert 'tensor_peak_increase_bytes' not in measure.time_steps(step, torch.device('cpu'), 0, 1)


def test_live_tensor_bytes_follows_frees_views_and_backward():
    weight = torch.randn(256, 256, requires_grad=True)              # created before: not counted
    with measure.LiveTensorBytes() as live:
        hidden = weight @ torch.ones(256, 1024)                     # 1 MiB input, then 1 MiB output
        assert live.current == live.peak == 2 * 2 ** 20
        view = hidden.view(-1)[:10]                                 # no new storage
        del hidden
        assert live.current == 2 * 2 ** 20                          # the view keeps the output alive
        del view
        hidden = weight @ torch.ones(256, 1024)
        hidden.sum().backward()                                     # the input's and the weight's gradient
        assert live.peak >= 2 * 2 ** 20 + 256 * 256 * 4
    assert weight.grad is not None and live.current >= 256 * 256 * 4
    with measure.LiveTensorBytes() as live:
        weight.detach().t().unsqueeze(0)                            # aliases of a weight allocate nothing
    assert live.peak == 0



@pytest.mark.parametrize('checkpointing', [False, True])
def test_emulated_bf16_counts_the_tensors_of_the_real_bf16_step(checkpointing):
    """The CPU's bf16 kernels are too slow for the faithful tokenizer; the emulation must see the same tensors."""
    occupancy = torch.randint(0, NUM_CLASSES, (1, 4, 16, 16, 4))
    counts, losses = [], []
    for emulate in (False, True):
        torch.manual_seed(0)
        model = build_tokenizer(dict(TINY_TOKENIZER, hidden_channels=16,
                                               activation_checkpointing=checkpointing)).train()
        with measure.LiveTensorBytes(emulate_bf16=emulate) as live:
            with torch.autocast('cpu', torch.bfloat16):
                logits, vq_loss, _ = model(occupancy)
            assert logits.dtype == torch.bfloat16
            loss, _ = tokenizer_loss(logits, occupancy, vq_loss)
            del logits
            loss.backward()
        counts.append((live.peak, live.current))
        losses.append(loss.item())
    assert counts[0] == counts[1] and counts[0][0] > 0
    assert losses[1] == pytest.approx(losses[0], rel=1e-2)          # fp32 arithmetic, rounded outputs


def test_emulated_bf16_leaves_fp32_ops_alone():
    weight = torch.randn(64, 64)
    with measure.LiveTensorBytes(emulate_bf16=True) as live:
        out = weight @ weight
        half = weight.bfloat16() @ weight.bfloat16()
    assert out.dtype == torch.float32 and half.dtype == torch.bfloat16
    assert live.peak == 64 * 64 * (4 + 2 + 2 + 2)                   # fp32 product, two bf16 casts, bf16 product
    torch.testing.assert_close(half.float(), (weight.bfloat16().float() @ weight.bfloat16().float()),
                               rtol=1e-2, atol=1e-1)

@pytest.fixture(scope='module')
def tiny_records():
    """One record of each measurement function, on tiny models."""
    tokenizer = dict(model_cfg=TINY_TOKENIZER, num_frames=2, grid_shape=TINY_GRID, **TIMING)
    return {
        'tokenizer': steps.tokenizer_step(**tokenizer),
        'checkpointed': steps.tokenizer_step(**tokenizer, checkpointing=True),
        'emulated': steps.tokenizer_step(**tokenizer, checkpointing=True, bf16=True, emulate_bf16=True),
        'ema': steps.tokenizer_step(**dict(tokenizer, model_cfg=dict(TINY_TOKENIZER, codebook_ema=True))),
        'encode': steps.tokenizer_step(**tokenizer, train=False, batch_size=2),
        'dit': steps.dit_train_step(**TINY_DIT, batch_size=2, peak_gflops=50.0, **TIMING),
        'dit_bf16': steps.dit_train_step(**TINY_DIT, batch_size=2, peak_gflops=100.0, bf16=True, **TIMING),
        'sampling': steps.sampling_cost(**TINY_DIT, num_steps=2),
        'sampling_bf16': steps.sampling_cost(**TINY_DIT, num_steps=1, samplers=('ddim',), bf16=True),
        'encode_bf16': steps.tokenizer_step(**tokenizer, train=False, bf16=True),
    }


def test_tokenizer_step_fields(tiny_records):
    for key, checkpointing in (('tokenizer', False), ('checkpointed', True), ('ema', False)):   # ema: frozen codebook
        record = tiny_records[key]
        assert STEP_FIELDS <= set(record) and 'clips_per_second' not in record
        assert record['shape'] == [1, 2, *TINY_GRID] and record['dtype'] == 'fp32'
        assert record['activation_checkpointing'] is checkpointing
        assert record['seconds'] > 0 and len(record['seconds_all']) == record['repeats'] == 2
        assert record['peak_increase_bytes'] >= 0 and record['in_use_bytes'] > 0 and record['parameters'] > 0
        assert record['tensor_peak_increase_bytes'] > 0
    emulated = tiny_records['emulated']
    assert emulated['dtype'] == 'bf16 autocast' and emulated['bf16_emulated'] and emulated['activation_checkpointing']
    assert 'bf16_emulated' not in tiny_records['checkpointed']
    encode = tiny_records['encode']
    assert STEP_FIELDS <= set(encode) and encode['shape'] == [2, 2, *TINY_GRID] and encode['clips_per_second'] > 0


@pytest.fixture
def quarter_second_steps(monkeypatch):
    """A clock that advances 0.25 s per reading: every timed step (from one reading to the next) takes 0.25 s."""
    readings = iter(range(10 ** 6))
    monkeypatch.setattr(time, 'perf_counter', lambda: next(readings) * 0.25)


def test_rates_follow_the_step_time(quarter_second_steps):
    encode = steps.tokenizer_step(TINY_TOKENIZER, num_frames=2, grid_shape=TINY_GRID, train=False, batch_size=2,
                                  device='cpu', warmup=0, repeats=1)
    assert encode['seconds'] == 0.25 and encode['clips_per_second'] == 8.0          # 2 clips in a quarter second
    flops = steps.dit_flops_per_step(**TINY_DIT, batch_size=2)
    # a step at half of the given peak: MFU 50 %
    record = steps.dit_train_step(**TINY_DIT, batch_size=2, peak_gflops=2 * 4 * flops / 1e9, device='cpu', warmup=0,
                                  repeats=1)
    assert record['seconds'] == 0.25 and record['mfu'] == pytest.approx(0.5)
    assert record['attention']['seconds'] == 0.25 and record['mfu_bound'] <= 1
    cost = steps.sampling_cost(**TINY_DIT, num_steps=2, samplers=('ddim',))['samplers']['ddim']
    assert cost['seconds_per_step'] == 0.125 and cost['seconds_per_clip']['1000'] == 125.0


def test_dit_train_step_mfu(tiny_records):
    record = tiny_records['dit']
    assert STEP_FIELDS <= set(record) and record['shape'] == [2, 4, 1, 2, 2]
    assert record['flops_per_step'] == steps.dit_flops_per_step(**TINY_DIT, batch_size=2)
    assert record['achieved_gflops'] > 0 and record['mfu'] > 0 and record['dtype'] == 'fp32'
    assert record['peak_bytes'] >= record['peak_increase_bytes'] and record['tensor_peak_increase_bytes'] > 0
    attention = record['attention']                                  # 2 samples, 2 heads, 4 tokens of 8 channels
    assert attention['shape'] == [2, 2, 4, 8] and attention['flops'] == 3 * 2 * 2 * 2 * 4 * 4 * (8 + 8)
    assert 0 < record['attention_flop_share'] < 1 and 0 < record['mfu_bound'] <= 1


def test_dit_train_step_compiled_times_the_steps_after_compiling():
    record = steps.dit_train_step(**TINY_DIT, batch_size=2, compile=True, device='cpu', warmup=0, repeats=1)
    assert record['compile_seconds'] > record['seconds'] > 0 and record['repeats'] == 1


def test_bf16_rows_of_the_dit_step_sampling_and_encoding(tiny_records):
    """bf16 autocast as train_2.py's bf16, sample.py's and step02.py's --precision bf16: the same fields, bf16
    labels, the MFU against the given (bf16) peak, the attention kernel timed in bf16."""
    dit = tiny_records['dit_bf16']
    assert STEP_FIELDS <= set(dit) and dit['dtype'] == 'bf16 autocast' and dit['peak_gflops'] == 100.0
    assert dit['flops_per_step'] == tiny_records['dit']['flops_per_step'] and dit['tensor_peak_increase_bytes'] > 0
    assert dit['attention']['dtype'] == 'bfloat16' and tiny_records['dit']['attention']['dtype'] == 'float32'
    sampling = tiny_records['sampling_bf16']
    assert sampling['dtype'] == 'bf16 autocast' and sampling['samplers']['ddim']['seconds_per_step'] > 0
    encode = tiny_records['encode_bf16']
    assert encode['dtype'] == 'bf16 autocast' and encode['clips_per_second'] > 0 and 'bf16_emulated' not in encode
    assert steps.dtype_label(False, allow_tf32=True) == 'tf32'


def test_mfu_bound_known_answers():
    assert steps.mfu_bound(0.0, 10.0, 100.0) == 1.0                 # no attention: the peak
    assert steps.mfu_bound(1.0, 40.0, 100.0) == pytest.approx(0.4)  # only attention: its own speed
    assert steps.mfu_bound(0.5, 50.0, 100.0) == pytest.approx(1 / 1.5)


def test_sampling_cost_scales_per_step(tiny_records):
    record = tiny_records['sampling']
    assert set(record['samplers']) == set(SCHEDULERS) and record['num_steps'] == 2
    assert steps.sampling_cost(**TINY_DIT, num_steps=1, samplers=('ddim',))['samplers'].keys() == {'ddim'}
    for cost in record['samplers'].values():
        assert cost['seconds_per_step'] > 0
        assert list(cost['seconds_per_clip']) == ['1000', '250', '50', '25']
        assert cost['seconds_per_clip']['1000'] == pytest.approx(40 * cost['seconds_per_clip']['25'])


def test_extrapolate_memory_known_answers():
    # activations 2 + 2 v after removing 4 B/param of gradients (10 parameters: 40 B) -> 2 + 2 * 64 = 130 at v = 64
    points = [(8, 40 + 18), (16, 40 + 34)]
    fit = steps.extrapolate_memory(points, voxels=64, parameters=10)
    assert fit['intercept_bytes'] == pytest.approx(2) and fit['bytes_per_voxel'] == pytest.approx(2)
    assert fit['activation_bytes'] == pytest.approx(130)
    assert fit['total_bytes'] == pytest.approx(130 + steps.STATE_BYTES_PER_PARAM * 10)
    # one point scales in proportion
    assert steps.extrapolate_memory([(8, 16)], 64, 0)['activation_bytes'] == pytest.approx(128)
    with pytest.raises(ValueError, match='at least one'):
        steps.extrapolate_memory([], 64, 0)


def test_tokenizer_memory_estimates_per_flag_combination(tiny_records):
    parameters = tiny_records['tokenizer']['parameters']
    gradients = steps.GRADIENT_BYTES_PER_PARAM * parameters
    # activations of 3 bytes per voxel at T = 2 and T = 4 on the full grid
    records = [dict(tiny_records['tokenizer'], shape=[1, frames, *GRID_SHAPE],
                    tensor_peak_increase_bytes=gradients + 3 * frames * 200 * 200 * 16) for frames in (2, 4)]
    checkpointed = dict(tiny_records['checkpointed'], shape=[1, 2, *GRID_SHAPE])
    estimates = steps.tokenizer_memory_estimates(records + [checkpointed, tiny_records['tokenizer']],
                                                     batch_size=2, num_frames=32)     # the last one: a crop, left out
    assert [e['activation_checkpointing'] for e in estimates] == [False, True]
    assert [len(e['points']) for e in estimates] == [2, 1]
    expected = 3 * 2 * 32 * 200 * 200 * 16 + steps.STATE_BYTES_PER_PARAM * parameters
    assert GRID_SHAPE == (200, 200, 16) and estimates[0]['total_bytes'] == pytest.approx(expected, rel=1e-9)
    assert estimates[0]['fits'] is (expected <= steps.GPU_REFERENCE_BYTES)


def test_run_isolated_returns_the_child_result_a_timeout_or_the_child_traceback():
    record = run.run_isolated(steps.tokenizer_step, model_cfg=TINY_TOKENIZER, num_frames=2,
                                    grid_shape=TINY_GRID, device='cpu', warmup=0, repeats=1)
    assert STEP_FIELDS <= set(record)
    skipped = run.run_isolated(steps.tokenizer_step, timeout=0.01, model_cfg=TINY_TOKENIZER,
                                     num_frames=2, grid_shape=TINY_GRID)
    assert 'did not finish' in skipped['skipped']
    with pytest.raises(RuntimeError, match='unknown tokenizer config key'):
        run.run_isolated(steps.tokenizer_step, model_cfg={'bogus_key': 1}, num_frames=2)


def test_isolated_worker_reports_out_of_memory_as_a_skip():
    def out_of_memory():
        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2 GiB')

    receiver, sender = multiprocessing.Pipe(duplex=False)
    run._isolated_worker(sender, out_of_memory, {})
    assert receiver.recv() == ('ok', {'skipped': 'out of memory: CUDA out of memory. Tried to allocate 2 GiB'})


def _tokenizer_plan(plan):
    return [(kwargs['num_frames'], kwargs['grid_shape'], kwargs['bf16'], kwargs['checkpointing'])
            for section, _, _, kwargs in plan if section == 'tokenizer_train_step']


def test_plans_follow_the_brief():
    quick = run.benchmark_plan('cpu', quick=True, fp32_peak=100.0)
    crop = (*run.QUICK_CROP, GRID_SHAPE[2])
    assert _tokenizer_plan(quick) == [(8, crop, False, False), (8, crop, True, False), (8, crop, False, True),
                                      (8, crop, True, True)]
    assert all((kwargs.get('warmup', 0), kwargs.get('repeats', 1)) == (0, 1) for _, _, _, kwargs in quick)
    assert next(kwargs for section, _, _, kwargs in quick if section == 'sampling')['samplers'] == ('ddim',)
    demo_tokenizer = quick[0][3]
    assert demo_tokenizer['num_frames'] == 8 and demo_tokenizer['grid_shape'] == (64, 64, GRID_SHAPE[2])

    full = _tokenizer_plan(run.benchmark_plan('cpu', quick=False, fp32_peak=100.0))
    assert len(full) == 12 and {frames for frames, *_ in full} == {8, 16, 32}
    assert {grid for _, grid, *_ in full} == {GRID_SHAPE}
    plan = run.benchmark_plan('cpu', False, 100.0, bf16_peak=400.0)
    dits = [kwargs for section, _, _, kwargs in plan if section == 'dit_train_step']
    # fp32 and bf16 eager against their own matmul peaks, then train_2's default dtype compiled (last: the longest)
    assert [(dit.get('bf16', False), dit.get('compile', False), dit['peak_gflops']) for dit in dits] == [
        (False, False, 100.0), (True, False, 400.0), (False, True, 100.0)]
    order = [(section, kwargs.get('compile', False)) for section, _, _, kwargs in plan]
    last_sampling = max(i for i, (section, _) in enumerate(order) if section == 'sampling')
    assert order.index(('dit_train_step', True)) > last_sampling
    assert all(dit['latent_shape'] == (128, 4, 25, 25) and dit['cond_shape'] == (32, 2) and dit['batch_size'] == 2
               for dit in dits)
    for section in ('encoding', 'sampling'):
        assert [kwargs['bf16'] for name, _, _, kwargs in plan if name == section] == [False, True]
    assert [(kwargs.get('bf16', False), kwargs.get('compile', False)) for section, _, _, kwargs in quick
            if section == 'dit_train_step'] == [(False, False), (True, False)]
    # on CUDA: fp32, bf16 (with TF32 for what autocast leaves in fp32, as train_2) and TF32, each its own peak
    cuda = [kwargs for section, _, _, kwargs in run.benchmark_plan('cuda', True, 100.0, tf32_peak=200.0,
                                                                   bf16_peak=400.0) if section == 'dit_train_step']
    assert [run._expected(dit)['dtype'] for dit in cuda] == ['fp32', 'bf16 autocast', 'tf32']
    assert [dit['peak_gflops'] for dit in cuda] == [100.0, 400.0, 200.0]


def test_skip_reason_guards_bf16_and_memory(tiny_records):
    planned = dict(model_cfg=TINY_TOKENIZER, num_frames=32, bf16=False, checkpointing=False, device='cpu')
    assert 'bf16' in run.skip_reason('tokenizer_train_step', dict(planned, bf16=True), {}, False, 'cpu')
    emulated = dict(planned, bf16=True, emulate_bf16=True)
    assert run.skip_reason('tokenizer_train_step', emulated, {}, False, 'cpu') is None
    assert run.skip_reason('tokenizer_train_step', planned, {}, True, 'cpu') is None    # nothing to go by
    measured = dict(tiny_records['tokenizer'], shape=[1, 8, *GRID_SHAPE])
    small = {'tokenizer_train_step': [dict(measured, peak_increase_bytes=2 ** 20)]}
    assert run.skip_reason('tokenizer_train_step', planned, small, True, 'cpu') is None
    huge = {'tokenizer_train_step': [dict(measured, peak_increase_bytes=2 ** 50)]}
    assert 'exceeds' in run.skip_reason('tokenizer_train_step', planned, huge, True, 'cpu')


def test_targets_and_report(tiny_records):
    full_grid = [1, 2, *GRID_SHAPE]
    eager = dict(tiny_records['tokenizer'], label='tiny tokenizer', tensor_peak_increase_bytes=4 * 2 ** 30,
                 shape=full_grid)
    lean = dict(tiny_records['emulated'], label='tiny checkpointed', tensor_peak_increase_bytes=2 ** 30,
                shape=full_grid)
    cropped = [dict(record, shape=[1, 2, *TINY_GRID]) for record in (eager, lean)]       # no ratio target
    results = {
        'machine': run.machine_info('cpu') | {'load_average_end': 0.5},
        'matmul_peak': [measure.matmul_peak(max_size=256, repeats=1)],
        'demo': [{'label': 'tiny DiT', **tiny_records['dit']}],
        'tokenizer_train_step': [eager, lean, *cropped, {'label': 'tiny bf16', 'device': 'cpu',
                                                         'dtype': 'bf16 autocast', 'shape': [1, 2, *TINY_GRID],
                                                         'skipped': 'no fast bf16'}],
        'dit_train_step': [{'label': 'tiny DiT', **tiny_records['dit'], 'mfu': 0.6}],
        'encoding': [{'label': 'tiny encode', **tiny_records['encode']}],
        'sampling': [{'label': 'tiny DiT', **tiny_records['sampling']}],
        'seconds_total': 1.0,
    }
    results['tokenizer_memory_estimate'] = steps.tokenizer_memory_estimates(
        results['tokenizer_train_step'], 2, 32)
    results['targets'] = run.target_checks(results)
    assert [c['met'] for c in results['targets']][:2] == [True, True]     # MFU 60 % >= 50 %; peak 1 / 4 GiB <= 50 %
    assert len(results['targets']) == 4                                    # + one memory estimate per flag pair
    # the same run below the targets: MFU 30 %, checkpointing keeps 3 of the 4 GiB
    slow = dict(results, dit_train_step=[dict(results['dit_train_step'][0], mfu=0.3)],
                tokenizer_train_step=[eager, dict(lean, tensor_peak_increase_bytes=3 * 2 ** 30)])
    assert [c['met'] for c in run.target_checks(slow)][:2] == [False, False]
    # the report shows every measurement, skipped ones with their reason, and every target with its verdict
    table = report.format_table(results)
    for record in (*results['demo'], eager, lean, *results['encoding'], *results['sampling']):
        assert record['label'] in table, record['label']
    assert 'no fast bf16' in table and all(sampler in table for sampler in SCHEDULERS)
    assert all(f"[met] {check['target']}" in table for check in results['targets'] if check['met'])
    slow['targets'] = run.target_checks(slow)
    assert f"[NOT met] {slow['targets'][0]['target']}" in report.format_table(slow)


def test_dit_bf16_memory_target(tiny_records):
    """bf16's step peak against fp32's of the same shape (eager only): met at 3/4, not above; the RSS shown too."""
    fp32 = dict(tiny_records['dit'], label='tiny DiT', tensor_peak_increase_bytes=4 * 2 ** 30)
    bf16 = dict(tiny_records['dit_bf16'], label='tiny DiT', tensor_peak_increase_bytes=3 * 2 ** 30)
    compiled = dict(fp32, compile_seconds=1.0, tensor_peak_increase_bytes=2 ** 30)           # not a reference
    checks = [c for c in run.target_checks({'dit_train_step': [fp32, bf16, compiled]}) if 'peak, bf16' in c['target']]
    assert len(checks) == 1 and checks[0]['met'] and checks[0]['value'].startswith('3.00 / 4.00 GiB = 75 %')
    assert 'peak RSS increase' in checks[0]['value']
    over = dict(bf16, tensor_peak_increase_bytes=int(3.1 * 2 ** 30))
    assert not [c for c in run.target_checks({'dit_train_step': [fp32, over]}) if 'peak, bf16' in c['target']][0]['met']
    other_shape = dict(bf16, shape=[4, *bf16['shape'][1:]])
    assert not [c for c in run.target_checks({'dit_train_step': [fp32, other_shape]}) if 'peak, bf16' in c['target']]


def test_cpu_flags_are_reported():
    flags = run.cpu_flags()
    assert list(flags) == list(run.CPU_FLAGS) and all(isinstance(value, bool) for value in flags.values())
    assert run.machine_info('cpu')['cpu_flags'] == flags
    line = report._cpu_flags_line({'avx512_bf16': True, 'amx_bf16': False})
    assert line == 'CPU flags: avx512_bf16 yes, amx_bf16 no (no AMX)'
    assert report._cpu_flags_line({'amx_tile': True}).endswith('(AMX)')


def test_run_benchmark_runs_only_the_sections_asked_for(monkeypatch):
    """--only: the plan's other sections are not run; the matmul peaks always are, and bf16's reaches the plan."""
    calls = []

    def fake_run_isolated(function, timeout=None, **kwargs):
        calls.append((function.__name__, kwargs))
        if function is measure.matmul_peaks:
            return {'peaks': [{'dtype': 'float32', 'gflops': 100.0, 'shape': [256, 256], 'repeats': 1},
                              {'dtype': 'bfloat16', 'gflops': 400.0, 'shape': [256, 256], 'repeats': 1}]}
        return {'skipped': 'not run in this test'}

    monkeypatch.setattr(run, 'run_isolated', fake_run_isolated)
    results = run.run_benchmark('cpu', quick=True, sections=('dit_train_step', 'sampling'))
    assert [name for name, _ in calls] == ['matmul_peaks', 'dit_train_step', 'dit_train_step', 'sampling_cost',
                                           'sampling_cost']
    assert [kwargs.get('peak_gflops') for name, kwargs in calls if name == 'dit_train_step'] == [100.0, 400.0]
    assert {key for key in results if key in run.SECTIONS} == {'dit_train_step', 'sampling'}
    assert [r['dtype'] for r in results['sampling']] == ['fp32', 'bf16 autocast']
    assert results['settings']['sections'] == ['dit_train_step', 'sampling']
    assert 'skipped: not run in this test' in report.format_table(results)
