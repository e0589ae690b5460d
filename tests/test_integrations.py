"""sophia_integrations: Sophia-G inside the Hugging Face Trainer and Lightning, held to the README's
own loop (parameters and every optimizer state tensor, bit for bit) on the same data and seeds,
with gradient accumulation, bf16, a GradScaler, a resume from a Trainer checkpoint, Lightning's
automatic and manual optimization; on two processes under DDP (torchrun, gloo) both end with
identical Hessians and weights on each. Also: SophiaG keeps last_bs across its state dict,
importing the module imports no trainer, and `pip install .` leaves the checkout clean. A tiny
GPT2LMHeadModel from a GPT2Config, no hub. Needs transformers, accelerate and lightning (test
dependencies: pip install accelerate==1.15.0 lightning==2.6.6; skipped without them)."""

import copy
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from sophia import SophiaG, sampled_label_loss  # noqa: E402
from sophia_integrations import (SophiaTrainerMixin, hessian_generator,  # noqa: E402
                                 update_hessian_from_grads)

VOCAB, BLOCK = 64, 16  # tokens, sequence length
HESS_INTERVAL = 3  # a Hessian pass after steps 3 and 6 of 7
HESS_GRAD_CLIP = 0.05  # small enough that the sampled gradient is clipped: the clip is tested
SEED = 5


def tiny_model():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=BLOCK, n_embd=16, n_layer=1, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)  # GPT-2's 50256 is past this vocabulary
    return GPT2LMHeadModel(config)


def dataset(sequences=64):
    ids = torch.randint(0, VOCAB, (sequences, BLOCK), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": x, "labels": x} for x in ids]


def sophia(model):
    return SophiaG(model.parameters(), lr=1e-2, rho=0.05, weight_decay=0.1)


class RecordingTrainer(SophiaTrainerMixin, Trainer):
    """Keeps the micro-batches it trained on, for the README loop to replay."""

    def training_step(self, model, inputs, *args, **kwargs):
        self.micro_batches.append(inputs["input_ids"].clone())
        return super().training_step(model, inputs, *args, **kwargs)


def hf_run(out_dir, steps=7, accumulation=1, resume=None, scaler=None, **args):
    model = tiny_model()
    optimizer = sophia(model)
    arguments = TrainingArguments(**dict(
        output_dir=str(out_dir), per_device_train_batch_size=4, max_steps=steps,
        gradient_accumulation_steps=accumulation, lr_scheduler_type="constant", max_grad_norm=0.0,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
        seed=SEED) | args)
    trainer = RecordingTrainer(model=model, args=arguments, train_dataset=dataset(),
                               optimizers=(optimizer, None), hess_interval=HESS_INTERVAL,
                               hess_grad_clip=HESS_GRAD_CLIP)
    trainer.micro_batches = []
    if scaler is not None:  # accelerate refuses fp16 on a CPU: its GradScaler put in by hand
        trainer.accelerator.scaler = scaler
    trainer.train(resume_from_checkpoint=resume)
    return model, optimizer, trainer


def readme_loop(micro_batches, accumulation=1, autocast=None):
    """The README's loop (Using Sophia-G in your own training code), its Hessian pass on the next
    step's first micro-batch with the labels' generator and the clip the integration uses, and the
    Trainer's loss: each micro-batch's summed cross-entropy over the step's label count
    (num_items_in_batch)."""
    model = tiny_model()
    optimizer = sophia(model)
    autocast = autocast or torch.autocast("cpu", enabled=False)
    steps = [micro_batches[i:i + accumulation] for i in range(0, len(micro_batches), accumulation)]
    for it, batches in enumerate(steps):
        items = sum(x.numel() for x in batches)
        for x in batches:
            with autocast:
                loss = model(input_ids=x, labels=x, num_items_in_batch=items).loss
            loss.backward()
        optimizer.step(bs=batches[0].numel())  # the Hessian micro-batch's tokens, one process
        optimizer.zero_grad(set_to_none=True)
        if it % HESS_INTERVAL == HESS_INTERVAL - 1 and it + 1 < len(steps):
            x_hessian = steps[it + 1][0]
            with autocast:
                logits = model(input_ids=x_hessian).logits
                loss = sampled_label_loss(logits, hessian_generator(SEED, it + 1, logits.device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), HESS_GRAD_CLIP)
            optimizer.update_hessian()
            optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def assert_same_state(model_a, optimizer_a, model_b, optimizer_b):
    params_a, params_b = list(model_a.parameters()), list(model_b.parameters())
    assert len(params_a) == len(params_b)
    for a, b in zip(params_a, params_b):
        assert torch.equal(a, b)
        state_a, state_b = optimizer_a.state[a], optimizer_b.state[b]
        assert state_a.keys() == state_b.keys() == {"step", "exp_avg", "hessian"}
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), key
    assert sum(float(optimizer_a.state[p]["hessian"].sum()) for p in params_a) > 0  # passes ran


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """The plain run, which also saves a checkpoint after step 4 (saving changes nothing else):
    shared by the tests that compare against it."""
    out_dir = tmp_path_factory.mktemp("checkpointed")
    return out_dir, hf_run(out_dir, save_strategy="steps", save_steps=4)


