"""
Processes: the process group a torchrun launch starts, FSDP2 sharding over it, what every process
must agree on (gradient sync, RNG states), signals, and the failure of a peer.
"""

import os
import signal
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import UserError

def setup_distributed(config):
    """Process group from torchrun's environment, or one process: (rank, world_size, device)."""
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    rank = int(os.environ.get('RANK', 0))
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    device = config['device']
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise UserError(f"device={device!r} but CUDA is not available to this torch "
                        f"({torch.__version__}); use --device=cpu")
    if device == 'mps' and not torch.backends.mps.is_available():
        raise UserError("device='mps' but MPS is not available; use --device=cpu")
    if device.startswith('cuda'):
        index = local_rank if world_size > 1 else (int(device[5:]) if ':' in device else 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"device={device!r} needs GPU {index} but only "
                            f"{torch.cuda.device_count()} are visible")
        device = f'cuda:{index}'
        torch.cuda.set_device(device)
    if config['dtype'] == 'bfloat16' and device.startswith('cuda') and not torch.cuda.is_bf16_supported():
        raise UserError(f"dtype='bfloat16' is not supported on {torch.cuda.get_device_name(device)}; "
                        f"use --dtype=float16")
    if world_size > 1:
        backend = config['backend']
        if backend == 'auto':
            backend = 'nccl' if device.startswith('cuda') else 'gloo'
        dist.init_process_group(backend, timeout=timedelta(seconds=config['ddp_timeout']),
                                device_id=torch.device(device) if backend == 'nccl' else None)
    return rank, world_size, device

def shard_model(model, config, world_size, local_world_size, device_type, ptdtype):
    """FSDP2: every transformer block, then the rest of the model, sharded in place over all
    processes ('fsdp'), or within shard groups and replicated across them ('hsdp'). Parameters
    stay float32 (the optimizer's master copy); forward and backward compute in `ptdtype`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if config['data_parallel'] == 'hsdp':
        shard = config['shard_group_size'] or local_world_size
        mesh = init_device_mesh(device_type, (world_size // shard, shard), mesh_dim_names=('replicate', 'shard'))
    else:
        mesh = init_device_mesh(device_type, (world_size,), mesh_dim_names=('shard',))
    reshard = config['reshard_after_forward']
    if reshard == 'auto':
        # keeping every block's gathered parameters from forward to backward saves an all-gather
        # per block, at the memory of an unsharded model: worth it while that is small
        gathered = sum(p.numel() for p in model.parameters()) * ptdtype.itemsize
        memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory \
            if device_type == 'cuda' else 0
        reshard = 'false' if gathered < memory / 10 else 'true'
    policy = MixedPrecisionPolicy(param_dtype=None if ptdtype == torch.float32 else ptdtype,
                                  reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard == 'true')
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)  # needed first in backward
    return mesh

def set_gradient_sync(run, sync):
    """Whether the next backward reduces the gradients over the processes: on an iteration's last
    micro-batch only (DDP all-reduces them, FSDP reduce-scatters them to their shards)."""
    if isinstance(run.model, DDP):
        run.model.require_backward_grad_sync = sync
    elif run.sharded:
        run.raw_model.set_requires_gradient_sync(sync)

def whole(tensor):
    """A DTensor (a norm over sharded tensors, say) made whole on every process, or the tensor."""
    from torch.distributed.tensor import DTensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor

def from_process_0(value, world_size):
    """Process 0's `value` (a picklable object), on every process."""
    if world_size > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    return value

def gather_rng_states(world_size, device):
    """Every process's torch RNG states (dropout draws from them), gathered to all processes."""
    state = {'cpu': torch.get_rng_state()}
    if device.startswith('cuda'):
        state['cuda'] = torch.cuda.get_rng_state(device)
    states = [state] * world_size
    if world_size > 1:
        dist.all_gather_object(states, state)
    return states

# what asks a run to save and stop: kill's default, Ctrl-C, a closed terminal (torchrun passes it
# on), and SLURM's `--signal=USR1@<seconds>` before a pre-emption or the end of the time limit
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)

class SignalFlag:
    """STOP_SIGNALS ask the loop to finish the iteration, save and exit with 128 + the signal's
    number; a second signal exits at once (two different ones within a second count as one: Ctrl-C
    under torchrun reaches a worker from the terminal and again from torchrun). Python runs signal
    handlers between bytecodes, which a long kernel delays, so its handlers do nothing: the C-level
    handler writes each signal's number to a pipe (signal.set_wakeup_fd), and a watcher thread acts
    on it at once, torch releasing the GIL inside its kernels."""

    def __init__(self):
        self.signum, self.when = 0, 0.0
        self.installed = None  # what uninstall() restores, and the pipe's write end it closes

    def install(self):
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)  # the C-level handler must never block on a full pipe
        previous = {signum: signal.signal(signum, lambda *_: None) for signum in STOP_SIGNALS}
        self.installed = previous, signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False), write_fd
        threading.Thread(target=self.watch, args=(read_fd,), name='signal-watcher', daemon=True).start()

    def uninstall(self):
        if self.installed is not None:
            previous, previous_fd, write_fd = self.installed
            signal.set_wakeup_fd(previous_fd)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            os.close(write_fd)  # the watcher reads the end of the pipe and returns
            self.installed = None

    def watch(self, read_fd):
        with open(read_fd, 'rb', buffering=0) as pipe:
            while data := pipe.read(64):
                for signum in data:
                    if signum in STOP_SIGNALS:
                        self.handle(signum, None)

    def handle(self, signum, frame):
        if self.signum and (signum == self.signum or time.time() - self.when > 1.0):
            print(f"received {signal.Signals(signum).name} again: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        if not self.signum:
            self.signum, self.when = signum, time.time()
            print(f"received {signal.Signals(signum).name}: finishing this iteration and saving a "
                  f"checkpoint (send it again to exit at once)", file=sys.stderr, flush=True)

def watch_launcher(stop_flag, every=1.0):
    """A worker whose launcher (torchrun) died is adopted by another process: a thread notices
    within `every` seconds and stops the run as SIGTERM would, so no orphan trains on."""
    launcher = os.getppid()
    def watch():
        while os.getppid() == launcher:
            time.sleep(every)
        # a signal that reached the launcher too (SLURM's SIGUSR1) is acted on already
        if not stop_flag.signum:
            print(f"the launcher (process {launcher}) is gone: stopping", file=sys.stderr,
                  flush=True)
            stop_flag.handle(signal.SIGTERM, None)
    threading.Thread(target=watch, name='launcher-watcher', daemon=True).start()

# how gloo (torch 2.13) words a peer that hung past ddp_timeout or died: a plain RuntimeError
GLOO_FAILURES = ('Timed out waiting', 'pair closure', 'Connection closed by peer', 'Connection reset by peer')

def is_communication_failure(e):
    """A collective failed because another process died or hung. NCCL and the rendezvous store
    raise torch.distributed.DistError (after ddp_timeout); gloo raises RuntimeError."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(
        text in str(e) for text in GLOO_FAILURES))

def end_process_group(status, stopped):
    """Leave the process group as a run ends with `status`. A run that finished or stopped together
    (`stopped`) tears down together; after a failure a peer may be dead or hung: leave at once."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if status == 0 or stopped:
        # a process leaving while process 0 still writes the final checkpoint can abort inside
        # gloo ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()
        if status != 0:
            return
    # leave without the interpreter's teardown: after a failure gloo's threads would abort it
    # (SIGABRT instead of this status); after a finished run native threads and objects still
    # could under load (seen once per few hundred 2-process runs of the suite on 2 loaded cores)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
