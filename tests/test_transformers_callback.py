"""freezeframe.transformers.FreezeFrame on real Hugging Face Trainers (tiny GPT-2 from a config, CPU):
gradient accumulation, epochs, evaluations, bad options, internal errors, exceptions, resuming
from a checkpoint and TRL's SFTTrainer, each checked against the test's own oracle callback."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

import freezeframe  # noqa: E402
import oracle  # noqa: E402
from freezeframe.errors import FreezeFrameError  # noqa: E402
from freezeframe.transformers import FreezeFrame  # noqa: E402
from hf_helpers import Oracle, gpt2, lora_gpt2, scalars_by_step, token_data, training_args  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _train(tmp_path, model, cbs, data=None, resume=None, **kw):
    trainer = Trainer(model=model, args=training_args(tmp_path / "out", **kw), train_dataset=data or token_data(),
                      eval_dataset=token_data(8, seed=1), callbacks=cbs)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_gradient_accumulation_counts_optimizer_steps_and_epochs_exactly(tmp_path):
    # 10 samples, batches of 2, 2 micro-batches per step: 3 optimizer steps an epoch (the last of 1 batch)
    truth = Oracle()
    _train(tmp_path, lora_gpt2(), [FreezeFrame(tmp_path / "run", every=1), truth], data=token_data(10),
           per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=3)
    s = freezeframe.load(tmp_path / "run").summary()
    (st,) = s["stages"]
    assert truth.call["steps"] == 9 and truth.call["epoch_steps"] == [0, 3, 6]
    assert st["name"] == "train(num_train_epochs=3)"
    assert st["steps"] == 9 and st["epoch_starts"] == [0, 3, 6] and st["epochs"] == 3 and st["epochs_planned"] == 3
    assert st["forward_passes"]["train"] == 15  # every micro-batch went through the model
    assert st["meta"]["training_args"]["gradient_accumulation_steps"] == 2
    for p in s["params"]:
        assert p["stages"][0]["grad_steps"] == (9 if truth.call["requires_grad"][p["name"]] else 0), p["name"]
    assert st["groups"][0]["lr_max"] == pytest.approx(max(x[0] for x in truth.call["lrs"]))


def test_each_evaluation_logs_its_metrics_on_the_last_applied_step(tmp_path):
    truth = Oracle()
    _train(tmp_path, lora_gpt2(), [FreezeFrame(tmp_path / "run"), truth], max_steps=4,
           eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4)
    run = freezeframe.load(tmp_path / "run")
    got = scalars_by_step(run)
    assert [k for k, _ in truth.call["evals"]] == [1, 3]
    for k, metrics in truth.call["evals"]:
        for name in ("eval_loss", "eval_runtime"):
            assert got[name][k] == pytest.approx(metrics[name], rel=1e-9)
    assert set(got["eval_loss"]) == {1, 3}
    assert run.summary()["stages"][0]["forward_passes"]["eval"] == 2 * 2  # two evaluations of 2 batches


def test_bad_options_are_refused_when_the_callback_is_built(tmp_path):
    for kw in ({"budget": 2}, {"nonsense": 1}, {"mode": "sideways"}, {"every": 0}, {"reference": "yes"}):
        with pytest.raises(FreezeFrameError):
            FreezeFrame(tmp_path / "run", **kw)
    assert not (tmp_path / "run").exists()


def test_an_internal_error_is_one_warning_and_training_is_unchanged(tmp_path, monkeypatch):
    plain = gpt2()
    _train(tmp_path / "plain", plain, [], max_steps=5)
    from freezeframe.integrations import hf_facts

    calls = {"n": 0}
    real = hf_facts.scalars

    def broken(values):
        calls["n"] += 1
        if calls["n"] == 3:  # the third on_log: recording is under way
            raise ValueError("boom")
        return real(values)

    monkeypatch.setattr(hf_facts, "scalars", broken)
    watched = gpt2()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(tmp_path / "watched", watched, [FreezeFrame(tmp_path / "run", every=1)], max_steps=5)
    ours = [w for w in caught if "freezeframe" in str(w.message)]
    assert len(ours) == 1 and "Transformers" in str(ours[0].message) and "boom" in str(ours[0].message)
    assert not oracle.differing(oracle.state(plain), oracle.state(watched))  # bitwise the same training
    run = freezeframe.load(tmp_path / "run")
    assert run.summary()["run"]["complete"] is False and 2 <= run.summary()["run"]["steps"] <= 5


def test_resuming_from_a_checkpoint_starts_the_stage_from_the_checkpoints_weights(tmp_path):
    first = Oracle()
    _train(tmp_path, gpt2(), [FreezeFrame(tmp_path / "run", every=1), first], max_steps=6,
           save_strategy="steps", save_steps=3)
    ckpt = tmp_path / "out" / "checkpoint-3"
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "model.safetensors"))
    truth = Oracle()
    _train(tmp_path, gpt2(seed=7), [FreezeFrame(tmp_path / "run", every=1), truth], max_steps=6,
           resume=str(ckpt))
    s = freezeframe.load(tmp_path / "run").summary()
    st = s["stages"][1]
    assert st["name"] == "train(max_steps=6, resume_from_checkpoint='checkpoint-3')"
    assert st["meta"]["resumed_from"] == {"checkpoint": str(ckpt), "global_step": 3}
    assert st["meta"]["start_global_step"] == 3
    assert st["steps"] == truth.call["steps"] == 3
    # the stage starts from the checkpoint's weights (the oracle's copy at train begin), not the new model's
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    names = [p["name"] for p in manifest["model"]["params"]]
    start = manifest["stages"][1]["start_hashes"]
    for n in saved:
        assert oracle.same_bytes(saved[n], truth.call["begin"][n]), n
        assert start[names.index(n)] == oracle.content_hash(saved[n]), n
    # ... which is not where the first call ended (it went on to step 6): the run says so
    assert st["starts_from_previous_end"] is False
    assert set(st["changed_since_previous_end"]) == oracle.differing(first.call["end"], truth.call["begin"])


class Boom(TrainerCallback):
    """The user's code failing inside train() after `at` optimizer steps."""

    def __init__(self, at: int, exc=KeyboardInterrupt):
        self.at, self.exc = at, exc

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.at:
            raise self.exc