def test_trainer_equals_the_readme_loop_and_logs_the_diagnostics(checkpointed):
    model, optimizer, trainer = checkpointed[1]
    assert len(trainer.micro_batches) == 7
    assert_same_state(model, optimizer, *readme_loop(trainer.micro_batches))
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert [row["step"] for row in rows] == list(range(1, 8))
    for row in rows:
        assert {"win_rate", "hessian_norm", "hessian_norm2", "momentum_norm"} <= row.keys()
        assert row["hessian_skipped"] == 0
    # h is zero until the pass after step 3, which the log of step 4 is the first to see
    assert [row["hessian_norm"] > 0 for row in rows] == [False] * 3 + [True] * 4
    assert 0 < rows[-1]["win_rate"] < 1
    diagnostics = optimizer.diagnostics()
    assert rows[-1]["win_rate"] == pytest.approx(float(diagnostics["win_rate"]))
    assert optimizer.last_bs == 4 * BLOCK  # per_device_train_batch_size x block x 1 process


def test_trainer_with_gradient_accumulation_equals_the_readme_loop(tmp_path):
    model, optimizer, trainer = hf_run(tmp_path, accumulation=2)
    assert len(trainer.micro_batches) == 14
    assert_same_state(model, optimizer, *readme_loop(trainer.micro_batches, accumulation=2))


