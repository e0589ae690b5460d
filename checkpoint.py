"""
Checkpoints that survive crashes: atomic writes, a checksum, rotation, and fallback on resume.

A checkpoint is `ckpt-<iter>.pt` (torch.save, loadable with weights_only=True) and its manifest
`ckpt-<iter>.json` (format version, iteration, bytes, sha256). Each file is written to a temporary
name, fsync'd and renamed into place, the .json first and the .pt last: a crash at any moment
leaves the old files or the new ones, and a .pt that does not match its .json is not trusted.
The newest `keep_last` are kept, plus `best.pt`, a hard link to the one with the lowest val loss.
A sharded run (FSDP, HSDP) writes a folder `ckpt-<iter>.dcp` instead (torch.distributed.checkpoint's
shards, and meta.pt with everything else) under the same rules, its manifest listing every file.
"""

import errno
import hashlib
import json
import os
import re
import shutil
import warnings

import torch

FORMAT_VERSION = 1
CHECKPOINT_NAME = re.compile(r'^ckpt-(\d+)\.(pt|dcp)$')  # a file, or the folder of a sharded run
MANIFEST_NAME = re.compile(r'^ckpt-\d+\.json$')
ORPHAN_UNLESS = ('.pt', '.dcp', '.pt.damaged', '.dcp.damaged')  # what a manifest belongs to
TEMPORARY_NAME = re.compile(r'^(ckpt-\d+|best)\.(pt|json|dcp)\.(tmp|old)\d+$')  # a write that a crash cut short

class CheckpointError(Exception):
    """A checkpoint file that cannot be used; the message says which and why."""

class CheckpointUnreadable(CheckpointError):
    """A checkpoint that could not be read (permissions, an I/O error): not known to be damaged."""

class DiskFull(CheckpointError):
    """The filesystem of out_dir had no room for a checkpoint; what was written of it is deleted."""

def disk_full(e):
    """Whether e comes from a full disk or quota, also as the context of torch.save's own error."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        # torch.distributed.checkpoint's CheckpointException holds each failed process's exception
        if any(disk_full(failure) for failure, _ in getattr(e, 'failures', {}).values()):
            return True
        e = e.__cause__ or e.__context__
    return False

def tensor_bytes(state):
    """The bytes of the tensors in a nested state: about the size of its checkpoint."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, (dict, list, tuple)):
        return sum(map(tensor_bytes, state.values() if isinstance(state, dict) else state))
    return 0

def unreadable(path, e):
    return CheckpointUnreadable(f"{path} cannot be read ({e.strerror or e}); it is left as it is: "
                                f"fix the permissions or the filesystem and run again")

def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

class HashingWriter:
    """A file wrapper that hashes and counts what torch.save writes through it."""
    def __init__(self, f):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0
    def write(self, data):
        self.sha256.update(data)
        self.size += len(data)
        return self.f.write(data)
    def flush(self):
        self.f.flush()

def write_synced(path, write):
    with open(path, 'wb') as f:
        result = write(f)
        f.flush()
        os.fsync(f.fileno())
    return result

