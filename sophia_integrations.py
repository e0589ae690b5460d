"""
Sophia-G inside the trainers people already use: the Hugging Face Trainer and Lightning.

    from sophia import SophiaG
    from sophia_integrations import SophiaTrainerMixin         # Hugging Face (transformers)
    class SophiaTrainer(SophiaTrainerMixin, Trainer): pass   # or (SophiaTrainerMixin, YourTrainer)
    trainer = SophiaTrainer(model=model, args=args, train_dataset=data, hess_interval=10,
                            optimizers=(SophiaG(model.parameters(), lr=6e-4, rho=0.05), None))

    from sophia_integrations import SophiaLightningCallback    # Lightning (the `lightning` package)
    callback = SophiaLightningCallback(lambda module, batch: module.model(input_ids=batch).logits)

Both run the Hessian pass of the official loop, which no trainer knows about, and pass bs to
SophiaG.step(), which the trainers call without it:
- Schedule: once per optimizer step, after every hess_interval-th step (the official schedule),
  with the weights those steps produced.
- Batch: the first micro-batch of the next step, before that step's own forward. The official
  loop draws a fresh batch; inside a trainer that would take batches out of the trainer's epoch
  and shift its data order, epoch counts and the batches it skips on resume. The pass does not
  use the batch's labels (it samples its own from the model's softmax), and that batch's
  training gradient enters the momentum the new h divides with weight 1 - beta1 (0.035).
- Labels: sampled from the model's own softmax (sophia.sampled_label_loss) with a generator
  seeded from (seed, step) alone: a resumed run draws what an uninterrupted one draws, and the
  global RNG (dropout, shuffling) never sees the pass.
- The sampled gradient is averaged over processes, unscaled where a GradScaler scaled it,
  clipped to norm hess_grad_clip (1.0, as the official loop clips it), and skipped (counted in
  the logs as hessian_skipped) where it is not finite; then SophiaG.update_hessian().
- bs = the Hessian micro-batch's positions x processes (per_device_train_batch_size x sequence
  length x world size): the tokens whose mean sampled loss gave the gradient. It is the bs of
  every step until the next pass; after a resume, until the first pass, SophiaG's own last_bs
  from the checkpoint. On a fresh start no pass has run and h = 0, where bs has no effect.
- The win rate and norms of SophiaG.diagnostics() join the trainer's logs.

Hugging Face: a mixin, not a callback, because a callback receives the bare model, not the
DistributedDataParallel wrapper that averages gradients over processes, and cannot reach the
micro-batch; a subclass of Trainer would not compose with users' own Trainer subclasses, while
the mixin goes in front of any of them (its methods call super()). The pass goes through the
wrapped model inside accelerate's trigger_sync_in_backward, so it is averaged even on a
micro-batch where the Trainer has turned gradient sync off; it sits on the first micro-batch,
before any training gradient exists, so it needs no copy of them. DeepSpeed and FSDP are
refused: both own the gradients (partitioned, sharded) where the pass reads and clips them.

Lightning: a callback, in on_train_batch_start, outside the LightningModule's forward. It takes
the sampled gradient with torch.autograd.grad, which leaves .grad and DDP's reducer alone
(a second backward inside one DDP forward would not be averaged), and averages it over
processes itself. Works with automatic optimization (gradient_clip_val and the schedule from
configure_optimizers as usual) and with manual optimization, where clipping and the schedule are
the module's: self.clip_gradients(optimizer, gradient_clip_val=1.0) before optimizer.step() and
self.lr_schedulers().step() after it (forgotten, a warm-up leaves lr at 0 and nothing warns).
configure_optimizers returns one optimizer, a SophiaG.

transformers and lightning are imported only when the class that needs them is used; sophia.py
itself needs nothing but torch.
"""

import torch
import torch.distributed as dist

from sophia import SophiaG, sampled_label_loss


def hessian_generator(seed, step, device):
    """The random stream of the sampled labels of the Hessian pass after `step` optimizer steps:
    a function of (seed, step) alone."""
    return torch.Generator(device=device).manual_seed(seed * 2**32 + step)


def find_sophia(optimizer):
    """The SophiaG inside the wrappers trainers put around an optimizer (accelerate's
    AcceleratedOptimizer, Lightning's LightningOptimizer), which have no update_hessian()."""
    inner = optimizer
    while not isinstance(inner, SophiaG):
        inner = getattr(inner, "optimizer", None)
        if inner is None:
            name = type(optimizer).__name__
            raise TypeError(f"the trainer's optimizer is {name}, not SophiaG; pass a SophiaG "
                            f"(Hugging Face: Trainer(optimizers=(SophiaG(...), None)))")
    return inner


