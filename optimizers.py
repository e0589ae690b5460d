"""
The optimizers the training scripts train, each behind one small interface, a recipe, so that the
loop (trainer.py) names none of them: AdamWRecipe (train_adam.py), SophiaGRecipe (train_sophiag.py)
and MuonRecipe (train_muon.py).

What a recipe gives the loop:

    defaults(), check(config, checks, world_size)   its config keys and their checks; its own keys
    official_keys(), foreign_keys()                 exist in its script only (others refuse them)
    parameter_groups(model)                         by name: the layout of its state in checkpoints
    recipe = Recipe(config, plan)                   then, for one run:
    build(model, device_type)                       the optimizer
    step(run)                                       the step, through the GradScaler
    after_step(run, iter_num, first)                an extra pass (Sophia's Hessian pass); returns
                                                    the training sequences it drew
    diagnostics(run), report(...)                   what it adds to the log rows and lines
    describe(run), extra_tokens_per_iter(run)       its batch arithmetic line; its tokens, for MFU

A parameter group may carry 'lr_scale', its peak learning rate over learning_rate (trainer.set_lr).
"""

import math

import torch
import torch.distributed as dist

from batches import HESSIAN_STREAM, seed_of
from configurator import ConfigError, default_config
from distributed import set_gradient_sync, whole

class Recipe:
    """What one optimizer adds to the training loop; the defaults are AdamW's (no extra pass, no
    diagnostics). Subclasses set `name` (in checkpoints, metrics.jsonl and compare.py), `title`
    and `script`."""
    name = title = script = None
    divergence_advice = 'Lower the learning rate'  # what a run stopped by non-finite losses should change

    @staticmethod
    def own_defaults():
        return {}

    @classmethod
    def defaults(cls):
        return {**default_config(), **cls.own_defaults()}

    @classmethod
    def check(cls, config, checks, world_size):
        pass

    @classmethod
    def official_keys(cls):
        """The official Sophia scripts' config keys that are none here, as handlers for parse_args
        (each returns the settings it makes and a note); their other keys are keys here too."""
        def optimizer(value, source):
            if value == cls.name:
                return [], f"optimizer_name={value!r}: {cls.script} trains {cls.name}"
            other = RECIPES.get(value)
            trained = ', '.join(f"{r.name} ({r.script})" for r in RECIPES.values())
            raise ConfigError(f"optimizer_name={value!r} ({source}) but {cls.script} trains {cls.name}; "
                              + (f"run {other.script} with this config" if other else
                                 f"this repository trains {trained}"))
        return {'optimizer_name': optimizer,
                'variant': lambda value, source: ([], f"variant={value!r} is ignored: the official "
                                                      f"scripts never read it either")}

    @classmethod
    def foreign_keys(cls):
        """The handlers parse_args takes for keys that are none of this script's: the official
        configs' (official_keys), and the other optimizers' own keys, refused naming their script."""
        def elsewhere(key, other):
            def refuse(value, source):
                raise ConfigError(f"{source}: '{key}' is a key of {other.title}, which {other.script} trains; "
                                  f"{cls.script} trains {cls.title} and has no such key")
            return refuse
        shared = default_config()
        keys = {key: elsewhere(key, other) for other in RECIPES.values() if other is not cls
                for key in other.own_defaults() if key not in shared}
        return {**keys, **cls.official_keys()}

    @staticmethod
    def parameter_groups(model):
        """Parameter names by group: matrices and embeddings (decayed), then biases and LayerNorm
        gains, each in named_parameters' order (nanoGPT's layout too)."""
        params = dict(model.named_parameters())  # the tied lm_head weight appears once, as wte's
        return [[n for n in params if params[n].dim() >= 2], [n for n in params if params[n].dim() < 2]]

    def __init__(self, config, plan):
        self.config, self.plan = config, plan

    def groups(self, model, weight_decays, labels=('decayed', 'non-decayed')):
        """torch.optim's param groups of parameter_groups(model), trainable tensors only, with a
        weight decay each; every trainable parameter in exactly one group."""
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        groups = [dict(params=[trainable[n] for n in names if n in trainable], weight_decay=decay)
                  for names, decay in zip(self.parameter_groups(model), weight_decays)]
        grouped = [id(p) for group in groups for p in group['params']]
        assert len(grouped) == len(set(grouped)) and \
            set(grouped) == {id(p) for p in model.parameters() if p.requires_grad}, \
            "every trainable parameter must be in exactly one group"
        for group, kind in zip(groups, labels):
            print(f"num {kind} parameter tensors: {len(group['params'])}, with "
                  f"{sum(p.numel() for p in group['params']):,} parameters")
        return groups

    def step(self, run):
        run.scaler.step(run.optimizer)

    def after_step(self, run, iter_num, first):
        return 0

    def diagnostics(self, run):
        return {}

    def report(self, run, iter_num, read, row):
        return ''

    def describe(self, run):
        return ''

    def extra_tokens_per_iter(self, run):
        return 0