def write_atomic(path, data):
    """Write the bytes `data` to a temporary file, fsync it, and rename it to `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write_synced(tmp, lambda f: f.write(data))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def no_space(out_dir, iter_num, size):
    free = shutil.disk_usage(out_dir).free
    return DiskFull(f"out_dir={out_dir!r} has no space left for the checkpoint of iteration {iter_num} "
                    f"(about {size:,} bytes; {free:,} free); the earlier checkpoints are intact: free "
                    f"some space, or lower keep_last, and resume with --init_from=resume")

def save_checkpoint(out_dir, state, iter_num, keep_last, is_best):
    """Write `state` as the checkpoint of iteration `iter_num`; link it as best.pt if `is_best`;
    delete checkpoints older than the newest `keep_last`. Returns the path written. On a full
    disk raises DiskFull, the earlier checkpoints as they were and no temporary file left."""
    pt_path = os.path.join(out_dir, f"ckpt-{iter_num:08d}.pt")
    def write_pt(f):
        writer = HashingWriter(f)
        torch.save(state, writer)
        return writer
    try:
        # the .pt is renamed last, after its manifest: no crash leaves a ckpt-*.pt without its .json
        tmp = f"{pt_path}.tmp{os.getpid()}"
        try:
            writer = write_synced(tmp, write_pt)
            manifest = dict(format_version=FORMAT_VERSION, iter_num=iter_num, bytes=writer.size,
                            sha256=writer.sha256.hexdigest(), file=os.path.basename(pt_path))
            write_atomic(manifest_of(pt_path), json.dumps(manifest, indent=1).encode())
            os.replace(tmp, pt_path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        if is_best:
            if os.path.isdir(os.path.join(out_dir, 'best.dcp')):  # a sharded best, older than this
                shutil.rmtree(os.path.join(out_dir, 'best.dcp'))
            best_pt = os.path.join(out_dir, 'best.pt')
            # the manifest first, as for every checkpoint. It also lists the best.pt still in place
            # ('previous'): a crash before best.pt is replaced leaves that one, which still verifies
            try:
                with open(manifest_of(best_pt)) as f:
                    previous = json.load(f)
                manifest['previous'] = {key: previous[key] for key in ('bytes', 'sha256')}
            except (OSError, ValueError, TypeError, KeyError):  # no best.pt yet
                manifest['previous'] = None
            write_atomic(manifest_of(best_pt), json.dumps(manifest, indent=1).encode())
            tmp = f"{best_pt}.tmp{os.getpid()}"
            if os.path.exists(tmp):
                os.remove(tmp)
            try:
                os.link(pt_path, tmp)  # no second copy of the bytes where the filesystem allows
            except OSError:
                write_atomic(tmp, open(pt_path, 'rb').read())
            os.replace(tmp, best_pt)
        fsync_dir(out_dir)
        rotate(out_dir, keep_last)
    except Exception as e:
        if not disk_full(e):
            raise
        raise no_space(out_dir, iter_num, tensor_bytes(state))
    return pt_path

def list_checkpoints(out_dir):
    """Iterations of the checkpoints (ckpt-*.pt files and ckpt-*.dcp folders) in out_dir, newest first."""
    if not os.path.isdir(out_dir):
        return []
    found = {int(m.group(1)) for m in map(CHECKPOINT_NAME.match, os.listdir(out_dir)) if m}
    return sorted(found, reverse=True)

def checkpoint_path(out_dir, name):
    """Checkpoint `name` ('ckpt-<iter>', 'best'): the .dcp folder of a sharded run, or the .pt."""
    path = os.path.join(out_dir, name)
    return path + '.dcp' if os.path.isdir(path + '.dcp') else path + '.pt'

def manifest_of(path):
    return path.rsplit('.', 1)[0] + '.json'

def remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)
    if os.path.exists(manifest_of(path)):
        os.remove(manifest_of(path))

def rotate(out_dir, keep_last):
    """Delete the checkpoints older than the newest keep_last (best is kept apart)."""
    for old_iter in list_checkpoints(out_dir)[keep_last:]:
        for suffix in ('.pt', '.dcp'):
            remove(os.path.join(out_dir, f"ckpt-{old_iter:08d}{suffix}"))

def file_digest(path):
    sha256 = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 24), b''):
            sha256.update(chunk)
    return os.path.getsize(path), sha256.hexdigest()

def verify(pt_path):
    """Check a checkpoint (a .pt file or a sharded one's folder) against its manifest; return it."""
    json_path = manifest_of(pt_path)
    if not os.path.exists(json_path):
        raise CheckpointError(f"{pt_path} has no {os.path.basename(json_path)}: it was never completed")
    try:
        with open(json_path) as f:
            manifest = json.load(f)
    except OSError as e:
        raise unreadable(json_path, e)
    except ValueError as e:
        raise CheckpointError(f"{json_path} is unreadable: {e}")
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{json_path} is damaged: it holds a {type(manifest).__name__}, "
                              f"not a manifest")
    if manifest.get('format_version', 0) > FORMAT_VERSION:
        raise CheckpointError(f"{pt_path} has format version {manifest['format_version']}, newer than "
                              f"this code's {FORMAT_VERSION}: update the code to resume it")
    if os.path.isdir(pt_path):
        files = {os.path.join(pt_path, name): entry for name, entry in manifest.get('files', {}).items()}
        if 'meta.pt' not in manifest.get('files', {}):
            raise CheckpointError(f"{json_path} lists no meta.pt: it is not the manifest of {pt_path}")
    else:
        files = {pt_path: manifest}
    for path, entry in files.items():
        if not os.path.isfile(path):
            raise CheckpointError(f"{pt_path} is incomplete: {os.path.basename(path)} is missing")
        # best.json also lists the best.pt it replaces, in place until the rename that follows it
        previous = entry.get('previous')
        candidates = [entry, previous] if isinstance(previous, dict) else [entry]
        size = os.path.getsize(path)
        if size not in [candidate.get('bytes') for candidate in candidates]:
            raise CheckpointError(f"{path} is truncated or damaged: {size} bytes, expected {entry.get('bytes')}")
        if file_digest(path)[1] not in [candidate.get('sha256') for candidate in candidates]:
            raise CheckpointError(f"{path} is damaged: its sha256 does not match {os.path.basename(json_path)}")
    return manifest

