"""SophiaG's CUDA fused path, the Triton kernels and their launch code, run on the CPU through
Triton's interpreter and held to the reference: both kernels in float32 and bfloat16, many tensors
of odd sizes in one launch, zero-size tensors, maximize, negative Hessian entries, the launch table,
SophiaG.step / update_hessian with the Triton path forced, and FSDP shards on 2 processes.

The interpreter runs a kernel's Python body with numpy, one program after the other, on the memory
of the CPU tensors. triton.jit returns such an interpreted kernel when TRITON_INTERPRET=1 is set
before sophia is imported; in this process sophia was imported long before (by other test files),
so the fixture wraps the kernels' Python functions in the interpreter itself, for its test only,
and points the CPU's fused path at them: the rest of the suite keeps sophia as it is. The
two-process test sets TRITON_INTERPRET=1 in the processes it starts.

The interpreter converts float32 to bfloat16 by truncation (and bfloat16 subnormals wrongly); a
GPU's conversion, like ATen's, rounds to nearest even. The fixture gives the interpreter ATen's
conversion, so the kernels round as on a GPU and bfloat16 can be compared bit for bit.

Needs the triton package beside the CPU build of torch (pip install triton==3.9.0); skipped
without it."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from test_sophia import CUDA_TOLERANCE, assert_same_trajectory, run_trajectory

triton = pytest.importorskip('triton', reason='triton is not installed (pip install triton==3.9.0)')
from triton.runtime import interpreter  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402
import triton.language as tl  # noqa: E402

import sophia  # noqa: E402

TWO = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']

NEAREST_EVEN = (None, interpreter._ir.ROUNDING_MODE.RTNE)  # a plain .to(), or 'rtne' asked for

def convert_as_aten(convert):
    """The interpreter's float conversion, float32 <-> bfloat16 done as ATen (and a GPU) does."""
    def converted(values, input_dtype, output_dtype, rounding_mode):
        pair = (input_dtype, output_dtype)
        if pair == (tl.float32, tl.bfloat16) and rounding_mode in NEAREST_EVEN:
            values = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
            return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        if pair == (tl.bfloat16, tl.float32):
            values = torch.from_numpy(np.ascontiguousarray(values).view(np.int16))
            return values.view(torch.bfloat16).float().numpy().view(np.uint32)
        return convert(values, input_dtype, output_dtype, rounding_mode)
    return converted

@pytest.fixture
def triton_cpu(monkeypatch):
    """sophia's Triton kernels interpreted, and the fused path on CPU tensors taking them; returns
    the list of (kernel name, number of programs) of every launch."""
    launches = []
    for name, kernel in list(vars(sophia).items()):
        if isinstance(kernel, (JITFunction, interpreter.InterpretedFunction)):
            monkeypatch.setattr(sophia, name, interpreter.InterpretedFunction(kernel.fn))
    for name in ('_sophia_step_kernel', '_update_hessian_kernel'):
        monkeypatch.setattr(sophia, name, counted(getattr(sophia, name), name, launches))
    monkeypatch.setitem(sophia._kernels, 'cpu', triton)
    monkeypatch.setattr(interpreter, '_convert_float', convert_as_aten(interpreter._convert_float))
    # each test builds the block maps of its launches anew, rather than finding those of an earlier
    # test (or process) of the same sizes in the cache
    monkeypatch.setattr(sophia, '_block_maps', {})
    return launches

def counted(kernel, name, launches):
    """kernel, recording each launch's grid as kernel[grid](...) is called."""
    class Counted:
        def __getitem__(self, grid):
            launches.append((name, grid[0]))
            return kernel[grid]
    return Counted()