def fused_adamw(groups, config, device_type):
    """torch's AdamW; the fused kernel updates each tensor in one pass (on GPT-2 124M shapes,
    2-core CPU: 84 ms a step against 340 ms for foreach). torch 2.13 has it on cuda and cpu."""
    use_fused = device_type in ('cuda', 'cpu')
    print(f"using fused AdamW: {use_fused}")
    return torch.optim.AdamW(groups, lr=config['learning_rate'], betas=(config['beta1'], config['beta2']),
                             **(dict(fused=True) if use_fused else dict(foreach=True)))

# -----------------------------------------------------------------------------
# AdamW

class AdamWRecipe(Recipe):
    """AdamW, the baseline: decoupled weight decay on the matrices and embeddings, none on biases
    and LayerNorm gains (GPT-2 practice). Its hyperparameters are default_config's, the official
    GPT-2 small values (lr 6e-4, weight decay 0.1, betas 0.9/0.95, min_lr 3e-5)."""
    name, title, script = 'adamw', 'AdamW', 'train_adam.py'

    @staticmethod
    def own_defaults():
        return dict(out_dir='out-adam', wandb_run_name='gpt2-small-adam')

    def build(self, model, device_type):
        return fused_adamw(self.groups(model, (self.config['weight_decay'], 0.0)), self.config, device_type)

# -----------------------------------------------------------------------------
# Sophia-G

