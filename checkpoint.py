"""
Checkpoints that survive crashes: atomic writes, a checksum, rotation, and fallback on resume.

A checkpoint is two files in out_dir: `ckpt-<iter>.pt` (torch.save of a dict of tensors and plain
values, loadable with torch.load(weights_only=True)) and `ckpt-<iter>.json`, holding the format
version, the iteration, the byte count and the sha256 of the .pt. Each file is written to a
temporary name, flushed and fsync'd, then renamed over its final name (the .json first, the .pt
last), and the folder is fsync'd: a crash at any moment (kill -9, power loss) leaves either the old
files or the new ones, never a half-written file under a final name. A .pt without its .json, or
whose bytes do not match it, is not trusted. The newest `keep_last` checkpoints are kept, plus `best.pt`/`best.json`,
a hard link to the checkpoint with the lowest val loss so far.
"""

import hashlib
import json
import os
import re

import torch

FORMAT_VERSION = 1
CHECKPOINT_NAME = re.compile(r'^ckpt-(\d+)\.pt$')
TEMPORARY_NAME = re.compile(r'^(ckpt-\d+|best)\.(pt|json)\.tmp\d+$')  # a write that a crash cut short

class CheckpointError(Exception):
    """A checkpoint file that cannot be used; the message says which and why."""

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
    """Call write(f) on a new file at `path` and fsync it; return what write returned."""
    with open(path, 'wb') as f:
        result = write(f)
        f.flush()
        os.fsync(f.fileno())
    return result

def write_atomic(path, write):
    """Call write(f) on a temporary file, fsync it, and rename it to `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        result = write_synced(tmp, write)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return result

def checkpoint_paths(out_dir, name):
    return os.path.join(out_dir, f"{name}.pt"), os.path.join(out_dir, f"{name}.json")

def save_checkpoint(out_dir, state, iter_num, keep_last, is_best):
    """Write `state` as the checkpoint of iteration `iter_num`; link it as best.pt if `is_best`;
    delete checkpoints older than the newest `keep_last`. Returns the path written."""
    name = f"ckpt-{iter_num:08d}"
    pt_path, json_path = checkpoint_paths(out_dir, name)
    def write_pt(f):
        writer = HashingWriter(f)
        torch.save(state, writer)
        return writer
    # the .pt takes its final name last, after its manifest: a crash at any moment never leaves a
    # ckpt-*.pt without the .json it is verified against
    tmp = f"{pt_path}.tmp{os.getpid()}"
    try:
        writer = write_synced(tmp, write_pt)
        manifest = dict(format_version=FORMAT_VERSION, iter_num=iter_num, bytes=writer.size,
                        sha256=writer.sha256.hexdigest(), file=os.path.basename(pt_path))
        write_atomic(json_path, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        os.replace(tmp, pt_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if is_best:
        best_pt, best_json = checkpoint_paths(out_dir, 'best')
        for source, target in ((pt_path, best_pt), (json_path, best_json)):
            tmp = f"{target}.tmp{os.getpid()}"
            if os.path.exists(tmp):
                os.remove(tmp)
            try:
                os.link(source, tmp)  # no second copy of the bytes where the filesystem allows
            except OSError:
                write_atomic(tmp, lambda f, s=source: f.write(open(s, 'rb').read()))
            os.replace(tmp, target)
    fsync_dir(out_dir)
    for old_iter in list_checkpoints(out_dir)[keep_last:]:
        for path in checkpoint_paths(out_dir, f"ckpt-{old_iter:08d}"):
            if os.path.exists(path):
                os.remove(path)
    return pt_path

def list_checkpoints(out_dir):
    """Iterations of the ckpt-*.pt files in out_dir, newest first."""
    if not os.path.isdir(out_dir):
        return []
    found = [int(m.group(1)) for m in map(CHECKPOINT_NAME.match, os.listdir(out_dir)) if m]
    return sorted(found, reverse=True)

def verify(pt_path):
    """Check a checkpoint file against its manifest; return the manifest."""
    json_path = pt_path[:-len('.pt')] + '.json'
    if not os.path.exists(json_path):
        raise CheckpointError(f"{pt_path} has no {os.path.basename(json_path)}: it was never completed")
    try:
        with open(json_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{json_path} is unreadable: {e}")
    if manifest.get('format_version', 0) > FORMAT_VERSION:
        raise CheckpointError(f"{pt_path} has format version {manifest['format_version']}, newer than "
                              f"this code's {FORMAT_VERSION}: update the code to resume it")
    size = os.path.getsize(pt_path)
    if size != manifest.get('bytes'):
        raise CheckpointError(f"{pt_path} is truncated or damaged: {size} bytes, "
                              f"expected {manifest.get('bytes')}")
    sha256 = hashlib.sha256()
    with open(pt_path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 24), b''):
            sha256.update(chunk)
    if sha256.hexdigest() != manifest.get('sha256'):
        raise CheckpointError(f"{pt_path} is damaged: its sha256 does not match {os.path.basename(json_path)}")
    return manifest

def load_checkpoint(pt_path, map_location='cpu'):
    """Verify and load one checkpoint file."""
    try:
        verify(pt_path)
    except OSError as e:
        raise CheckpointError(f"{pt_path} cannot be read: {e}")
    try:
        state = torch.load(pt_path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{pt_path} cannot be loaded: {type(e).__name__}: {e}")
    if state.get('format_version') != FORMAT_VERSION:
        raise CheckpointError(f"{pt_path} has format version {state.get('format_version')}, "
                              f"this code reads {FORMAT_VERSION}")
    return state

def load_latest(out_dir, map_location='cpu', warn=print, quarantine=False):
    """The newest checkpoint in out_dir that verifies and loads, falling back past damaged ones.
    With `quarantine` (one process only), a damaged checkpoint is renamed to *.pt.damaged, kept for
    inspection but no longer counted as a checkpoint, and the temporary files of writes that a
    crash cut short are deleted. Returns (state, path), or (None, None) when
    out_dir holds no checkpoint at all. Raises CheckpointError when none is usable."""
    problems = []
    if quarantine and os.path.isdir(out_dir):
        for name in os.listdir(out_dir):
            if TEMPORARY_NAME.match(name):  # left by a killed run: as large as a checkpoint
                os.remove(os.path.join(out_dir, name))
    for iter_num in list_checkpoints(out_dir):
        pt_path = checkpoint_paths(out_dir, f"ckpt-{iter_num:08d}")[0]
        try:
            return load_checkpoint(pt_path, map_location), pt_path
        except CheckpointError as e:
            warn(f"warning: {e}; falling back to the previous checkpoint")
            problems.append(str(e))
            if quarantine and os.path.exists(pt_path):
                os.replace(pt_path, pt_path + '.damaged')
    best_pt = checkpoint_paths(out_dir, 'best')[0]
    if os.path.exists(best_pt):
        try:
            return load_checkpoint(best_pt, map_location), best_pt
        except CheckpointError as e:
            problems.append(str(e))
    if problems:
        raise CheckpointError(f"no usable checkpoint in {out_dir}: {problems[-1]}")
    return None, None