def test_trainer_in_bf16_equals_the_readme_loop_under_autocast(tmp_path):
    model, optimizer, trainer = hf_run(tmp_path, bf16=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    assert_same_state(model, optimizer, *readme_loop(trainer.micro_batches, autocast=autocast))


def test_a_grad_scaler_changes_nothing(tmp_path, checkpointed):
    # a power-of-two scale is exact: the scaled Hessian pass, unscaled, is the unscaled one
    plain = checkpointed[1]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    scaled = hf_run(tmp_path / "scaled", scaler=scaler)
    assert scaler.get_scale() == 2.0 ** 12  # no step overflowed
    assert_same_state(plain[0], plain[1], scaled[0], scaled[1])


def test_overflowing_steps_and_passes_are_skipped_and_the_passes_counted_in_the_logs(tmp_path):
    # an infinite loss scale: every step overflows (the GradScaler skips it) and so does every
    # Hessian pass (skipped by the integration): no state, and no diagnostics to log
    scaler = torch.amp.GradScaler("cpu", init_scale=math.inf)
    model, optimizer, trainer = hf_run(tmp_path, scaler=scaler)
    assert not optimizer.state
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert [row["hessian_skipped"] for row in rows] == [0, 0, 0, 1, 0, 0, 1]
    assert not any("win_rate" in row for row in rows)


def test_a_non_finite_sampled_gradient_is_skipped():
    model = tiny_model()
    optimizer = sophia(model)
    params = list(model.parameters())
    sampled_label_loss(model(input_ids=dataset()[0]["input_ids"][None]).logits).backward()
    assert update_hessian_from_grads(optimizer, params, 1.0)
    before = [optimizer.state[p]["hessian"].clone() for p in params]
    sampled_label_loss(model(input_ids=dataset()[1]["input_ids"][None]).logits).backward()
    params[3].grad[0] = float("nan")
    assert not update_hessian_from_grads(optimizer, params, 1.0)
    assert all(torch.equal(optimizer.state[p]["hessian"], h) for p, h in zip(params, before))
    assert all(p.grad is None for p in params)  # freed all the same: nothing leaks into a step


def test_resume_from_a_trainer_checkpoint_equals_an_uninterrupted_run(tmp_path, checkpointed):
    out_dir, whole = checkpointed
    # step 5 needs bs before any Hessian pass of the resumed run: SophiaG's last_bs from the
    # checkpoint; and diagnostics() works on the loaded state before any step
    saved = torch.load(out_dir / "checkpoint-4" / "optimizer.pt", weights_only=True)
    loaded = sophia(tiny_model())
    loaded.load_state_dict(saved)
    assert loaded.last_bs == 4 * BLOCK
    logged = next(row for row in whole[2].state.log_history
                  if row.get("step") == 4 and "loss" in row)
    assert float(loaded.diagnostics()["win_rate"]) == pytest.approx(logged["win_rate"])
    resumed = hf_run(tmp_path / "resumed", resume=str(out_dir / "checkpoint-4"))
    assert len(resumed[2].micro_batches) == 3
    assert all(torch.equal(a, b)
               for a, b in zip(resumed[2].micro_batches, whole[2].micro_batches[4:]))
    assert_same_state(whole[0], whole[1], resumed[0], resumed[1])


def test_the_trainer_refuses_another_optimizer_in_one_line(tmp_path):
    model = tiny_model()
    arguments = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(TypeError) as error:
        RecordingTrainer(model=model, args=arguments, train_dataset=dataset(),
                         optimizers=(torch.optim.AdamW(model.parameters()), None))
    assert str(error.value) == ("the trainer's optimizer is AdamW, not SophiaG; pass a SophiaG "
                                "(Hugging Face: Trainer(optimizers=(SophiaG(...), None)))")


def test_the_trainer_refuses_fsdp_in_one_line(tmp_path):
    class ShardedTrainer(RecordingTrainer):  # FSDP as the Trainer flags it (it needs processes)
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            self.is_fsdp_enabled = True

    # under FSDP the Trainer takes no optimizers=: a SophiaG would come from create_optimizer
    arguments = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(ValueError) as error:
        ShardedTrainer(model=tiny_model(), args=arguments, train_dataset=dataset())
    assert str(error.value) == ("SophiaTrainerMixin does not support FSDP, which owns the "
                                "gradients the Hessian pass reads and clips; train with DDP")


TWO_PROCESSES = r'''
import sys
import torch
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
torch.set_num_threads(1)
import test_integrations as t
model, optimizer, trainer = t.hf_run(sys.argv[2], accumulation=2, ddp_backend="gloo")
module, lightning = t.lightning_run(manual=False, processes=2)  # in the same process group
for name, model, optimizer, batches in (
        ("hf", model, optimizer, trainer.micro_batches),
        ("lightning", module.model, lightning.optimizers[0], module.batches)):
    torch.save({"params": [p.detach() for p in model.parameters()],
                "state": [optimizer.state[p] for p in model.parameters()],
                "micro_batches": batches, "bs": optimizer.last_bs},
               f"{sys.argv[2]}/{name}{trainer.args.process_index}.pt")
'''


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The Trainer (gradient accumulation 2), then Lightning, on 2 processes under DDP."""
    pytest.importorskip("lightning")
    out_dir = tmp_path_factory.mktemp("two_processes")
    script = out_dir / "two.py"
    script.write_text(TWO_PROCESSES)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", str(script), ROOT, str(out_dir)],
                            capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out_dir


# HF: with gradient accumulation the pass sits on a micro-batch where the Trainer turned gradient
# sync off: only a pass through the DDP wrapper with sync forced on averages it. Lightning: the
# callback's pass is outside DDP's backward and all-reduces the sampled gradient itself.
@pytest.mark.parametrize("name", ["hf", "lightning"])
def test_two_processes_hold_identical_hessians_and_weights(two_processes, name):
    ranks = [torch.load(two_processes / f"{name}{r}.pt", weights_only=True) for r in (0, 1)]
    # each process trained on its own data: there is something to average
    assert not torch.equal(ranks[0]["micro_batches"][0], ranks[1]["micro_batches"][0])
    assert ranks[0]["bs"] == ranks[1]["bs"] == 4 * BLOCK * 2  # Hessian micro-batch x 2 processes
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)
    for a, b in zip(ranks[0]["state"], ranks[1]["state"]):
        for key in ("hessian", "exp_avg", "step"):
            assert torch.equal(a[key], b[key]), key
    assert sum(float(s["hessian"].sum()) for s in ranks[0]["state"]) > 0


def test_sophia_state_dict_keeps_last_bs():
    model = tiny_model()
    optimizer = sophia(model)
    x = dataset()[0]["input_ids"][None]
    model(input_ids=x, labels=x).loss.backward()
    optimizer.step(bs=1234)
    optimizer.update_hessian()
    loaded = sophia(model)
    loaded.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert loaded.last_bs == 1234
    for key, value in optimizer.diagnostics().items():
        assert torch.equal(loaded.diagnostics()[key], value), key
    # a state dict without it (the official class's, older versions') keeps the optimizer's own
    old = copy.deepcopy(optimizer.state_dict())
    del old["last_bs"]
    loaded.last_bs = 77
    loaded.load_state_dict(old)
    assert loaded.last_bs == 77


# -----------------------------------------------------------------------------
# Lightning

def lightning_run(manual, processes=1):
    """7 steps of Lightning with the callback, a warm-up schedule and the training gradient
    clipped at 1.0: by Lightning (automatic optimization) or by hand (manual)."""
    import lightning as L

    from sophia_integrations import SophiaLightningCallback

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_model()
            self.automatic_optimization = not manual
            self.batches = []

        def training_step(self, batch, batch_idx):
            self.batches.append(batch.clone())
            loss = self.model(input_ids=batch, labels=batch).loss
            if manual:  # clipping and the schedule are the module's to do
                optimizer = self.optimizers()
                optimizer.zero_grad()
                self.manual_backward(loss)
                self.clip_gradients(optimizer, gradient_clip_val=1.0,
                                    gradient_clip_algorithm="norm")
                optimizer.step()
                self.lr_schedulers().step()
            return loss

        def configure_optimizers(self):
            optimizer = sophia(self.model)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
            return {"optimizer": optimizer,
                    "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    module = Module()
    callback = SophiaLightningCallback(lambda module, batch: module.model(input_ids=batch).logits,
                                       hess_interval=HESS_INTERVAL, hess_grad_clip=HESS_GRAD_CLIP,
                                       seed=SEED)
    strategy = "auto"
    if processes > 1:  # under torchrun, which started the processes; gloo for CPU processes
        strategy = L.pytorch.strategies.DDPStrategy(process_group_backend="gloo")
    trainer = L.Trainer(max_steps=7, accelerator="cpu", devices=processes, strategy=strategy,
                        callbacks=[callback],
                        gradient_clip_val=None if manual else 1.0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1)
    ids = torch.stack([d["input_ids"] for d in dataset()])
    trainer.fit(module, torch.utils.data.DataLoader(ids, batch_size=4))
    return module, trainer


def warmup(step):
    return min(1.0, (step + 1) / 4)  # a schedule that matters: lr 1/4, 2/4, 3/4, then 1


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_lightning_callback_equals_the_readme_loop_with_clipping_and_a_schedule(manual):
    pytest.importorskip("lightning")
    module, trainer = lightning_run(manual)
    # the README loop with the training gradient clipped and the schedule stepped per step
    model = tiny_model()
    optimizer = sophia(model)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
    batches = module.batches
    for it, x in enumerate(batches):
        model(input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step(bs=x.numel())
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if it % HESS_INTERVAL == HESS_INTERVAL - 1 and it + 1 < len(batches):
            logits = model(input_ids=batches[it + 1]).logits
            sampled_label_loss(logits, hessian_generator(SEED, it + 1, logits.device)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), HESS_GRAD_CLIP)
            optimizer.update_hessian()
            optimizer.zero_grad(set_to_none=True)
    assert len(batches) == 7
    assert_same_state(module.model, trainer.optimizers[0], model, optimizer)
    names = {"win_rate", "hessian_norm", "hessian_norm2", "momentum_norm", "hessian_skipped"}
    assert names <= trainer.logged_metrics.keys()


# -----------------------------------------------------------------------------
# packaging

def test_importing_the_integrations_imports_neither_transformers_nor_lightning():
    code = ("import sys, sophia_integrations; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('transformers', 'accelerate', 'lightning', 'pytorch_lightning')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_pip_install_leaves_the_checkout_clean(tmp_path):
    # offline, with the setuptools installed here, as tests/test_package.py builds; pip builds
    # in the source folder itself, which the build backend copies first
    source = tmp_path / "checkout"
    source.mkdir()
    for name in ("pyproject.toml", "build_backend.py", "MANIFEST.in", "sophia.py",
                 "sophia_integrations.py"):
        (source / name).write_bytes(open(os.path.join(ROOT, name), "rb").read())
    before = sorted(os.listdir(source))
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                             "--no-build-isolation", "--target", str(tmp_path / "installed"), "."],
                            cwd=source, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert sorted(os.listdir(source)) == before  # no build/, no *.egg-info/
    installed = sorted(os.listdir(tmp_path / "installed"))
    installed = [n for n in installed if n != "__pycache__" and not n.endswith(".dist-info")]
    assert installed == ["sophia.py", "sophia_integrations.py"]