class SophiaGRecipe(Recipe):
    """Sophia-G (sophia.SophiaG): its step takes bs, a Hessian pass (hessian_pass) follows every
    hess_interval-th step, and the win rate and norms join the logs (train_sophiag.py says more)."""
    name, title, script = 'sophiag', 'Sophia-G', 'train_sophiag.py'
    divergence_advice = 'Lower the learning rate or raise rho'

    @staticmethod
    def own_defaults():
        return dict(
            out_dir='out-sophiag',
            wandb_run_name='gpt2-small-sophiag',
            # the official GPT-2 small values: Sophia-G takes the same peak lr as AdamW, more weight decay
            learning_rate=6e-4,
            weight_decay=0.2,
            beta1=0.965,  # momentum
            beta2=0.99,  # Hessian EMA, per Hessian update (so 0.99 per 10 steps at hess_interval=10)
            min_lr=1.5e-5,
            # Sophia's own keys (the other scripts refuse them)
            rho=0.05,  # clipping threshold scale: the update is lr * clip(m / (rho * bs * h), 1); larger rho, more coordinates unclipped
            hess_interval=10,  # a Hessian pass after every hess_interval-th step
            hess_micro_steps=0,  # micro-batches of a Hessian pass in each process; 0 = gradient_accumulation_steps (the official: as many tokens as a step)
            hessian_estimator='gnb',  # 'gnb' (Sophia-G, labels sampled from the model) or 'hutchinson' (Sophia-H)
            hess_grad_clip=1.0,  # clip the sampled gradient's norm before its square enters the EMA, as the official loop; 0 = off
        )

    @classmethod
    def check(cls, config, checks, world_size):
        checks.positive('rho', 'hess_interval')
        checks.non_negative('hess_micro_steps', 'hess_grad_clip')
        checks.one_of('hessian_estimator', ('gnb', 'hutchinson'))
        if config['data_parallel'] != 'ddp' and config['hessian_estimator'] == 'hutchinson':
            checks.fail(f"{checks.show('hessian_estimator')} takes a double backward through the model, "
                        f"which FSDP's sharded parameters do not support; use --hessian_estimator=gnb or "
                        f"--data_parallel=ddp")

    @classmethod
    def official_keys(cls):
        keys = super().official_keys()
        # the official scripts copy interval into hess_interval before the config file runs, so
        # there a config's interval never took effect; here it does
        keys['interval'] = lambda value, source: ([('hess_interval', value)],
                                                  f"interval={value!r} is the official name of hess_interval: "
                                                  f"a Hessian pass every {value!r} iterations")
        return keys

    def __init__(self, config, plan):
        super().__init__(config, plan)
        world_size = plan.sequences // (plan.micro_steps * config['batch_size'])
        # hess_micro_steps counts a process's micro-batches, as gradient_accumulation_steps does
        self.hess_micro_steps = config['hess_micro_steps'] or plan.micro_steps
        self.hess_sequences = self.hess_micro_steps * config['batch_size'] * world_size  # all processes
        self.hessian_tokens = self.hess_sequences * config['block_size']
        self.hessian_skips = None  # passes skipped since the last log row, a device counter

    @property
    def bs(self):
        """The step's bs (sophia.py): the tokens of the batch the sampled gradients came from; 1 for
        Hutchinson estimates, which are of the mean loss already."""
        return self.hessian_tokens if self.config['hessian_estimator'] == 'gnb' else 1

    def build(self, model, device_type):
        from sophia import SophiaG
        config = self.config
        return SophiaG(self.groups(model, (config['weight_decay'], 0.0)), lr=config['learning_rate'],
                       betas=(config['beta1'], config['beta2']), rho=config['rho'],
                       weight_decay=config['weight_decay'])

    def step(self, run):
        run.scaler.step(run.optimizer, bs=self.bs)

    def hessian_due(self, iter_num):
        """The official schedule: a Hessian pass after every hess_interval-th step."""
        return iter_num % self.config['hess_interval'] == self.config['hess_interval'] - 1

    def after_step(self, run, iter_num, first):
        if not self.hessian_due(iter_num):
            return 0
        if self.hessian_skips is None:
            self.hessian_skips = torch.zeros((), device=run.device)
        self.hessian_skips += 1 - self.hessian_pass(run, first)
        return self.hess_sequences

    def hessian_pass(self, run, first):
        """The Hessian pass over hess_sequences global sequences from `first`, each process over its
        share. Returns a 0-dim device tensor: 1 if the Hessian EMA was updated, 0 if not finite."""
        batch_size = self.config['batch_size']
        start = first + run.rank * self.hess_micro_steps * batch_size
        micro_batches = [start + i * batch_size for i in range(self.hess_micro_steps)]  # their first sequences
        if self.config['hessian_estimator'] == 'gnb':
            return gnb_hessian_pass(run, micro_batches)
        return hutchinson_hessian_pass(run, micro_batches)

    def diagnostics(self, run):
        values = {}
        if self.hessian_skips is not None:
            values['hessian_skips'] = self.hessian_skips.clone()
            self.hessian_skips.zero_()
        if run.optimizer.state:  # no state before the first step or Hessian pass
            # bs given: after a resume, or when every step so far was skipped, no step() has set it
            values.update(run.optimizer.diagnostics(bs=self.bs))
        return values

    def report(self, run, iter_num, read, row):
        # the Hessian EMA has no bias correction: after n updates it holds 1 - beta2^n of its
        # scale, so early on more coordinates are clipped than the EMA will later allow
        updates = iter_num // self.config['hess_interval']
        scale = 1 - self.config['beta2'] ** updates
        row.update({'train/win_rate': read.get('win_rate'), 'hessian_norm': read.get('hessian_norm'),
                    'hessian_norm2': read.get('hessian_norm2'), 'momentum_norm': read.get('momentum_norm'),
                    'hessian_skipped': read.get('hessian_skips', 0.0), 'hessian_ema_scale': scale})
        if 'win_rate' not in read:
            return ''
        line = f", win rate {read['win_rate']:.3f}"
        if scale < 0.9:
            line += f" (Hessian EMA warming up: {scale:.0%} of its scale after {updates} updates)"
        return line

    def describe(self, run):
        steps = self.hess_micro_steps
        return (f"\nHessian pass after every {ordinal(self.config['hess_interval'])} step: {steps} "
                f"micro-batch{'es' if steps > 1 else ''} per process, {self.hessian_tokens:,} tokens "
                f"(bs = {self.bs:,})")

    def extra_tokens_per_iter(self, run):
        return self.hessian_tokens / self.config['hess_interval']