def load_checkpoint(pt_path, map_location='cpu', model_tensors=True):
    """Verify and load one checkpoint. A sharded one gives its meta.pt with `sharded` set to its
    folder (the trainer loads the shards), with `model_tensors` also its model as whole tensors."""
    try:
        verify(pt_path)
    except OSError as e:
        raise unreadable(pt_path, e)
    if not os.path.isdir(pt_path):
        return load_pt(pt_path, map_location)
    state = load_pt(os.path.join(pt_path, 'meta.pt'), map_location, checkpoint=pt_path)
    state['sharded'] = pt_path
    if model_tensors:
        # torch's reader of a whole DCP checkpoint into one process (no process group needed)
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
        model = in_one_process(_load_state_dict_from_keys, {'model'}, checkpoint_id=pt_path)
        state['model'] = {key: value.to(map_location) for key, value in model['model'].items()}
    return state

def load_pt(path, map_location, checkpoint=None):
    """torch.load a checkpoint's .pt, or the meta.pt of the sharded one in folder `checkpoint`."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as e:
        raise unreadable(path, e)
    except Exception as e:
        raise CheckpointError(f"{path} cannot be loaded: {type(e).__name__}: {e}")
    if state.get('format_version') != FORMAT_VERSION:
        raise CheckpointError(f"{checkpoint or path} has format version "
                              f"{state.get('format_version')}, this code reads {FORMAT_VERSION}")
    return state

def in_one_process(read, *args, **kwargs):
    """A torch.distributed.checkpoint read in a process that has no process group, which torch
    warns of ("assuming the intent is to load in a single process"): the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', 'torch.distributed is .*uninitialized', UserWarning)
        return read(*args, **kwargs)

def load_latest(out_dir, map_location='cpu', warn=print, quarantine=False, model_tensors=True):
    """The newest checkpoint in out_dir that verifies and loads, falling back past damaged ones:
    (state, path), (None, None) without any, CheckpointError when none is usable. With `quarantine`
    (one process only) a damaged one is renamed *.damaged and a cut-short write's files deleted.
    One that cannot be read (CheckpointUnreadable) is not damaged: it stops the search."""
    problems = []
    if quarantine and os.path.isdir(out_dir):
        names = set(os.listdir(out_dir))
        for name in names:
            path = os.path.join(out_dir, name)
            if TEMPORARY_NAME.match(name):  # left by a killed run: as large as a checkpoint
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            elif MANIFEST_NAME.match(name) and not {name[:-5] + e for e in ORPHAN_UNLESS} & names:
                os.remove(path)  # its checkpoint gone: a kill during rotation, or during a write
    best = checkpoint_path(out_dir, 'best')
    candidates = [checkpoint_path(out_dir, f"ckpt-{i:08d}") for i in list_checkpoints(out_dir)]
    for path in candidates + ([best] if os.path.exists(best) else []):
        try:
            return load_checkpoint(path, map_location, model_tensors), path
        except CheckpointUnreadable:
            raise
        except CheckpointError as e:
            if path != best:  # best, the last resort, is neither warned of nor set aside
                warn(f"warning: {e}; falling back to the previous checkpoint")
                if quarantine and os.path.exists(path):
                    os.replace(path, path + '.damaged')
            problems.append(str(e))
    if problems:
        raise CheckpointError(f"no usable checkpoint in {out_dir}: {problems[-1]}")
    return None, None

