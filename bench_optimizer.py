"""
Optimizer-step cost over the parameter shapes of GPT-2 124M (75 tensors, 124.37M values, bias False):
median time of each SophiaG implementation, of update_hessian(), of torch AdamW (foreach and fused),
and of the memory floor of each, all in one process on one device, interleaved round-robin so that a
noisy (shared) machine slows every candidate alike (each visit makes two calls and times the second,
so no candidate inherits the state another leaves behind). The whole measurement is repeated --runs times
(default 3); each run gives a median per candidate, printed as the median over the runs and their range.

Bytes moved per fp32 parameter: SophiaG step 24 (read θ, g, m, h; write θ, m), AdamW 28
(read θ, g, m, v; write θ, m, v), Hessian EMA 12 (read h, g; write h).

Floor: the same reads and writes done by the simplest in-place passes over flat fp32 buffers of one
value per parameter: a.add_(b) reads a and b and writes a back (12 B), a.mul_(1.0) reads and writes a
(8 B). SophiaG step: a.add_(b), c.add_(d); AdamW: a.add_(b), c.mul_(1.0), d.mul_(1.0); Hessian EMA:
a.add_(b). In place, each cache line written was just read, as in the optimizers. A copy into another
buffer (dst.copy_(src), the reference this benchmark used before) is not the same traffic: the CPU
reads each destination line before overwriting it (write-allocate), so 12 counted bytes cost 18 and
the kernels ran in 0.5-0.66 of its time. Each floor keeps its optimizer's mix of reads and writes
instead of dividing bytes by one bandwidth, because a written byte need not cost what a read one does.

The load average is printed before and after. Other processes slow torch's fused AdamW on the CPU
far more than SophiaG's kernel: it forks and joins threads once per tensor, 75 times a step, and each
join waits for whichever thread was descheduled. A ratio to AdamW means something on a quiet machine.

$ python bench_optimizer.py --device=cpu
$ python bench_optimizer.py --device=cuda --repeats=50
"""

import argparse
import json
import os
import statistics
import time

import torch

import sophia


def gpt2_small_shapes(n_layer=12, n_embd=768, vocab_size=50304, block_size=1024):
    shapes = [(vocab_size, n_embd), (block_size, n_embd)]  # wte, wpe
    for _ in range(n_layer):
        shapes += [(n_embd,), (3 * n_embd, n_embd), (n_embd, n_embd),  # ln_1, attn.c_attn, attn.c_proj
                   (n_embd,), (4 * n_embd, n_embd), (n_embd, 4 * n_embd)]  # ln_2, mlp.c_fc, mlp.c_proj
    return shapes + [(n_embd,)]  # ln_f