def update_hessian_from_grads(optimizer, params, grad_clip, grad_scale=None):
    """The end of a Hessian pass whose sampled gradient is in .grad, averaged over processes:
    unscale it (grad_scale: the GradScaler's scale it was computed at), clip its norm at
    grad_clip, and, where it is finite, the Hessian EMA. The gradients are then freed.
    Returns True if the EMA was updated. The norm is the same on every process (the gradient
    is), so every process takes the same branch."""
    grads = [p.grad for p in params if p.grad is not None]
    if grad_scale is not None:
        torch._foreach_mul_(grads, 1.0 / grad_scale)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    finite = bool(torch.isfinite(norm))
    if finite:  # a non-finite sampled gradient must not reach the Hessian EMA
        optimizer.update_hessian()
    for p in params:
        p.grad = None
    return finite


class _BsHook:
    """A step pre-hook on SophiaG that passes the trainer's bs to step() calls that give none
    (the trainers call step() or step(closure))."""

    def __init__(self, optimizer):
        self.bs = None  # positions of the latest Hessian pass x processes
        optimizer.register_step_pre_hook(self)

    def __call__(self, optimizer, args, kwargs):
        if len(args) >= 3 or "bs" in kwargs:  # args: (optimizer, closure, bs)
            return None
        bs = self.bs if self.bs is not None else optimizer.last_bs  # last_bs: from a checkpoint
        return (args, dict(kwargs, bs=bs)) if bs is not None else None


def _diagnostics_row(optimizer, skipped):
    """The count of skipped Hessian passes and SophiaG.diagnostics() as plain floats (one read);
    the latter only once a step has run (a GradScaler skips the first steps that overflow)."""
    row = {"hessian_skipped": skipped}
    if optimizer.state and optimizer.last_bs is not None:
        values = optimizer.diagnostics()
        row.update(zip(values, torch.stack(list(values.values())).tolist()))
    return row

# -----------------------------------------------------------------------------
# Hugging Face Trainer

