"""
SophiaG: a clipped, diagonal second-order optimizer for language-model pretraining
(Liu, Li, Hall, Liang, Ma 2023, arXiv 2305.14342), with Sophia-H (Hutchinson) support.

One update, three implementations picked by torch.optim's flags: the reference (foreach=False),
the ground truth the others are tested against; foreach, the same ops with torch._foreach_*; fused,
one pass over memory per tensor (C++/OpenMP on CPU, Triton on CUDA).

Hessian-diagonal estimators for update_hessian(): sampled_label_loss() (Gauss-Newton-Bartlett,
Sophia-G; labels from sample_labels(), which the training loop runs too) and hutchinson_hessian().
"""

import contextlib
import ctypes
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import warnings

import torch
import torch.nn.functional as F

try:  # FSDP2's sharded parameters; torch builds without distributed support lack it
    from torch.distributed.tensor import DTensor, Partial, Replicate
except ImportError:
    DTensor = None

try:  # Triton ships with the CUDA builds of torch; the CUDA fused kernel needs it
    import triton
    import triton.language as tl
except ImportError:
    triton = None

EPS = 1e-15  # keeps m / (rho * bs * h + EPS) finite where h = 0 (the official constant)


def _local(tensor):
    """The local shard of a DTensor (FSDP2), or the tensor: every update is elementwise."""
    return tensor.to_local() if DTensor is not None and isinstance(tensor, DTensor) else tensor

# -----------------------------------------------------------------------------
# Reference implementation: one tensor at a time, as the math reads. The fast paths below perform
# these ops in this order, so they agree to the last bit wherever they round like ATen (x86 CPUs).

def _single_tensor_step(params, grads, exp_avgs, hessians, steps, *, lr, beta1, rho, weight_decay, bs, maximize):
    for param, grad, exp_avg, hessian, step in zip(params, grads, exp_avgs, hessians, steps):
        if maximize:
            grad = -grad
        step += 1
        param.mul_(1 - lr * weight_decay)  # decoupled weight decay, before the update
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        # clip(m / (rho*bs*h+ + eps), -1, 1) as sign(m) * min(|m| / (...), 1); h+ = max(h, 0)
        denom = hessian.clamp(min=0) * (rho * bs) + EPS
        ratio = (exp_avg.abs() / denom).clamp(max=1)
        param.addcmul_(exp_avg.sign(), ratio, value=-lr)


def _single_tensor_update_hessian(hessians, estimates, *, beta2, square):
    for hessian, estimate in zip(hessians, estimates):
        hessian.mul_(beta2)
        if square:  # GNB: the estimate is the sampled-label gradient g^, and h tracks g^ * g^
            hessian.addcmul_(estimate, estimate, value=1 - beta2)
        else:  # the estimate already is a Hessian diagonal (Hutchinson)
            hessian.add_(estimate, alpha=1 - beta2)

# -----------------------------------------------------------------------------
# foreach implementation: the same ops over lists, each call one launch per (device, dtype) on CUDA.

def _split(tensor_lists, key):
    """Split parallel tensor lists by key(the tensors at one index): {key: the lists' parts}."""
    splits = {}
    for tensors in zip(*tensor_lists):
        split = splits.setdefault(key(tensors), [[] for _ in tensor_lists])
        for column, tensor in zip(split, tensors):
            column.append(tensor)
    return splits


def _by_device_and_dtype(*tensor_lists):
    """Split parallel tensor lists into buckets of equal (device, dtype), for the fast paths."""
    return _split(tensor_lists, lambda tensors: (tensors[0].device, tensors[0].dtype)).values()


def _multiplier(value, device):
    """A scalar for _foreach_mul_: CPU foreach rounds a Python scalar to the tensors' dtype (bf16:
    0.99 -> 0.98828125), unlike mul_(0.99); a float32 tensor keeps it in float, as the reference."""
    return torch.tensor(value, dtype=torch.float32) if device.type == "cpu" else value


def _multi_tensor_step(params, grads, exp_avgs, hessians, steps, *, lr, beta1, rho, weight_decay, bs, maximize):
    torch._foreach_add_(steps, 1.0)
    for params, grads, exp_avgs, hessians in _by_device_and_dtype(params, grads, exp_avgs, hessians):
        device = params[0].device
        if maximize:
            grads = torch._foreach_neg(grads)
        torch._foreach_mul_(params, _multiplier(1 - lr * weight_decay, device))
        torch._foreach_mul_(exp_avgs, _multiplier(beta1, device))
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        denoms = torch._foreach_clamp_min(hessians, 0.0)
        torch._foreach_mul_(denoms, _multiplier(rho * bs, device))
        torch._foreach_add_(denoms, EPS)
        ratios = torch._foreach_abs(exp_avgs)
        torch._foreach_div_(ratios, denoms)
        del denoms  # free it before the sign buffer: three full-size temporaries at once is plenty
        torch._foreach_clamp_max_(ratios, 1.0)
        torch._foreach_addcmul_(params, torch._foreach_sign(exp_avgs), ratios, value=-lr)


