"""
Optimizer-step cost over the parameter shapes of GPT-2 124M (75 tensors, 124.37M values, bias False):
median time of each SophiaG implementation, of update_hessian(), of torch AdamW (foreach and fused),
and of a plain memory copy moving the same bytes, all in one process on one device, interleaved
round-robin so that a noisy (shared) machine slows every candidate alike.

Bytes moved per fp32 parameter: SophiaG step 24 (read θ, g, m, h; write θ, m), AdamW 28
(read θ, g, m, v; write θ, m, v), Hessian EMA 12 (read h, g; write h). The copy reference for
update_hessian copies 1.5 fp32 values per parameter (6 B read + 6 B written = 12 B, the EMA's
bytes); the copy bandwidth it measures gives the floor for each step: bytes moved / bandwidth.

$ python bench_optimizer.py --device=cpu
$ python bench_optimizer.py --device=cuda --repeats=50
"""

import argparse
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per candidate (median reported)")
    parser.add_argument("--skip-reference", action="store_true", help="skip the slow single-tensor SophiaG")
    args = parser.parse_args()
    device = torch.device(args.device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    generator = torch.Generator(device=device).manual_seed(0)
    shapes = gpt2_small_shapes()
    # one set of parameters and gradients shared by all optimizers: each step only moves the values
    params = [torch.nn.Parameter(0.02 * torch.randn(s, device=device, generator=generator)) for s in shapes]
    for p in params:
        p.grad = 1e-3 * torch.randn(p.shape, device=device, generator=generator)
    n_values = sum(p.numel() for p in params)
    print(f"{len(params)} tensors, {n_values / 1e6:.2f}M values, device {device}, "
          f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name())

    sophia_kwargs = dict(lr=6e-4, betas=(0.965, 0.99), rho=0.05, weight_decay=0.2)
    default = sophia.SophiaG(params, **sophia_kwargs)
    optimizers = {"SophiaG default": default}
    if not args.skip_reference:
        optimizers["SophiaG reference"] = sophia.SophiaG(params, foreach=False, **sophia_kwargs)
    optimizers["SophiaG foreach"] = sophia.SophiaG(params, foreach=True, **sophia_kwargs)
    optimizers["SophiaG fused"] = sophia.SophiaG(params, fused=True, **sophia_kwargs)
    optimizers["AdamW foreach"] = torch.optim.AdamW(params, lr=6e-4, foreach=True)
    optimizers["AdamW fused"] = torch.optim.AdamW(params, lr=6e-4, fused=True)

    # the copy moving the EMA's bytes: 1.5 fp32 values per parameter each way
    copy_src = torch.randn(3 * n_values // 2, device=device, generator=generator)
    copy_dst = torch.empty_like(copy_src)
    candidates = {name: (lambda opt=opt: opt.step(bs=491_520) if isinstance(opt, sophia.SophiaG) else opt.step())
                  for name, opt in optimizers.items()}
    candidates["update_hessian (default)"] = default.update_hessian
    candidates["copy, 12 B/param"] = lambda: copy_dst.copy_(copy_src)

    times = {name: [] for name in candidates}
    for name, run in candidates.items():  # warm up: allocate state, compile kernels
        run()
        run()
    for _ in range(args.repeats):
        for name, run in candidates.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}

    default_impl = default._implementation(default.param_groups[0], [params[0], params[0].grad] * 2)
    copy_bandwidth = 12 * n_values / median["copy, 12 B/param"]  # bytes read + written per second
    floors = {"SophiaG": 24 * n_values / copy_bandwidth, "AdamW": 28 * n_values / copy_bandwidth,
              "update_hessian": 12 * n_values / copy_bandwidth}
    print(f"copy bandwidth (read + write): {copy_bandwidth / 1e9:.1f} GB/s; default SophiaG path: {default_impl}")
    print(f"{'':28s} {'median ms':>10s} {'/ AdamW fused':>14s} {'/ floor':>8s}")
    for name, seconds in median.items():
        floor = next((f for key, f in floors.items() if name.startswith(key)), None)
        print(f"{name:28s} {1e3 * seconds:10.1f} {seconds / median['AdamW fused']:14.2f} "
              + (f"{seconds / floor:8.2f}" if floor else f"{'':8s}"))
    print(f"default SophiaG step / AdamW fused: {median['SophiaG default'] / median['AdamW fused']:.2f} "
          f"(target <= {0.9 if device.type == 'cpu' else 1.0})")
    print(f"update_hessian / copy of the same bytes: "
          f"{median['update_hessian (default)'] / median['copy, 12 B/param']:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