def save_sharded(out_dir, tensors, meta, iter_num, keep_last, is_best, rank, world_size):
    """Write the checkpoint of iteration `iter_num` of a sharded run, a collective: every process
    writes its shards of `tensors` ({'model': ..., 'optimizer': ...}) into a temporary folder and
    hashes them, process 0 adds `meta` and publishes the folder (publish_sharded). Returns its
    path. A full disk on any process raises DiskFull on every process, nothing left behind."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from distributed import from_process_0
    final = os.path.join(out_dir, f"ckpt-{iter_num:08d}.dcp")
    tmp = from_process_0(f"{final}.tmp{os.getpid()}", world_size)  # process 0's name, for all
    digests = None  # stays None where this process's part could not be written for want of space
    try:
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
        # torch.distributed.checkpoint names a process's files __<rank>_<n>.distcp, process 0 adds
        # .metadata and meta.pt: each hashes its own, so a large checkpoint is read back in parallel
        mine = [name for name in os.listdir(tmp) if name.startswith(f'__{rank}_')]
        if rank == 0:
            write_synced(os.path.join(tmp, 'meta.pt'), lambda f: torch.save(meta, f))
            mine += ['.metadata', 'meta.pt']
        digests = {name: dict(zip(('bytes', 'sha256'), file_digest(os.path.join(tmp, name)))) for name in mine}
    except (Exception, dcp.CheckpointException) as e:  # the latter is no Exception
        if not disk_full(e):
            raise
    gathered = [digests]
    if world_size > 1:
        gathered = [None] * world_size if rank == 0 else None
        dist.gather_object(digests, gathered, dst=0)
    full = None in gathered if rank == 0 else None
    if rank == 0 and not full:
        try:
            publish_sharded(out_dir, tmp, final, gathered, iter_num, keep_last, is_best)
        except OSError as e:
            if not disk_full(e):
                raise
            full = True
    full = from_process_0(full, world_size)  # every process learns whether the checkpoint is there
    if full:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise no_space(out_dir, iter_num, tensor_bytes(tensors))
    return final

def publish_sharded(out_dir, tmp, final, gathered, iter_num, keep_last, is_best):
    """Process 0's part of save_sharded, once every process wrote and hashed its files."""
    files = {name: entry for part in gathered for name, entry in part.items()}
    unlisted = sorted(set(os.listdir(tmp)) - set(files))
    if unlisted:
        raise CheckpointError(f"{tmp} holds files no process wrote: {unlisted}")
    fsync_dir(tmp)
    manifest = dict(format_version=FORMAT_VERSION, iter_num=iter_num, files=files,
                    folder=os.path.basename(final))
    # the manifest before the folder's final name: a ckpt-*.dcp always has the manifest it is
    # verified against (an older folder of the same iteration no longer matches it, and goes)
    write_atomic(manifest_of(final), json.dumps(manifest, indent=1).encode())
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    if is_best:
        link_best(out_dir, final, dict(manifest, folder='best.dcp'))
    fsync_dir(out_dir)
    rotate(out_dir, keep_last)

def link_best(out_dir, folder, manifest):
    """best.dcp: hard links to the files of `folder` (copies where the filesystem has none)."""
    best = os.path.join(out_dir, 'best.dcp')
    tmp, old = f"{best}.tmp{os.getpid()}", f"{best}.old{os.getpid()}"
    os.makedirs(tmp)
    try:
        for name in manifest['files']:
            try:
                os.link(os.path.join(folder, name), os.path.join(tmp, name))
            except OSError:
                shutil.copyfile(os.path.join(folder, name), os.path.join(tmp, name))
    except OSError:
        shutil.rmtree(tmp)
        raise
    write_atomic(manifest_of(best), json.dumps(manifest, indent=1).encode())
    if os.path.isdir(best):
        os.replace(best, old)
    os.replace(tmp, best)
    if os.path.isdir(old):
        shutil.rmtree(old)
    best_pt = os.path.join(out_dir, 'best.pt')
    if os.path.exists(best_pt):  # a best of the run's unsharded part: this one is newer
        os.remove(best_pt)