def ordinal(n):
    """'1st', '2nd', '3rd', '4th', '11th', '12th', '13th', '21st', ..."""
    suffix = 'th' if n % 100 in (11, 12, 13) else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')
    return f"{n}{suffix}"

def sampled_loss(model, X, autocast):
    """Mean cross-entropy against labels drawn from the model's own softmax at every position:
    inside the model's forward, so torch.compile fuses the draw with the loss (model.py)."""
    with autocast:
        _, loss = model(X, sample_targets=True)
    return loss

def gnb_hessian_pass(run, micro_batches):
    """Sophia-G: labels sampled from the model's softmax, backward (summed over processes like a
    training step), the sampled gradient clipped at hess_grad_clip as in the official loop, then
    the EMA of its square."""
    rng_devices = [run.device] if run.device.startswith('cuda') else []
    for micro_step, first in enumerate(micro_batches):
        set_gradient_sync(run, micro_step == len(micro_batches) - 1)
        X, _ = run.batch(first)
        # the labels' draw is a function of (seed, sequence) alone, as the data: the global RNG
        # is seeded for it and restored after, so dropout and the rest never see the difference
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed_of(run.config['seed'], HESSIAN_STREAM, first))
            loss = sampled_loss(run.model, X, run.autocast) / len(micro_batches)
        run.scaler.scale(loss).backward()
    grads = [p.grad for p in run.params if p.grad is not None]
    if run.scaler.is_enabled():
        torch._foreach_mul_(grads, 1.0 / run.scaler.get_scale())  # unscale by hand: not a training step
    norm = whole(torch.nn.utils.clip_grad_norm_(run.params, run.config['hess_grad_clip'] or math.inf))
    finite = torch.isfinite(norm)
    if finite.item():  # a non-finite sampled gradient must not reach the Hessian EMA
        run.optimizer.update_hessian()
    run.optimizer.zero_grad(set_to_none=True)
    return finite.float()