def _interrupted(tmp_path):
    cb = FreezeFrame(tmp_path / "run", every=1)
    trainer = Trainer(model=gpt2(), args=training_args(tmp_path / "out", max_steps=6), train_dataset=token_data(),
                      callbacks=[cb, Boom(3)])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.remove_callback(Boom)
    return cb, trainer


def test_an_exception_ending_train_keeps_what_was_recorded_marked_incomplete(tmp_path):
    cb, _ = _interrupted(tmp_path)
    assert cb.recorder is not None  # no event told the callback: its session is still open
    cb.close()
    s = freezeframe.load(tmp_path / "run").summary()
    assert s["run"]["complete"] is False and s["run"]["steps"] == 3 and cb.recorder is None
    assert s["stages"][0]["name"] == "train(max_steps=6)" and s["stages"][0]["steps"] == 3


def test_the_next_train_closes_the_session_an_exception_left_open(tmp_path):
    cb, trainer = _interrupted(tmp_path)
    trainer.train()  # the same callback: the interrupted session is closed first, then a new stage
    s = freezeframe.load(tmp_path / "run").summary()
    assert [st["steps"] for st in s["stages"]] == [3, 6]
    assert s["stages"][1]["meta"]["after_interrupted"] == {"stage": "train(max_steps=6)"}
    assert "after_interrupted" not in s["stages"][0]["meta"]
    assert len(s["run"]["sessions"]) == 2 and all(sess["ended"] is not None for sess in s["run"]["sessions"])
    assert s["run"]["complete"] is True and cb.recorder is None