class SophiaTrainerMixin:
    """Put in front of transformers.Trainer or a subclass of it:
    `class SophiaTrainer(SophiaTrainerMixin, Trainer): pass`, built with
    `optimizers=(SophiaG(...), scheduler or None)` and, as keyword arguments, hess_interval and
    hess_grad_clip. The Hessian pass feeds the model the micro-batch without its labels and
    reads `.logits` of the output, as for transformers' language models. See the module
    docstring for what it does and why."""

    def __init__(self, *args, hess_interval=10, hess_grad_clip=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        if not (isinstance(hess_interval, int) and hess_interval >= 1):
            raise ValueError(f"hess_interval={hess_interval!r}: it must be an integer >= 1 "
                             f"(optimizer steps between Hessian passes)")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(f"SophiaTrainerMixin does not support "
                             f"{'DeepSpeed' if self.is_deepspeed_enabled else 'FSDP'}, which owns "
                             f"the gradients the Hessian pass reads and clips; train with DDP")
        find_sophia(self.optimizer)  # a clear error now rather than at the first Hessian pass
        self.hess_interval = hess_interval  # optimizer steps between Hessian passes
        self.hess_grad_clip = hess_grad_clip  # clip the sampled gradient's norm (official: 1.0)
        self._sophia_step_seen = None  # global_step whose first micro-batch has been seen
        self._sophia_hook = None
        self._sophia_skipped = 0  # Hessian passes skipped since the last log

    def training_step(self, model, inputs, *args, **kwargs):
        step = self.state.global_step
        if step != self._sophia_step_seen:  # the first micro-batch of an optimizer step
            self._sophia_step_seen = step
            if self._sophia_hook is None:
                self._sophia_hook = _BsHook(find_sophia(self.optimizer))
            if step > 0 and step % self.hess_interval == 0:
                self._hessian_pass(model, inputs, step)
        return super().training_step(model, inputs, *args, **kwargs)

    def _hessian_pass(self, model, inputs, step):
        """Through `model`, the wrapper the Trainer trains (DDP averages the sampled gradient),
        with gradient sync forced on: on the first of several micro-batches the Trainer has
        turned it off."""
        optimizer = find_sophia(self.optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        inputs = {k: v for k, v in self._prepare_inputs(inputs).items() if k != "labels"}
        scaler = self.accelerator.scaler  # fp16 only
        model.train()
        with self.accelerator.trigger_sync_in_backward(model):
            with self.compute_loss_context_manager():
                logits = model(**inputs).logits
                generator = hessian_generator(self.args.seed, step, logits.device)
                loss = sampled_label_loss(logits, generator)
            # not accelerator.backward(), which would divide by the accumulation steps
            (loss if scaler is None else scaler.scale(loss)).backward()
        self._sophia_hook.bs = logits.shape[:-1].numel() * self.accelerator.num_processes
        scale = None if scaler is None else scaler.get_scale()
        if not update_hessian_from_grads(optimizer, params, self.hess_grad_clip, scale):
            self._sophia_skipped += 1

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self._sophia_hook is not None:  # a training row, after a step
            logs.update(_diagnostics_row(find_sophia(self.optimizer), self._sophia_skipped))
            self._sophia_skipped = 0
        return super().log(logs, *args, **kwargs)

# -----------------------------------------------------------------------------
# Lightning

def _lightning_callback_class():
    from lightning.pytorch import Callback

    class SophiaLightningCallback(Callback):
        """Lightning callback running Sophia-G's Hessian pass and passing bs to step(); see the
        module docstring. logits_fn(module, batch) -> logits (..., vocabulary) of the batch's
        inputs; hess_interval: optimizer steps between Hessian passes; hess_grad_clip: the
        norm the sampled gradient is clipped to (official: 1.0); seed: of the sampled labels.
        Logs win_rate, the norms and hessian_skipped with the module's logger every
        log_every_n_steps."""

        def __init__(self, logits_fn, hess_interval=10, hess_grad_clip=1.0, seed=0):
            if not (isinstance(hess_interval, int) and hess_interval >= 1):
                raise ValueError(f"hess_interval={hess_interval!r}: it must be an integer >= 1 "
                                 f"(optimizer steps between Hessian passes)")
            self.logits_fn = logits_fn
            self.hess_interval = hess_interval
            self.hess_grad_clip = hess_grad_clip
            self.seed = seed  # of the sampled labels' generator (hessian_generator)
            self.step_seen = None  # global_step whose first micro-batch has been seen
            self.step_logged = None  # global_step whose diagnostics were logged
            self.hook = None
            self.skipped = 0  # Hessian passes skipped since the last log

        def on_train_start(self, trainer, pl_module):
            if len(trainer.optimizers) != 1:
                raise ValueError("SophiaLightningCallback takes one optimizer, a SophiaG; "
                                 f"configure_optimizers returned {len(trainer.optimizers)}")
            self.hook = _BsHook(find_sophia(trainer.optimizers[0]))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            step = trainer.global_step
            if step == self.step_seen:
                return
            self.step_seen = step
            if step > 0 and step % self.hess_interval == 0:
                self.hessian_pass(trainer, pl_module, batch, step)

        def hessian_pass(self, trainer, pl_module, batch, step):
            optimizer = find_sophia(trainer.optimizers[0])
            params = [p for group in optimizer.param_groups for p in group["params"]]
            scaler = getattr(trainer.precision_plugin, "scaler", None)  # 16-mixed only
            pl_module.train()
            with torch.enable_grad(), trainer.precision_plugin.forward_context():
                logits = self.logits_fn(pl_module, batch)
                generator = hessian_generator(self.seed, step, logits.device)
                loss = sampled_label_loss(logits, generator)
            loss = loss if scaler is None else scaler.scale(loss)
            grads = torch.autograd.grad(loss, params, allow_unused=True)  # None: unused param
            if trainer.world_size > 1:  # the same params are unused on every process
                for g in grads:
                    if g is not None:
                        dist.all_reduce(g)
                        g.div_(trainer.world_size)
            self.hook.bs = logits.shape[:-1].numel() * trainer.world_size
            saved = [p.grad for p in params]  # the step's own gradient, if any: set aside
            for p, g in zip(params, grads):
                p.grad = g
            scale = None if scaler is None else scaler.get_scale()
            if not update_hessian_from_grads(optimizer, params, self.hess_grad_clip, scale):
                self.skipped += 1
            for p, g in zip(params, saved):
                p.grad = g

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step == self.step_logged or step % trainer.log_every_n_steps:
                return  # a micro-batch without a step (accumulation), or not a log step
            self.step_logged = step
            row = _diagnostics_row(find_sophia(trainer.optimizers[0]), self.skipped)
            pl_module.log_dict(row, on_step=True, on_epoch=False)
            self.skipped = 0

    return SophiaLightningCallback


def __getattr__(name):
    # lightning is imported when SophiaLightningCallback is first used, not with this module
    if name == "SophiaLightningCallback":
        globals()[name] = _lightning_callback_class()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