def hutchinson_hessian_pass(run, micro_batches):
    """Sophia-H: u ⊙ (H u) with Rademacher u, by double backward on the training loss, summed over
    the micro-batches and averaged over processes. Runs in float32 on the uncompiled model with
    the math attention kernel: double backward needs both."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from sophia import hutchinson_hessian
    params = [p for group in run.optimizer.param_groups for p in group['params']]  # update_hessian's order
    total = [torch.zeros_like(p) for p in params]
    generator = torch.Generator(device=run.device)
    for first in micro_batches:
        X, Y = run.batch(first)
        generator.manual_seed(seed_of(run.config['seed'], HESSIAN_STREAM, first))
        with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
            _, loss = run.raw_model(X, Y)
            estimates = hutchinson_hessian(loss / len(micro_batches), params, generator=generator)
        torch._foreach_add_(total, estimates)
    if run.world_size > 1:
        for t in total:
            dist.all_reduce(t)
        torch._foreach_div_(total, run.world_size)
    finite = torch.stack([torch.isfinite(t).all() for t in total]).all()
    if finite.item():
        run.optimizer.update_hessian(hessian_estimates=total)
    return finite.float()

# -----------------------------------------------------------------------------
# Muon

class MuonRecipe(Recipe):
    """Muon (torch.optim.Muon) on the transformer blocks' weight matrices, AdamW on the rest
    (train_muon.py says where the recipe comes from). The lr is scaled by each matrix's shape:
    'match_rms_adamw' (0.2 * sqrt(max(rows, cols)), arXiv 2502.16982) gives the update AdamW's
    RMS; 'original' (sqrt(max(1, rows/cols))) wants a Muon lr of its own, 0.02-0.05."""
    name, title, script = 'muon', 'Muon', 'train_muon.py'

    @staticmethod
    def own_defaults():
        return dict(
            out_dir='out-muon',
            wandb_run_name='gpt2-small-muon',
            # learning_rate, weight_decay, beta1, beta2 and min_lr are also the AdamW part's
            # Muon's own keys (the other scripts refuse them)
            muon_learning_rate=0.0,  # peak lr of the blocks' matrices; 0 = learning_rate (right with muon_adjust_lr_fn='match_rms_adamw')
            muon_momentum=0.95,  # Muon's momentum
            muon_nesterov=True,  # Nesterov momentum, as modded-nanogpt
            muon_ns_steps=5,  # Newton-Schulz iterations per step
            muon_adjust_lr_fn='match_rms_adamw',  # lr by matrix shape: 'match_rms_adamw' (AdamW's lr carries over) or 'original' (Keller Jordan's, with its own muon_learning_rate)
        )

    @classmethod
    def check(cls, config, checks, world_size):
        checks.non_negative('muon_learning_rate')
        checks.positive('muon_ns_steps')
        if not 0 <= config['muon_momentum'] < 1:
            checks.fail(f"{checks.show('muon_momentum')}: must be in [0, 1)")
        checks.one_of('muon_adjust_lr_fn', ('match_rms_adamw', 'original'))
        if config['data_parallel'] != 'ddp':
            checks.fail(f"{checks.show('data_parallel')}: Muon's Newton-Schulz iteration needs each whole "
                        f"weight matrix, which FSDP's shards split; use --data_parallel=ddp")

    @staticmethod
    def parameter_groups(model):
        """Recipe's two groups for AdamW, less the blocks' 2-D weights: Muon's, the third group."""
        params = dict(model.named_parameters())
        matrices = [n for n in params if n.startswith('transformer.h.') and params[n].dim() == 2]
        return [[n for n in params if params[n].dim() >= 2 and n not in matrices],
                [n for n in params if params[n].dim() < 2], matrices]

    def build(self, model, device_type):
        config = self.config
        lr_scale = (config['muon_learning_rate'] or config['learning_rate']) / config['learning_rate']
        groups = self.groups(model, (config['weight_decay'], 0.0, config['weight_decay']),
                             ('decayed AdamW', 'non-decayed AdamW', 'Muon'))
        groups[2]['lr_scale'] = lr_scale
        print(f"Muon's lr: learning_rate x {lr_scale:g}, adjusted by shape: {config['muon_adjust_lr_fn']}")
        adamw = fused_adamw(groups[:2], config, device_type)
        muon = torch.optim.Muon(groups[2:], lr=config['learning_rate'] * lr_scale,
                                weight_decay=config['weight_decay'], momentum=config['muon_momentum'],
                                nesterov=config['muon_nesterov'], ns_steps=config['muon_ns_steps'],
                                adjust_lr_fn=config['muon_adjust_lr_fn'])
        return MuonWithAdamW(adamw, muon)

class MuonWithAdamW(torch.optim.Optimizer):
    """A torch.optim.AdamW and a torch.optim.Muon over disjoint parameters as one optimizer (one
    step, one list of param groups, AdamW's first, one state) for the GradScaler, the schedule and
    checkpoints. Both compute as themselves: this class only shares their groups and state."""

    def __init__(self, adamw, muon):
        self.adamw, self.muon = adamw, muon
        super().__init__(adamw.param_groups + muon.param_groups, {})  # the same group dicts
        self.share()

    def share(self):
        """Point both optimizers at this one's groups and state (after init, and after a load)."""
        count = len(self.adamw.param_groups)
        self.adamw.param_groups, self.muon.param_groups = self.param_groups[:count], self.param_groups[count:]
        self.adamw.state = self.muon.state = self.state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.share()

    @torch.no_grad()
    def step(self, closure=None):
        self.adamw.step()
        self.muon.step()

RECIPES = {recipe.name: recipe for recipe in (AdamWRecipe, SophiaGRecipe, MuonRecipe)}