def _multi_tensor_update_hessian(hessians, estimates, *, beta2, square):
    for hessians, estimates in _by_device_and_dtype(hessians, estimates):
        torch._foreach_mul_(hessians, _multiplier(beta2, hessians[0].device))
        if square:
            torch._foreach_addcmul_(hessians, estimates, estimates, value=1 - beta2)
        else:
            torch._foreach_add_(hessians, estimates, alpha=1 - beta2)

# -----------------------------------------------------------------------------
# Fused CPU kernel: C++ without torch headers (compiles in a second, not a torch extension's
# minute), loaded with ctypes (which releases the GIL); one read and write per element. It rounds
# to the storage dtype where the reference rounds and fuses multiply-adds only where ATen does
# (FMA in vectorized add-with-alpha and addcmul; -ffp-contract=off stops other fusing): bit for bit
# but for an ATen quirk, bf16 add_(other, alpha) rounding alpha*other first in the scalar tail of
# each thread's range (numel mod 64 with AVX-512), where m, h, θ can be one bf16 rounding off.

_CPU_SOURCE = r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

typedef uint16_t bf16;  // bfloat16 held as its bits: the upper half of a float

static inline float load(const float* x, int64_t i) { return x[i]; }
static inline float load(const bf16* x, int64_t i) {
  uint32_t u = (uint32_t)x[i] << 16; float f; std::memcpy(&f, &u, 4); return f;
}
static inline bf16 bf16_bits(float f) {  // round to nearest even, NaN stays NaN (as c10::BFloat16)
  uint32_t u; std::memcpy(&u, &f, 4);
  return f != f ? (bf16)0x7FC0 : (bf16)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
static inline void store(float* x, int64_t i, float f) { x[i] = f; }
static inline void store(bf16* x, int64_t i, float f) { x[i] = bf16_bits(f); }
// the value f takes once stored as T: ATen computes bf16 ops in float and rounds each result
template <typename T> static inline float round_to(float f);
template <> inline float round_to<float>(float f) { return f; }
template <> inline float round_to<bf16>(float f) {
  uint32_t u = (uint32_t)bf16_bits(f) << 16; float r; std::memcpy(&r, &u, 4); return r;
}
static inline float mul_add(float a, float b, float c) {  // a * b + c, rounded as ATen rounds it
#ifdef __FMA__
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

struct StepArgs { float decay, beta1, one_minus_beta1, rho_bs, eps, neg_lr; int maximize; };

// Branch-free loops (arithmetic, selects), so GCC vectorizes them: a sign computed on ints kept the
// bf16 step scalar, 5-8x slower. Vector lanes round like the scalar remainder: same bits anywhere.
template <typename T>
static void step_range(T* p, const T* g, T* m, const T* h, int64_t begin, int64_t end, const StepArgs& a) {
  // maximize: (1 - beta1) * (-g) and (-(1 - beta1)) * g are the same exact product
  const float alpha = a.maximize ? -a.one_minus_beta1 : a.one_minus_beta1;
  // locals, which no store through p or m can change: the loop need not reload them
  const float decay = a.decay, beta1 = a.beta1, rho_bs = a.rho_bs, eps = a.eps, neg_lr = a.neg_lr;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    float param = round_to<T>(load(p, i) * decay);
    float avg = round_to<T>(load(m, i) * beta1);
    avg = round_to<T>(mul_add(alpha, load(g, i), avg));
    float hess = load(h, i);
    hess = hess < 0.f ? 0.f : hess;  // max(h, 0) keeping NaN, as clamp(min=0)
    float denom = round_to<T>(round_to<T>(rho_bs * hess) + eps);
    float ratio = round_to<T>(std::fabs(avg) / denom);
    ratio = ratio > 1.f ? 1.f : ratio;  // min(ratio, 1) keeping NaN, as clamp(max=1)
    // the reference's (-lr * sign(m)) * ratio, 2 instructions/vector fewer than building sign(m):
    // exactly -lr * (±ratio) for sign(m) = ±1; for m = ±0 or NaN, ratio is 0 or NaN: same result.
    store(p, i, round_to<T>(mul_add(neg_lr, avg < 0.f ? -ratio : ratio, param)));
    store(m, i, avg);
  }
}

template <typename T, bool square>
static void ema_range(T* h, const T* e, int64_t begin, int64_t end, float beta2, float one_minus_beta2) {
  for (int64_t i = begin; i < end; ++i) {
    float hess = round_to<T>(load(h, i) * beta2);
    float est = load(e, i);
    store(h, i, square ? mul_add(one_minus_beta2 * est, est, hess) : mul_add(one_minus_beta2, est, hess));
  }
}

// All tensors' chunks go to threads in one parallel region: one fork/join per list, not per tensor.
template <typename F>
static void for_each_chunk(int64_t n, const int64_t* numels, int num_threads, F f) {
  const int64_t chunk = 1 << 16;
  std::vector<int64_t> first(n + 1, 0);  // first chunk of each tensor
  int64_t elements = 0;
  for (int64_t t = 0; t < n; ++t) {
    first[t + 1] = first[t] + (numels[t] + chunk - 1) / chunk;
    elements += numels[t];
  }
  const int64_t total = first[n];
  // threads only when there is enough work: a fork/join costs more than a few small tensors
#pragma omp parallel for schedule(static) num_threads(num_threads) if (elements >= 2 * chunk)
  for (int64_t c = 0; c < total; ++c) {
    int64_t t = std::upper_bound(first.begin(), first.end(), c) - first.begin() - 1;
    int64_t begin = (c - first[t]) * chunk;
    f(t, begin, std::min(begin + chunk, numels[t]));
  }
}

extern "C" void sophia_step(int is_bf16, int64_t n, void** p, void** g, void** m, void** h,
                            const int64_t* numels, double decay, double beta1, double one_minus_beta1,
                            double rho_bs, double eps, double neg_lr, int maximize, int num_threads) {
  const StepArgs a = {(float)decay, (float)beta1, (float)one_minus_beta1, (float)rho_bs, (float)eps,
                      (float)neg_lr, maximize};
  for_each_chunk(n, numels, num_threads, [&](int64_t t, int64_t begin, int64_t end) {
    if (is_bf16) step_range((bf16*)p[t], (const bf16*)g[t], (bf16*)m[t], (const bf16*)h[t], begin, end, a);
    else step_range((float*)p[t], (const float*)g[t], (float*)m[t], (const float*)h[t], begin, end, a);
  });
}

extern "C" void sophia_update_hessian(int is_bf16, int64_t n, void** h, void** e, const int64_t* numels,
                                      double beta2, double one_minus_beta2, int square, int num_threads) {
  const float b2 = (float)beta2, w = (float)one_minus_beta2;
  for_each_chunk(n, numels, num_threads, [&](int64_t t, int64_t begin, int64_t end) {
    if (is_bf16) {
      if (square) ema_range<bf16, true>((bf16*)h[t], (const bf16*)e[t], begin, end, b2, w);
      else ema_range<bf16, false>((bf16*)h[t], (const bf16*)e[t], begin, end, b2, w);
    } else {
      if (square) ema_range<float, true>((float*)h[t], (const float*)e[t], begin, end, b2, w);
      else ema_range<float, false>((float*)h[t], (const float*)e[t], begin, end, b2, w);
    }
  });
}
"""

_kernels = {}  # device type -> loaded kernels, or the reason they cannot be had
_warned_fallback = set()  # device types whose fallback to foreach was already announced


def _build_cpu_kernels():
    """Compile the C++ kernels on first use (cached on disk, keyed by source and flags) and load them."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} found (install g++ or set CXX)")
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]  # what ATen's own kernels use on this CPU, FMA included
    if torch.backends.cpu.get_cpu_capability() == "AVX512":  # as ATen's: 16 floats per vector
        flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mprefer-vector-width=512"]
    key = hashlib.sha256("\0".join([_CPU_SOURCE, compiler, *flags]).encode()).hexdigest()[:16]
    cache_dir = os.path.join(os.environ.get("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions")), "sophia")
    library = os.path.join(cache_dir, f"sophia_cpu_{key}.so")
    if not os.path.exists(library):
        os.makedirs(cache_dir, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir) as build_dir:
            output = os.path.join(build_dir, "sophia_cpu.so")
            result = subprocess.run([compiler, *flags, "-x", "c++", "-", "-o", output],
                                    input=_CPU_SOURCE, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-1000:]}")
            os.replace(output, library)  # atomic: processes building at once (DDP ranks) never load half a file
    lib = ctypes.CDLL(library)  # libgomp is the one torch already loaded (same soname)
    lib.sophia_step.restype = None
    lib.sophia_step.argtypes = [ctypes.c_int, ctypes.c_int64] + [ctypes.c_void_p] * 5 + [ctypes.c_double] * 6 + [ctypes.c_int] * 2
    lib.sophia_update_hessian.restype = None
    lib.sophia_update_hessian.argtypes = [ctypes.c_int, ctypes.c_int64] + [ctypes.c_void_p] * 3 + [ctypes.c_double] * 2 + [ctypes.c_int] * 2
    return lib