# Inputs for bit-for-bit comparisons. The kernels round to the storage dtype exactly where the
# reference rounds, but compute a * b + c with two roundings where ATen may fuse it into one (FMA).
# With lr and 1 - beta powers of two and inputs that bfloat16 holds exactly, every such product
# is exact, so both paths agree to the bit in float32 and bfloat16; a rounding skipped or added,
# or a wrong element, shows as a differing bit.
LR, BETAS = 2.0 ** -7, (1 - 2.0 ** -5, 1 - 2.0 ** -7)
HYPER = dict(lr=LR, beta1=BETAS[0], rho=0.05, weight_decay=0.1, bs=4096)
BLOCK = sophia._BLOCK
# odd sizes around the block (4096 elements per program), zero-size tensors among them, and many
# small tensors: one launch covers them all
SIZES = (1, 7, 0, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5, 0, 33) + tuple(range(2, 60, 3))
GAP = 3  # elements between the tensors of one buffer

def in_one_buffer(values, sizes):
    """Views of consecutive stretches of the flat tensor `values`, GAP elements apart: a kernel
    writing past a tensor's end changes a gap (or the next tensor), which comparing whole buffers
    shows."""
    views, start = [], 0
    for n in sizes:
        views.append(values[start:start + n])
        start += n + GAP
    return views

def draw(generator, sizes, scale, dtype, positive=False):
    """A buffer of values around `scale` that bfloat16 holds exactly, one in eight of them zero."""
    total = sum(sizes) + GAP * len(sizes)
    values = torch.randn(total, generator=generator) * scale
    values[torch.randint(0, 8, (total,), generator=generator) == 0] = 0.0
    values = values.abs() if positive else values
    return values.to(torch.bfloat16).to(dtype)

def assert_bitwise_equal(actual, expected):
    as_int = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[expected.dtype]
    differ = (actual.view(as_int) != expected.view(as_int)).nonzero().flatten()
    assert len(differ) == 0, f"{len(differ)} of {expected.numel()} differ: {differ[:5].tolist()}..."

def test_launch_table_holds_every_tensor_of_the_launch(triton_cpu):
    """The table's rows (addresses per tensor list, sizes, first blocks) and the block -> tensor
    map, for sizes with zero-size tensors before, between and after the others. First in this
    file: a wrong address fails here, before a kernel writes through it (and likely crashes the
    process)."""
    sizes = (0, BLOCK, 1, 2 * BLOCK + 1, 0, 5, 0)
    lists = [[torch.empty(n) for n in sizes] for _ in range(2)]
    table, block_to_tensor = sophia._launch_table(torch.device('cpu'), lists)
    addresses = [t.data_ptr() for tensors in lists for t in tensors]
    assert table.dtype == torch.int64
    assert table.tolist() == addresses + list(sizes) + [0, 0, 1, 2, 5, 5, 6]
    assert block_to_tensor.tolist() == [1, 2, 3, 3, 3, 5] and block_to_tensor.dtype == torch.int32
    # the map is kept per list of sizes, the addresses are not: other tensors of the same sizes
    others = [[torch.empty(n) for n in sizes] for _ in range(2)]
    table, same_map = sophia._launch_table(torch.device('cpu'), others)
    assert same_map is block_to_tensor
    assert table.tolist()[:2 * len(sizes)] == [t.data_ptr() for tensors in others for t in tensors]
    # and other sizes have a map of their own
    _, other_map = sophia._launch_table(torch.device('cpu'), [[torch.empty(n) for n in (3, BLOCK + 2)]] * 2)
    assert other_map.tolist() == [0, 1, 1]
    assert sophia._launch_table(torch.device('cpu'), lists)[1] is block_to_tensor