def spread(values, scale=1.0, digits=2):
    """'median (min-max)' of a list of values, each multiplied by scale."""
    return " ".join([f"{scale * statistics.median(values):.{digits}f}",
                     f"({scale * min(values):.{digits}f}-{scale * max(values):.{digits}f})"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per candidate and run (median reported)")
    parser.add_argument("--runs", type=int, default=3, help="times the whole round-robin measurement is repeated")
    parser.add_argument("--skip-reference", action="store_true", help="skip the slow single-tensor SophiaG")
    parser.add_argument("--n_layer", type=int, default=12, help="the shapes' layers (GPT-2 small's 12)")
    parser.add_argument("--n_embd", type=int, default=768, help="the shapes' width (GPT-2 small's 768)")
    parser.add_argument("--json", default="",
                        help="also write each candidate's per-run medians (ms) to this file")
    args = parser.parse_args()
    device = torch.device(args.device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    generator = torch.Generator(device=device).manual_seed(0)
    shapes = gpt2_small_shapes(args.n_layer, args.n_embd)
    # one set of parameters and gradients shared by all optimizers: each step only moves the values
    params = [torch.nn.Parameter(0.02 * torch.randn(s, device=device, generator=generator)) for s in shapes]
    for p in params:
        p.grad = 1e-3 * torch.randn(p.shape, device=device, generator=generator)
    n_values = sum(p.numel() for p in params)

    sophia_kwargs = dict(lr=6e-4, betas=(0.965, 0.99), rho=0.05, weight_decay=0.2)
    default = sophia.SophiaG(params, **sophia_kwargs)
    optimizers = {"SophiaG default": default}
    if not args.skip_reference:
        optimizers["SophiaG reference"] = sophia.SophiaG(params, foreach=False, **sophia_kwargs)
    optimizers["SophiaG foreach"] = sophia.SophiaG(params, foreach=True, **sophia_kwargs)
    optimizers["SophiaG fused"] = sophia.SophiaG(params, fused=True, **sophia_kwargs)
    optimizers["AdamW foreach"] = torch.optim.AdamW(params, lr=6e-4, foreach=True)
    optimizers["AdamW fused"] = torch.optim.AdamW(params, lr=6e-4, fused=True)
    default_impl = default._implementation(default.param_groups[0], [params[0], params[0].grad] * 2)
    print(f"{len(params)} tensors, {n_values / 1e6:.2f}M values, "
          + (f"device cpu, {torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name())
          + f"; default SophiaG path: {default_impl}; load average {os.getloadavg()[0]:.2f}")

    # flat buffers for the floors; adding zeros and multiplying by one keep their values as they are
    a, c = (torch.randn(n_values, device=device, generator=generator) for _ in range(2))
    b, d = (torch.zeros(n_values, device=device) for _ in range(2))
    candidates = {name: (lambda opt=opt: opt.step(bs=491_520) if isinstance(opt, sophia.SophiaG) else opt.step())
                  for name, opt in optimizers.items()}
    candidates["update_hessian (default)"] = default.update_hessian
    floors = {  # candidate-name prefix -> the floor's row
        "SophiaG": ("floor of SophiaG, 24 B", lambda: (a.add_(b), c.add_(d))),
        "AdamW": ("floor of AdamW, 28 B", lambda: (a.add_(b), c.mul_(1.0), d.mul_(1.0))),
        "update_hessian": ("floor of update_hessian, 12 B", lambda: a.add_(b)),
    }
    candidates.update(floors.values())

    for name, run in candidates.items():  # warm up: allocate state, build kernels, touch every page
        run()
        run()
    medians = {name: [] for name in candidates}  # one median per run
    for _ in range(args.runs):
        times = {name: [] for name in candidates}
        for _ in range(args.repeats):
            for name, run in candidates.items():
                # Time the second of two calls: the first call after another candidate ran up to a
                # third slower or faster on the 2-core test machine depending on which candidate
                # that was (SophiaG default and fused, the same kernel, differed by as much).
                run()
                sync()
                start = time.perf_counter()
                run()
                sync()
                times[name].append(time.perf_counter() - start)
        for name, seconds in times.items():
            medians[name].append(statistics.median(seconds))

    def ratios(name, other):  # one ratio per run
        return [x / y for x, y in zip(medians[name], medians[other])]

    def floor_of(name):
        return next((floor for prefix, (floor, _) in floors.items() if name.startswith(prefix)), None)

    print(f"{args.runs} runs of {args.repeats} interleaved calls per candidate, a median per run; the median of "
          f"those and their range; load average now {os.getloadavg()[0]:.2f}")
    print(f"{'':30s} {'ms (min-max)':>26s} {'/ AdamW fused':>14s} {'/ floor':>8s}")
    for name in candidates:
        floor = floor_of(name)
        print(f"{name:30s} {spread(medians[name], 1e3, 1):>26s} "
              f"{statistics.median(ratios(name, 'AdamW fused')):14.2f} "
              + (f"{statistics.median(ratios(name, floor)):8.2f}" if floor else ""))
    target = 0.9 if device.type == "cpu" else 1.0
    print(f"median (min-max) over {args.runs} runs:")
    print(f"default SophiaG step / AdamW fused: {spread(ratios('SophiaG default', 'AdamW fused'))} (target <= {target})")
    print(f"  the same ratio for the floors, 24 B / 28 B: {spread(ratios(floor_of('SophiaG'), floor_of('AdamW')))}")
    print(f"update_hessian / floor of its bytes: {spread(ratios('update_hessian (default)', floor_of('update_hessian')))}"
          " (target <= 1.5)")
    if args.json:
        device_name = "cpu" if device.type == "cpu" else torch.cuda.get_device_name()
        with open(args.json, "w") as f:
            json.dump(dict(device=device_name, tensors=len(params), values=n_values,
                           default_path=default_impl, runs=args.runs, repeats=args.repeats,
                           target=target,
                           ms={name: [1e3 * m for m in medians[name]] for name in candidates},
                           floors={name: floor_of(name) for name in candidates if floor_of(name)}),
                      f, indent=1)


if __name__ == "__main__":
    main()