def _fused_kernels(device_type):
    """The fused kernels for a device type, or a string saying why there are none (computed once)."""
    if device_type not in _kernels:
        try:
            if device_type == "cpu":
                _kernels[device_type] = _build_cpu_kernels()
            elif device_type == "cuda":
                if triton is None:
                    raise RuntimeError("triton is not installed")
                _kernels[device_type] = triton  # the kernels below; launched by _launch
            else:
                raise RuntimeError(f"no fused kernel for device type {device_type!r}")
        except (RuntimeError, OSError) as error:
            _kernels[device_type] = f"SophiaG fused kernel unavailable on {device_type}: {error}"
    return _kernels[device_type]


def _pointers(tensors):
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _numels(tensors):
    return (ctypes.c_int64 * len(tensors))(*[t.numel() for t in tensors])


def _fusable(tensors):
    """Whether the fused kernels take these tensors: contiguous, one dtype, fp32 or bf16."""
    dtype = tensors[0].dtype
    return dtype in (torch.float32, torch.bfloat16) and all(t.is_contiguous() and t.dtype == dtype for t in tensors)


def _aten_cpu_addend(value, dtype):
    """The scalar as ATen's CPU add_ uses it: alpha or a number operand in the tensor's dtype (bf16:
    1 - 0.965 -> 0.0349121; mul_, addcmul_ keep float). The CPU kernel takes it to match."""
    return torch.tensor(value, dtype=dtype).item()