@pytest.mark.parametrize('maximize', [False, True])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_kernels_equal_the_reference_bit_for_bit(triton_cpu, dtype, maximize):
    """Four steps over 29 tensors in one launch each, alternating GNB updates of the Hessian and
    signed ones (Hutchinson's), which leave negative entries the step must treat as zero: every
    buffer, gaps included, equals the reference's after every step."""
    g = torch.Generator().manual_seed(0)
    buffers = [draw(g, SIZES, 1.0, dtype), draw(g, SIZES, 1e-3, dtype),
               draw(g, SIZES, 1e-5, dtype, positive=True)]  # params, exp_avgs, hessians
    runs = {'reference': [b.clone() for b in buffers], 'triton': [b.clone() for b in buffers]}
    steps = {name: [torch.tensor(0.0) for _ in SIZES] for name in runs}
    for it in range(4):
        square = it % 2 == 0
        estimates = in_one_buffer(draw(g, SIZES, 1e-2 if square else 1e-3, dtype), SIZES)
        grads = in_one_buffer(draw(g, SIZES, 1e-3, dtype), SIZES)
        for name, update_hessian, step in (
                ('reference', sophia._single_tensor_update_hessian, sophia._single_tensor_step),
                ('triton', sophia._fused_update_hessian, sophia._fused_step)):
            params, exp_avgs, hessians = (in_one_buffer(b, SIZES) for b in runs[name])
            update_hessian(hessians, estimates, beta2=BETAS[1], square=square)
            step(params, grads, exp_avgs, hessians, steps[name], maximize=maximize, **HYPER)
        for actual, expected in zip(runs['triton'], runs['reference']):
            assert_bitwise_equal(actual, expected)
        if not square:  # the data reach both sides of every branch
            params, exp_avgs, hessians = runs['reference']
            assert (hessians < 0).any() and (hessians > 0).any()
            not_clipped = exp_avgs.abs() < hessians.clamp(min=0) * HYPER['rho'] * HYPER['bs']
            assert 0.2 < not_clipped.float().mean() < 0.8
    assert [s.item() for s in steps['triton']] == [4.0] * len(SIZES)
    blocks = sum((n + BLOCK - 1) // BLOCK for n in SIZES)
    assert triton_cpu == [('_update_hessian_kernel', blocks), ('_sophia_step_kernel', blocks)] * 4

def test_many_tensors_in_one_launch(triton_cpu):
    """300 small tensors, a program each, and one of 5 blocks: one launch of each kernel."""
    g = torch.Generator().manual_seed(1)
    sizes = tuple(torch.randint(1, 40, (300,), generator=g).tolist()) + (5 * BLOCK - 2,)
    buffers = [draw(g, sizes, 1.0, torch.float32), draw(g, sizes, 1e-3, torch.float32),
               draw(g, sizes, 1e-3, torch.float32, positive=True)]
    estimates, grads = draw(g, sizes, 0.1, torch.float32), draw(g, sizes, 1e-3, torch.float32)
    runs = {'reference': [b.clone() for b in buffers], 'triton': [b.clone() for b in buffers]}
    for name, update_hessian, step in (
            ('reference', sophia._single_tensor_update_hessian, sophia._single_tensor_step),
            ('triton', sophia._fused_update_hessian, sophia._fused_step)):
        params, exp_avgs, hessians = (in_one_buffer(b, sizes) for b in runs[name])
        update_hessian(hessians, in_one_buffer(estimates, sizes), beta2=BETAS[1], square=True)
        step(params, in_one_buffer(grads, sizes), exp_avgs, hessians,
             [torch.tensor(0.0) for _ in sizes], maximize=False, **HYPER)
    for actual, expected in zip(runs['triton'], runs['reference']):
        assert_bitwise_equal(actual, expected)
    assert triton_cpu == [('_update_hessian_kernel', 305), ('_sophia_step_kernel', 305)]

def test_only_zero_size_tensors_launch_nothing(triton_cpu):
    tensors = [torch.empty(0), torch.empty(0, 3)]
    sophia._fused_step(tensors, tensors, tensors, tensors, [torch.tensor(0.0), torch.tensor(0.0)],
                       maximize=False, **HYPER)
    sophia._fused_update_hessian(tensors, tensors, beta2=0.9, square=True)
    assert triton_cpu == []

@pytest.mark.parametrize('maximize', [False, True])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_sophia_with_triton_forced_matches_the_reference(triton_cpu, dtype, maximize):
    """SophiaG(fused=True) through step() and update_hessian() (the same trajectory as
    test_sophia.py's: two groups, a frozen and a zero-size parameter, a step with a gradient None,
    GNB and signed estimates) with the default betas and an lr that is no power of two, so products
    ATen fuses differ by an ulp, and the CPU reference rounds add_'s alpha 1 - beta1 to bfloat16
    where ATen on CUDA and the kernel keep it in float: within the CUDA test's tolerance."""
    expected = run_trajectory(dtype, maximize, foreach=False)
    actual = run_trajectory(dtype, maximize, fused=True)
    assert_same_trajectory(actual, expected, CUDA_TOLERANCE[dtype])
    assert {name for name, _ in triton_cpu} == {'_sophia_step_kernel', '_update_hessian_kernel'}

def test_a_step_without_gradients_launches_nothing(triton_cpu):
    p = torch.ones(5, requires_grad=True)
    opt = sophia.SophiaG([p], fused=True)
    opt.step()
    opt.update_hessian([None])
    assert triton_cpu == [] and torch.equal(p, torch.ones(5)) and p not in opt.state

def test_cuda_fused_kernels_are_triton_where_it_is_installed(monkeypatch):
    monkeypatch.setattr(sophia, '_kernels', {})
    assert sophia._fused_kernels('cuda') is triton
    monkeypatch.setattr(sophia, '_kernels', {})
    monkeypatch.setattr(sophia, 'triton', None)
    assert sophia._fused_kernels('cuda') == ('SophiaG fused kernel unavailable on cuda: '
                                             'triton is not installed')

# The Triton path on 2 processes' FSDP2 shards (local views into FSDP's flat buffers, one process's
# shard of the last layer empty) against one process updating the whole tensors with the reference.
SHARDED_STEPS = '''
import os, sys, torch, torch.distributed as dist, triton
sys.path.insert(0, {root!r})
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
import sophia
sophia._kernels['cpu'] = triton  # the fused path on CPU tensors: the interpreted Triton kernels
dist.init_process_group('gloo')
def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))
results = {{}}
for flags, sharded in ((dict(foreach=False), False), (dict(fused=True), True)):
    net = model()
    if sharded:
        fully_shard(net)
    optimizer = sophia.SophiaG(net.parameters(), lr=0.1, rho=0.5, **flags)
    for step in range(4):
        torch.manual_seed(step)  # the same data on both processes: one process's gradient
        x, y = torch.randn(8, 6), torch.randn(8, 1)
        torch.nn.functional.mse_loss(net(x), y).backward()
        if step % 2:
            optimizer.update_hessian()
        else:
            optimizer.step(bs=8)
        optimizer.zero_grad()
    whole = lambda t: t.full_tensor() if isinstance(t, DTensor) else t
    results[sharded] = [whole(t) for p in net.parameters()
                        for t in (p, optimizer.state[p]['exp_avg'], optimizer.state[p]['hessian'])]
    if sharded:
        shards = [None, None]
        dist.all_gather_object(shards, [p.to_local().numel() for p in net.parameters()])
for a, b in zip(results[False], results[True]):
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
if dist.get_rank() == 0:  # one line: the two processes' prints would interleave
    print('shards', shards, 'same')
dist.destroy_process_group()
sys.stdout.flush()  # and leave as distributed.end_process_group does: the interpreter's
os._exit(0)  # teardown can abort a finished gloo process under load
'''

def test_triton_path_updates_fsdp_shards_as_the_reference_updates_whole_tensors(tmp_path):
    script = tmp_path / 'sharded_steps.py'
    script.write_text(SHARDED_STEPS.format(root=ROOT))
    result = subprocess.run(TWO + [str(script)], capture_output=True, text=True, cwd=ROOT,
                            timeout=300,
                            env=dict(os.environ, TRITON_INTERPRET='1', OMP_NUM_THREADS='1'))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'shards [[24, 4, 7, 1], [18, 3, 0, 0]] same' in result.stdout