def test_a_process_killed_by_an_exception_in_train_leaves_an_incomplete_run(tmp_path, cli_env):
    code = textwrap.dedent(f"""
        from transformers import Trainer, TrainerCallback
        from freezeframe.transformers import FreezeFrame
        from hf_helpers import gpt2, token_data, training_args

        class Boom(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == 4:
                    raise RuntimeError("the user's bug")

        Trainer(model=gpt2(), args=training_args({str(tmp_path / "out")!r}, max_steps=8), train_dataset=token_data(),
                callbacks=[FreezeFrame({str(tmp_path / "run")!r}, flush_seconds=0), Boom()]).train()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env, timeout=300)
    assert out.returncode == 1 and "the user's bug" in out.stderr
    s = freezeframe.load(tmp_path / "run").summary()
    assert s["run"]["complete"] is False and s["run"]["steps"] == 4 and s["stages"][0]["name"] == "train(max_steps=8)"


def _tiny_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 1, "<s>": 0, **{f"t{i}": i for i in range(2, 128)}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<pad>")),
                                   pad_token="<pad>", eos_token="<pad>", bos_token="<s>")


def test_trl_sft_trainer_works_unchanged(tmp_path):
    trl = pytest.importorskip("trl")
    truth = Oracle()
    model = lora_gpt2()
    config = trl.SFTConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no",
                           logging_steps=1, per_device_train_batch_size=4, learning_rate=1e-2, max_steps=4,
                           disable_tqdm=True, seed=0)
    data = token_data().remove_columns("labels")
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=data, processing_class=_tiny_tokenizer(),
                             callbacks=[FreezeFrame(tmp_path / "run", every=1), truth])
    trainer.train()
    s = freezeframe.load(tmp_path / "run").summary()
    (st,) = s["stages"]
    assert s["run"]["framework"] == "transformers" and st["name"] == "train(max_steps=4)"
    assert st["meta"]["trainer"] == "SFTTrainer" and s["run"]["sessions"][0]["versions"]["trl"] == trl.__version__
    assert st["steps"] == truth.call["steps"] == 4
    moved = oracle.differing(truth.call["begin"], truth.call["end"])
    for p in s["params"]:
        assert p["stages"][0]["trainable"] is truth.call["requires_grad"][p["name"]]
        assert p["stages"][0]["changed"] is (p["name"] in moved)
    assert moved and all(".lora_" in n for n in moved)
    assert scalars_by_step(freezeframe.load(tmp_path / "run"))["loss"].keys() == truth.call["losses"].keys()


def test_train_again_on_the_same_trainer_appends_a_stage_and_mode_applies_once(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "stray.txt").write_text("not a run")
    with pytest.raises(FreezeFrameError):
        _train(tmp_path, gpt2(), [FreezeFrame(tmp_path / "run", mode="new")], max_steps=2)
    cb = FreezeFrame(tmp_path / "run2", mode="new")
    trainer = _train(tmp_path, gpt2(), [cb], max_steps=2)
    trainer.train()  # "new" applied to the first train(); this one appends
    s = freezeframe.load(tmp_path / "run2").summary()
    assert [st["name"] for st in s["stages"]] == ["train(max_steps=2)"] * 2 and len(s["run"]["sessions"]) == 2
    assert cb.recorder is None and torch.is_grad_enabled()


def test_the_readme_snippet_runs(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    from test_readme import snippet, substitute

    monkeypatch.chdir(tmp_path)
    code = substitute(snippet("transformers"), [("report_to=[])", "report_to=[], use_cpu=True, disable_tqdm=True)")])
    exec(compile(code, "README.md:transformers", "exec"), {"model": gpt2(), "data": token_data()})
    s = freezeframe.load(tmp_path / "runs" / "lora").summary()
    assert [st["name"] for st in s["stages"]] == ["train(max_steps=20)"] and s["stages"][0]["steps"] == 20
    trained = {p["name"] for p in s["params"] if p["stages"][0]["changed"]}
    assert trained and all(".lora_B." in n or ".lora_A." in n for n in trained)


def test_the_example_runs_and_the_cli_reads_its_run(tmp_path, cli_env, freezeframe_exe):
    pytest.importorskip("peft")
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "transformers_lora.py"
    out = subprocess.run([sys.executable, str(example), "--out", str(tmp_path / "lora"), "--work", str(tmp_path / "w")],
                         capture_output=True, text=True, env=cli_env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    js = subprocess.run([freezeframe_exe, "summary", str(tmp_path / "lora"), "--json"], capture_output=True,
                        text=True, env=cli_env, timeout=300, check=True)
    s = json.loads(js.stdout)
    assert [st["name"] for st in s["stages"]] == ["train(max_steps=20)", "train(max_steps=10)"]
    assert s["stages"][1]["starts_from_previous_end"] is True
    base = [p for p in s["params"] if ".lora_" not in p["name"]]
    assert base and all(e["changed"] is False and e["same_as_start"] is True for p in base for e in p["stages"])
    rep = subprocess.run([freezeframe_exe, "report", str(tmp_path / "lora"), "-o", str(tmp_path / "r.html")],
                         capture_output=True, text=True, env=cli_env, timeout=300)
    assert rep.returncode == 0 and (tmp_path / "r.html").stat().st_size > 0


class LastStep(TrainerCallback):
    """The weights right after the last optimizer step (before any reload)."""

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == state.max_steps:
            self.state = oracle.state(model)


def test_load_best_model_at_end_is_an_announced_reload_and_the_end_facts_are_the_best_checkpoint(tmp_path):
    """load_best_model_at_end: the Trainer loads the best checkpoint back after the last step. The
    stage's end is those weights, and the write is information the Trainer announced, not a
    warning. greater_is_better=True on eval_loss makes the best the worst loss: an earlier
    checkpoint, so a real write happens."""
    truth, last = Oracle(), LastStep()
    trainer = _train(tmp_path, gpt2(), [FreezeFrame(tmp_path / "run", every=1), truth, last], max_steps=6,
                     eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                     load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True,
                     learning_rate=5e-2)
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-6"), best
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "out" / best.rsplit("/", 1)[-1] / "model.safetensors"))
    s = freezeframe.load(tmp_path / "run").summary()
    (st,) = s["stages"]
    assert st["meta"]["reload_at_end"]["by"] == "load_best_model_at_end"
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    names = [p["name"] for p in manifest["model"]["params"]]
    end = manifest["stages"][0]["end_hashes"]
    for n, t in saved.items():
        if n in names:
            assert end[names.index(n)] == oracle.content_hash(t), n
    (w,) = st["outside_writes"]
    assert set(w["params"]) == oracle.differing(last.state, truth.call["end"]) != set()
    found = [f for f in s["findings"] if f["code"] == "changed-outside-optimizer"]
    assert found and all(f["severity"] == "info" for f in found), found
    assert "load_best_model_at_end" in found[0]["message"]