def _fused_step(params, grads, exp_avgs, hessians, steps, *, lr, beta1, rho, weight_decay, bs, maximize):
    torch._foreach_add_(steps, 1.0)
    # the scalars are computed in double exactly as the reference's Python expressions compute them
    decay, one_minus_beta1, rho_bs, neg_lr = 1 - lr * weight_decay, 1 - beta1, rho * bs, -lr
    for params, grads, exp_avgs, hessians in _by_device_and_dtype(params, grads, exp_avgs, hessians):
        if _fused_kernels(params[0].device.type) is triton:
            _launch(_sophia_step_kernel, [params, grads, exp_avgs, hessians], decay, beta1,
                    one_minus_beta1, rho_bs, neg_lr, MAXIMIZE=bool(maximize))
        else:
            dtype = params[0].dtype
            _fused_kernels("cpu").sophia_step(
                dtype == torch.bfloat16, len(params), _pointers(params), _pointers(grads),
                _pointers(exp_avgs), _pointers(hessians), _numels(params), decay, beta1,
                _aten_cpu_addend(one_minus_beta1, dtype), rho_bs, _aten_cpu_addend(EPS, dtype), neg_lr,
                maximize, torch.get_num_threads())


def _fused_update_hessian(hessians, estimates, *, beta2, square):
    for hessians, estimates in _by_device_and_dtype(hessians, estimates):
        if _fused_kernels(hessians[0].device.type) is triton:
            _launch(_update_hessian_kernel, [hessians, estimates], beta2, 1 - beta2,
                    SQUARE=bool(square))
        else:
            dtype = hessians[0].dtype
            weight = 1 - beta2 if square else _aten_cpu_addend(1 - beta2, dtype)  # addcmul_ vs add_(alpha=)
            _fused_kernels("cpu").sophia_update_hessian(
                dtype == torch.bfloat16, len(hessians), _pointers(hessians), _pointers(estimates),
                _numels(hessians), beta2, weight, square, torch.get_num_threads())

# -----------------------------------------------------------------------------
# Fused CUDA kernels (Triton): one launch per (param group, dtype); each program finds its tensor
# through a block -> tensor map and a device table of addresses, sizes and first blocks. Scalars are
# runtime arguments, so an lr schedule never recompiles. fp32 math rounded where the reference
# rounds; the GPU may fuse multiply-adds unlike ATen, so results agree to a few ulps, not bitwise.

_BLOCK = 4096  # elements per program
_block_maps = {}  # (device, sizes) -> (block -> tensor map, first block of each tensor)

