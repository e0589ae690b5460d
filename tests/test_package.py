"""The optimizer installs on its own (pyproject.toml): the wheel, built offline from the files a
clone holds, carries sophia.py and sophia_integrations.py and nothing else of the repository, and a fresh virtual
environment with only that wheel (and the torch already installed here) trains with it."""

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

from helpers import ROOT

TRAIN_ELSEWHERE = r'''
import json
import torch
import torch.nn.functional as F
import sophia
from sophia import SophiaG, hutchinson_hessian, sampled_label_loss

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Embedding(16, 32), torch.nn.Linear(32, 16))
x = torch.randint(0, 16, (64,))
y = (3 * x + 1) % 16  # a mapping the model can learn
optimizer = SophiaG(model.parameters(), lr=0.05, rho=0.05, weight_decay=0.0)
losses = []
for step in range(30):
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step(bs=x.numel())
    optimizer.zero_grad(set_to_none=True)
    losses.append(loss.item())
    if step % 5 == 4:  # the Hessian pass: labels sampled from the model
        sampled_label_loss(model(x)).backward()
        optimizer.update_hessian()
        optimizer.zero_grad(set_to_none=True)
gnb = sum(float(s["hessian"].sum()) for s in optimizer.state.values())
estimates = hutchinson_hessian(F.cross_entropy(model(x), y), model.parameters())
print(json.dumps(dict(file=sophia.__file__, first=losses[0], last=losses[-1], gnb=gnb,
                      hutchinson=[list(e.shape) for e in estimates])))
'''


def repository_files():
    """The files a clone has: git's tracked files and the untracked ones it does not ignore
    (so that uncommitted work counts too), or without git the tree minus the usual outputs."""
    result = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
                            cwd=ROOT, capture_output=True)
    if result.returncode == 0:
        return [name for name in result.stdout.decode().split('\0') if name and os.path.isfile(os.path.join(ROOT, name))]
    skipped = {'.git', '__pycache__', '.venv', 'venv', 'wandb', 'build', 'dist', '.pytest_cache'}
    found = []
    for folder, subfolders, names in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if d not in skipped and not d.startswith('out')
                         and not d.endswith('.egg-info')]
        found += [os.path.relpath(os.path.join(folder, n), ROOT) for n in names
                  if not n.endswith(('.bin', '.pkl', '.pyc'))]
    return found


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
    # offline: no build isolation, so the build uses the setuptools installed here (torch 2.13
    # itself requires setuptools >= 77); built in a copy, since setuptools writes build/ and
    # *.egg-info/ into the source folder
    pytest.importorskip('setuptools', minversion='61')
    source, dist = tmp_path_factory.mktemp('source'), tmp_path_factory.mktemp('dist')
    for name in repository_files():
        os.makedirs(os.path.dirname(source / name), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), source / name)
    result = subprocess.run([sys.executable, '-m', 'pip', 'wheel', str(source), '--no-deps', '--no-build-isolation',
                             '--no-index', '-w', str(dist)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    wheels = list(dist.glob('*.whl'))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_holds_the_optimizer_only(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        payload = [n for n in names if '.dist-info/' not in n]
        # the optimizer and its Trainer/Lightning integration: no scripts, tests, configs or data
        assert payload == ['sophia.py', 'sophia_integrations.py'], payload
        for name in payload:
            with open(os.path.join(ROOT, name), 'rb') as f:
                assert archive.read(name) == f.read()
        metadata = archive.read(next(n for n in names if n.endswith('.dist-info/METADATA'))).decode()
    requirements = [line.split(':', 1)[1].strip() for line in metadata.splitlines() if line.startswith('Requires-Dist:')]
    assert requirements == ['torch']  # unpinned: an installed torch stays
    assert 'Requires-Python: >=3.10' in metadata


def test_fresh_environment_trains_with_the_installed_optimizer(wheel, tmp_path):
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
    python = str(venv / 'bin' / 'python')
    purelib = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                             capture_output=True, text=True, check=True).stdout.strip()
    # the torch installed here, without installing it again: a .pth line puts its site-packages on
    # the new environment's path, after the environment's own (this test may itself run in a venv,
    # whose packages --system-site-packages would not reach)
    with open(os.path.join(purelib, 'torch-from-the-test-environment.pth'), 'w') as f:
        f.write(os.path.dirname(os.path.dirname(torch.__file__)) + '\n')
    # this pip installs into the new environment (--python), which therefore needs no pip of its own
    result = subprocess.run([sys.executable, '-m', 'pip', '--python', python, 'install', '--no-index', '--no-deps',
                             str(wheel)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    elsewhere = tmp_path / 'elsewhere'  # away from the repository, whose sophia.py must not be found
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONHOME', 'VIRTUAL_ENV')}
    result = subprocess.run([python, '-c', TRAIN_ELSEWHERE], cwd=elsewhere, capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert os.path.realpath(report['file']) == os.path.realpath(os.path.join(purelib, 'sophia.py'))
    assert report['last'] < 0.5 * report['first']  # it trains
    assert report['gnb'] > 0  # the Hessian passes reached the optimizer
    assert report['hutchinson'] == [[16, 32], [16, 32], [16]]