if triton is not None:
    @triton.jit
    def _as_stored(x, DTYPE: tl.constexpr):
        return x.to(DTYPE).to(tl.float32)

    @triton.jit
    def _sophia_step_kernel(table, block_to_tensor, n, decay, beta1, one_minus_beta1, rho_bs, neg_lr,
                            MAXIMIZE: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
        # table rows: param, grad, exp_avg, hessian addresses, numel, first block; one column per tensor
        block = tl.program_id(0)
        t = tl.load(block_to_tensor + block)
        numel = tl.load(table + 4 * n + t)
        offsets = (block - tl.load(table + 5 * n + t)) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        p_ptr = tl.load(table + t).to(tl.pointer_type(DTYPE))
        g_ptr = tl.load(table + n + t).to(tl.pointer_type(DTYPE))
        m_ptr = tl.load(table + 2 * n + t).to(tl.pointer_type(DTYPE))
        h_ptr = tl.load(table + 3 * n + t).to(tl.pointer_type(DTYPE))
        param = tl.load(p_ptr + offsets, mask=mask).to(tl.float32)
        grad = tl.load(g_ptr + offsets, mask=mask).to(tl.float32)
        avg = tl.load(m_ptr + offsets, mask=mask).to(tl.float32)
        hess = tl.load(h_ptr + offsets, mask=mask).to(tl.float32)
        if MAXIMIZE:
            grad = -grad
        param = _as_stored(param * decay, DTYPE)
        avg = _as_stored(avg * beta1, DTYPE)
        avg = _as_stored(avg + one_minus_beta1 * grad, DTYPE)
        hess = tl.where(hess < 0.0, 0.0, hess)
        denom = _as_stored(_as_stored(rho_bs * hess, DTYPE) + 1e-15, DTYPE)
        ratio = _as_stored(tl.abs(avg) / denom, DTYPE)
        ratio = tl.where(ratio > 1.0, 1.0, ratio)
        sign = tl.where(avg > 0.0, 1.0, tl.where(avg < 0.0, -1.0, 0.0))
        tl.store(p_ptr + offsets, (param + (neg_lr * sign) * ratio).to(DTYPE), mask=mask)
        tl.store(m_ptr + offsets, avg.to(DTYPE), mask=mask)

    @triton.jit
    def _update_hessian_kernel(table, block_to_tensor, n, beta2, one_minus_beta2,
                               SQUARE: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
        # table rows: hessian, estimate addresses, numel, first block
        block = tl.program_id(0)
        t = tl.load(block_to_tensor + block)
        numel = tl.load(table + 2 * n + t)
        offsets = (block - tl.load(table + 3 * n + t)) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        h_ptr = tl.load(table + t).to(tl.pointer_type(DTYPE))
        e_ptr = tl.load(table + n + t).to(tl.pointer_type(DTYPE))
        hess = _as_stored(tl.load(h_ptr + offsets, mask=mask).to(tl.float32) * beta2, DTYPE)
        est = tl.load(e_ptr + offsets, mask=mask).to(tl.float32)
        if SQUARE:
            hess = hess + (one_minus_beta2 * est) * est
        else:
            hess = hess + one_minus_beta2 * est
        tl.store(h_ptr + offsets, hess.to(DTYPE), mask=mask)


def _launch_table(device, tensor_lists):
    """Device table of addresses, sizes and first blocks for one launch, and the block -> tensor map."""
    numels = tuple(t.numel() for t in tensor_lists[0])
    key = (device, numels)
    if key not in _block_maps:
        blocks = [(numel + _BLOCK - 1) // _BLOCK for numel in numels]
        first = [sum(blocks[:i]) for i in range(len(blocks))]
        block_to_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), torch.tensor(blocks))
        _block_maps[key] = (block_to_tensor.to(device), first)
    block_to_tensor, first = _block_maps[key]
    rows = [t.data_ptr() for tensors in tensor_lists for t in tensors] + list(numels) + first
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":  # pinned + non_blocking: queued on the stream, the host does not wait
        table = table.pin_memory().to(device, non_blocking=True)
    return table, block_to_tensor


def _launch(kernel, tensor_lists, *args, **flags):
    """One launch of a Triton kernel over every tensor of the lists (one device, one dtype)."""
    first = tensor_lists[0][0]
    table, block_to_tensor = _launch_table(first.device, tensor_lists)
    if block_to_tensor.numel() == 0:  # only zero-size tensors
        return
    # Triton launches on the current CUDA device; CPU tensors (Triton's interpreter) need none
    cuda = first.device.type == "cuda"
    with torch.cuda.device(first.device) if cuda else contextlib.nullcontext():
        kernel[(block_to_tensor.numel(),)](
            table, block_to_tensor, len(tensor_lists[0]), *args, **flags,
            DTYPE=tl.float32 if first.dtype == torch.float32 else tl.bfloat16, BLOCK=_BLOCK)

# -----------------------------------------------------------------------------

class SophiaG(torch.optim.Optimizer):
    r"""SophiaG: momentum divided by a diagonal curvature estimate, clipped per coordinate.

    For each parameter tensor θ with gradient g (negated if ``maximize``), momentum m
    (``exp_avg``), Hessian-diagonal estimate h (``hessian``), at every ``step(bs=bs)``::

        step ← step + 1                                       (a counter: no bias correction)
        θ    ← θ · (1 − lr · weight_decay)                     (decoupled weight decay)
        m    ← β1 · m + (1 − β1) · g
        θ    ← θ − lr · clip( m / (ρ · bs · h⁺ + ε), −1, 1 )  h⁺ = max(h, 0), ε = 1e-15

    and at every ``update_hessian()`` (every k steps, in the official loop k = 10)::

        h ← β2 · h + (1 − β2) · ĝ ⊙ ĝ      (GNB, Sophia-G: ĝ = .grad of sampled_label_loss(logits))
        h ← β2 · h + (1 − β2) · ĥ          (``hessian_estimates=ĥ``: hutchinson_hessian(), Sophia-H)

    A coordinate whose |m| ≥ ρ·bs·h⁺ is clipped and moves by lr·sign(m); the others move by
    lr·m/(ρ·bs·h), a Newton-like step. While h = 0 (before the first Hessian update) all are
    clipped: signed momentum. GNB keeps h ≥ 0 (the official update); a Hutchinson h ≤ 0 takes the
    full signed step (the paper's max(γh, ε)).

    Units of ``bs``: ρ·bs·h must be the curvature of the *mean* loss. For GNB, h is an EMA of ĝ⊙ĝ,
    ĝ the mean loss's gradient over the B tokens of the Hessian batch, and B·ĝ⊙ĝ estimates the
    Gauss-Newton diagonal: ``bs = B`` = micro-batches × batch_size × block_size × ranks when
    accumulation divides the loss by the micro-batches and DDP averages (official loop: a training
    step's batch, 480·1024 = 491,520 tokens). Estimates that already are Hessian diagonals of the
    mean loss (Hutchinson): ``bs=1``. clip_grad_norm_ on ĝ before update_hessian() rescales h.

    Effective β2: h moves only at Hessian updates, every k steps, so β2 per update is
    β2^(1/k) per step, a horizon of k/(1 − β2) steps (0.99 with k = 10: 0.999, about 1000 steps).

    Win rate (``diagnostics()['win_rate']``, the official ``train/win_rate``): the fraction of
    coordinates *not* clipped; larger ρ, larger win rate, smaller updates. Healthy: 0.1–0.5, peaking
    early, then stable. Near 0 the curvature goes unused (steps are lr·sign(m)): raise ρ, check bs.
    Near 1 the clip guards nothing: lower ρ. If the loss blows up, lower lr or raise ρ.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr (float): learning rate, the largest step per coordinate (default 1e-4).
        betas (tuple[float, float]): β1 for the momentum, β2 for the Hessian EMA per
            update_hessian() call (default (0.965, 0.99)).
        rho (float): ρ, the clipping threshold scale (default 0.04; 0.05 for GPT-2 small).
        weight_decay (float): decoupled weight decay (default 0.1).
        maximize (bool): maximize the objective instead of minimizing it (default False).
        capturable (bool): step counter on the parameters' device, for CUDA graphs (default False).
        foreach (bool, optional): True: torch._foreach_* ops; False: the reference. (default None)
        fused (bool, optional): True: one fused pass per tensor, raising if it cannot be built. Both
            flags None: fused where it can be built, else foreach after one warning. (default None)
    """

    def __init__(self, params, lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=1e-1, *,
                 maximize=False, capturable=False, foreach=None, fused=None):
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr} (must be >= 0)")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]} (must be in [0, 1))")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]} (must be in [0, 1))")
        if not 0.0 <= rho:
            raise ValueError(f"Invalid rho value: {rho} (must be >= 0)")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay} (must be >= 0)")
        if fused and foreach:
            raise ValueError("SophiaG: fused=True and foreach=True cannot be combined; pick one")
        defaults = dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, maximize=maximize,
                        capturable=capturable, foreach=foreach, fused=fused)
        super().__init__(params, defaults)
        self.last_bs = None  # bs of the last step(), for diagnostics()

    def __setstate__(self, state):
        super().__setstate__(state)
        # groups from the official class or older versions lack flags: take this optimizer's own
        for group in self.param_groups:
            for key, default in (("maximize", False), ("capturable", False), ("foreach", None), ("fused", None)):
                group.setdefault(key, self.defaults.get(key, default))
        for state in self.state.values():
            if "step" in state and not torch.is_tensor(state["step"]):
                state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)
        self.__dict__.setdefault("last_bs", None)

    def state_dict(self):
        state_dict = super().state_dict()
        state_dict["last_bs"] = self.last_bs  # so that diagnostics() works right after a resume
        return state_dict

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # state dicts of the official class and older versions have none: keep this one's
        self.last_bs = state_dict.get("last_bs", self.last_bs)

    def _init_state(self, param, group):
        state = self.state[param]
        if len(state) == 0:
            # the official layout: a float32 step on the host unless capturable, state like the param
            state["step"] = (torch.zeros((), dtype=torch.float32, device=param.device) if group["capturable"]
                             else torch.tensor(0.0, dtype=torch.float32))
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    def _implementation(self, group, tensors):
        """'reference', 'foreach' or 'fused' for one parameter's tensors (param, grad, exp_avg, hessian)."""
        device_type = tensors[0].device.type
        if group["fused"]:
            kernels = _fused_kernels(device_type)
            if isinstance(kernels, str):
                raise RuntimeError(f"{kernels}; use fused=False")
            return "fused" if _fusable(tensors) else "foreach"
        if group["foreach"] is False:
            return "reference"
        if group["foreach"] is None and group["fused"] is None:
            kernels = _fused_kernels(device_type)
            if not isinstance(kernels, str):
                return "fused" if _fusable(tensors) else "foreach"
            if device_type in ("cpu", "cuda") and device_type not in _warned_fallback:
                _warned_fallback.add(device_type)
                warnings.warn(f"{kernels}; falling back to foreach=True (slower)")
        return "foreach"

    def _split_by_implementation(self, group, tensor_lists):
        """Split parallel lists (params, grads, exp_avgs, hessians, steps) by implementation."""
        return _split(tensor_lists, lambda ts: self._implementation(group, ts[:4])).items()

    @torch.no_grad()
    def step(self, closure=None, bs=5120):
        """One optimizer step. bs: tokens of the Hessian batch (class docstring; official: 5120)."""
        if not bs > 0:
            raise ValueError(f"Invalid bs value: {bs} (tokens in the Hessian batch, must be > 0)")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, hessians, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SophiaG does not support sparse gradients; use dense gradients")
                state = self._init_state(p, group)
                params.append(_local(p))
                grads.append(_local(p.grad))
                exp_avgs.append(_local(state["exp_avg"]))
                hessians.append(_local(state["hessian"]))
                steps.append(state["step"])
            implementations = {"reference": _single_tensor_step, "foreach": _multi_tensor_step, "fused": _fused_step}
            for impl, tensors in self._split_by_implementation(group, [params, grads, exp_avgs, hessians, steps]):
                implementations[impl](*tensors, lr=group["lr"], beta1=group["betas"][0], rho=group["rho"],
                                      weight_decay=group["weight_decay"], bs=bs, maximize=group["maximize"])
        self.last_bs = bs
        return loss

    @torch.no_grad()
    def update_hessian(self, hessian_estimates=None):
        """h ← β2·h + (1−β2)·ĝ⊙ĝ from each .grad (GNB), or h ← β2·h + (1−β2)·ĥ from hessian_estimates.

        hessian_estimates: None, or one Hessian-diagonal estimate per parameter of param_groups, in
        order; None (or no .grad, for GNB) skips one. Creates missing state: may precede step()."""
        all_params = [p for group in self.param_groups for p in group["params"]]
        if hessian_estimates is not None:
            hessian_estimates = list(hessian_estimates)
            if len(hessian_estimates) != len(all_params):
                raise ValueError(f"hessian_estimates has {len(hessian_estimates)} entries but the optimizer has "
                                 f"{len(all_params)} parameters: pass one (or None) per parameter, in order")
        index = 0
        for group in self.param_groups:
            hessians, estimates = [], []
            for p in group["params"]:
                estimate = p.grad if hessian_estimates is None else hessian_estimates[index]
                index += 1
                if estimate is None:
                    continue
                if estimate.is_sparse:
                    raise RuntimeError("SophiaG does not support sparse gradients; use dense gradients")
                if estimate.shape != p.shape:
                    raise ValueError(f"hessian_estimates[{index - 1}] has shape {tuple(estimate.shape)} "
                                     f"but its parameter has shape {tuple(p.shape)}")
                hessians.append(_local(self._init_state(p, group)["hessian"]))
                estimates.append(_local(estimate).to(p.dtype))
            implementations = {"reference": _single_tensor_update_hessian, "foreach": _multi_tensor_update_hessian,
                               "fused": _fused_update_hessian}
            for impl, tensors in self._split_by_implementation(group, [hessians, estimates]):
                implementations[impl](*tensors, beta2=group["betas"][1], square=hessian_estimates is None)

    @torch.no_grad()
    def diagnostics(self, bs=None):
        """A dict of 0-dim float32 tensors on the params' device, without host syncs (read at most
        once per log interval): win_rate, the fraction not clipped, |m| < ρ·bs·h⁺ + ε (bs: the last
        step()'s if None); hessian_norm, hessian_norm2: L1, L2 of all h; momentum_norm: L2 of m."""
        bs = self.last_bs if bs is None else bs
        if bs is None:
            raise ValueError("SophiaG.diagnostics(): no step() taken since construction or loading; pass bs=")
        # sums per sharding (None: whole tensors) over this process's shards, then over processes
        # with different shards (not HSDP's replicas): whole-model values, as without sharding
        by_sharding, numel = {}, 0
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                h, m = state["hessian"], state["exp_avg"]
                numel += m.numel()  # a DTensor's numel is the whole tensor's
                key = (h.device_mesh, h.placements) if DTensor is not None and isinstance(h, DTensor) else None
                hessians, exp_avgs, not_clipped = by_sharding.setdefault(key, ([], [], []))
                h, m = _local(h), _local(m)
                hessians.append(h)
                exp_avgs.append(m)
                not_clipped.append((m.abs() < h.clamp(min=0) * (group["rho"] * bs) + EPS).sum())
        if not by_sharding:
            raise ValueError("SophiaG.diagnostics(): no parameter has optimizer state yet; call step() first")
        device = next(iter(by_sharding.values()))[0][0].device
        sums = []
        for key, (hessians, exp_avgs, not_clipped) in by_sharding.items():
            def stacked(values):
                return torch.stack([v.to(device) for v in values])
            partial = torch.stack([  # not clipped, L1 of h, L2² of h, L2² of m
                stacked(not_clipped).sum().float(),
                stacked(torch._foreach_norm(hessians, 1, dtype=torch.float32)).sum(),
                stacked(torch._foreach_norm(hessians, 2, dtype=torch.float32)).square().sum(),
                stacked(torch._foreach_norm(exp_avgs, 2, dtype=torch.float32)).square().sum()])
            if key is not None:
                mesh, placements = key
                partial = DTensor.from_local(partial, mesh, [Partial() if placement.is_shard() else Replicate()
                                                             for placement in placements]).full_tensor()
            sums.append(partial)
        total = torch.stack(sums).sum(0)
        return {
            "win_rate": total[0] / max(numel, 1),
            "hessian_norm": total[1],
            "hessian_norm2": total[2].sqrt(),
            "momentum_norm": total[3].sqrt(),
        }

# -----------------------------------------------------------------------------
# Hessian-diagonal estimators

def _gumbel_argmax(z, generator):
    """argmax(z + G) along the last dim, G standard Gumbel: an index drawn from softmax(z)."""
    u = torch.rand(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    return (z - torch.log(-torch.log(u))).argmax(dim=-1)


def sample_labels(logits, generator=None):
    """One label per row of logits (..., V), drawn from softmax(logits) in two exact Gumbel-max
    draws: a chunk of c entries (c: the smallest divisor of V >= sqrt(V)) with probability
    proportional to exp(logsumexp of its logits), then an entry of its softmax. V/c + c random
    numbers per row instead of V make it cheap on a GPU (GPT-2's 50304 = 192 chunks of 262); the
    full-size work is one read of the logits. No gradient flows. float32 Gumbel noise is <= 16.6,
    so an entry ~17 nats below its group's largest (p < 1e-7) is drawn slightly too rarely.
    generator: on the logits' device, or None for the global RNG (torch.compile-friendly)."""
    V = logits.size(-1)
    c = next(d for d in range(math.isqrt(V - 1) + 1, V + 1) if V % d == 0)
    chunks = logits.detach().float().reshape(-1, V // c, c)
    chunk = _gumbel_argmax(torch.logsumexp(chunks, dim=-1), generator)  # (N,) which chunk
    within = chunks.gather(1, chunk.view(-1, 1, 1).expand(-1, 1, c)).squeeze(1)  # (N, c) its logits
    return (chunk * c + _gumbel_argmax(within, generator)).view(logits.shape[:-1])


def sampled_label_loss(logits, generator=None):
    """Mean cross-entropy of logits (..., V) against labels from sample_labels(). Backpropagate it,
    call update_hessian(): B·ĝ⊙ĝ, ĝ the .grad, is the Gauss-Newton-Bartlett estimate of the
    Gauss-Newton diagonal of the mean loss over B positions (pass step(bs=B)), unbiased since each
    position's gradient has mean zero under the model's own labels. generator: as sample_labels."""
    labels = sample_labels(logits, generator)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))


def hutchinson_hessian(loss, params, generator=None):
    """Hutchinson estimate u ⊙ (H u) of the Hessian diagonal of loss, one tensor per param: u has
    ±1 (Rademacher) entries, H u a double-backward Hessian-vector product, E[u ⊙ (H u)] = diag(H);
    params the loss does not depend on (or only linearly) get zeros. Sum the estimates of
    micro-batch losses already divided by their number (and average over ranks), pass them as
    hessian_estimates to update_hessian() and step with bs=1. Entries can be negative (H is
    indefinite): the step treats h ≤ 0 as no curvature. generator: on the params' device."""
    params = list(params)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    # only gradients that depend on the params again can be differentiated a second time
    curved = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    probes = {i: torch.randint(0, 2, params[i].shape, generator=generator, device=params[i].device)
              .to(params[i].dtype).mul_(2).sub_(1) for i in curved}
    products = torch.autograd.grad([grads[i] for i in curved], [params[i] for i in curved],
                                   grad_outputs=[probes[i] for i in curved], allow_unused=True) if curved else []
    estimates = [torch.zeros_like(p) for p in params]
    for i, hu in zip(curved, products):
        if hu is not None:
            estimates[i] = probes[i] * hu
    return [e.detach() for e in estimates]
