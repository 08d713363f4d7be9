"""grpo_ref's loss inside TRL 1.16.0's GRPOTrainer (grpo_ref/integrations/trl.py), on CPU, one process.

A tiny Llama built from a config, a word-level tokenizer built offline, a whitelist reward. Each training run
records every ``_compute_loss`` call and, at the same parameters, recomputes

* grpo_ref's loss independently (a plain forward to logits, log-softmax, ``grpo_ref.compute_loss``, divided by
  the gradient-accumulation steps): value and gradient must equal what TRL back-propagated;
* TRL's own ``GRPOTrainer._compute_loss`` on the same inputs, with TRL's settings made equivalent to a second
  AlgoConfig: it must equal grpo_ref's loss for that config (the wiring to TRL's tensors is TRL's), and differ
  from the trainer's loss where the configs differ (k1 vs TRL's k3 KL).
"""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

import grpo_ref
from grpo_ref import LossInputs, compute_loss, get_preset
from grpo_ref.integrations.trl import check_algo_for_trl, grpo_ref_trainer_class

WORDS = ["<pad>", "<eos>", "<unk>", "a", "b", "c", "d", "e", "f", "g", "h"]
WHITELIST = {"a", "b", "c"}
PROMPTS = ["a b", "c d", "e f", "g h", "b c", "d e", "f g", "h a"]
GROUP = 4
GA = 2  # gradient accumulation steps: the loss is divided by it


def whitelist_reward(completions, **kwargs):
    """Share of the 4 completion slots holding a whitelisted word (deterministic, no eval)."""
    return [sum(w in WHITELIST for w in c.split()) / 4.0 for c in completions]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread while this module runs: the toy model's matrices are 32 wide, and on a busy 2-core
    machine OpenMP's thread hand-offs made each matmul ~100x slower than doing it on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny causal LM + tokenizer (TRL builds the reference model from the path) and a prompt set."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    dataset = Dataset.from_dict({"prompt": PROMPTS})
    return {"path": str(path), "tokenizer": tokenizer, "dataset": dataset}


def grpo_config(out, **overrides):
    from trl import GRPOConfig

    kwargs = dict(
        output_dir=str(out), use_cpu=True, bf16=False, report_to=[], max_steps=3, num_generations=GROUP,
        per_device_train_batch_size=4, gradient_accumulation_steps=GA, num_iterations=2,
        max_completion_length=4, logging_steps=1, save_strategy="no", beta=0.04, learning_rate=1e-2, seed=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


def independent_logp(model, inputs, temperature):
    """``[B, T]`` log-probs and entropies of the completion tokens from a plain forward (no fused head)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = inputs["completion_ids"].shape[1]
    logits = model(input_ids=ids, attention_mask=att).logits[:, -T - 1:-1].float() / temperature
    full = torch.log_softmax(logits, -1)
    logp = full.gather(-1, inputs["completion_ids"][..., None]).squeeze(-1)
    entropy = -(full.exp() * full).sum(-1)
    return logp, entropy


def train_recording(tiny, out, algo, same_as, trl_settings, **config):
    """Train ``max_steps`` with ``GRPORefTrainer(algo=algo)``; at every ``_compute_loss`` call record grpo_ref's
    independent recomputation (value, gradient) and TRL's own loss under ``trl_settings`` (which make TRL's loss
    the AlgoConfig ``same_as``)."""
    from trl import GRPOTrainer

    records = []

    class Recording(grpo_ref_trainer_class()):
        def _compute_loss(self, model, inputs):
            loss = super()._compute_loss(model, inputs)
            params = [p for p in model.parameters() if p.requires_grad]
            logp, entropy = independent_logp(model, inputs, self.args.temperature)
            old = inputs.get("old_per_token_logps")
            old = logp.detach() if old is None else old
            ours = independent_loss(self, inputs, logp, old, entropy, algo)
            same = independent_loss(self, inputs, logp, old, entropy, same_as)
            saved = {k: (getattr(self, k) if k != "use_bias_correction_kl" else self.args.use_bias_correction_kl)
                     for k in trl_settings}
            for k, v in trl_settings.items():
                setattr(self.args if k == "use_bias_correction_kl" else self, k, v)
            try:
                trl_own = GRPOTrainer._compute_loss(self, model, inputs)
            finally:
                for k, v in saved.items():
                    setattr(self.args if k == "use_bias_correction_kl" else self, k, v)
            records.append(dict(
                loss=loss.detach(), ours=ours.detach(), same=same.detach(), trl_own=trl_own.detach(),
                grad=torch.autograd.grad(loss, params, retain_graph=True),
                grad_ours=torch.autograd.grad(ours, params),
                max_log_ratio=float(((logp.detach() - old).abs() * inputs["completion_mask"]).max()),
            ))
            return loss

    trainer = Recording(
        model=tiny["path"], reward_funcs=whitelist_reward, args=grpo_config(out, **config),
        train_dataset=tiny["dataset"], processing_class=tiny["tokenizer"], algo=algo,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    return trainer, before, records


def independent_loss(trainer, inputs, logp, old, entropy, algo):
    """grpo_ref's loss for one micro-batch with TRL 1.16.0's accumulation convention: a per-minibatch
    normalisation divided by the accumulation steps; a global token mean over the generation batch's tokens
    rescaled to one optimizer step (``num_items_in_batch * GA / steps_per_generation``, one process)."""
    algo = algo_for(trainer, algo)
    ga = trainer.current_gradient_accumulation_steps
    extra, scale = {}, ga
    if algo.global_token_norm:
        extra["num_tokens"] = float(inputs["num_items_in_batch"]) * ga / trainer.args.steps_per_generation
        scale = 1
    inp = LossInputs(logp, old, inputs["advantages"], inputs["completion_mask"], inputs.get("ref_per_token_logps"),
                     entropy, **extra)
    return compute_loss(inp, algo)[0] / scale


def algo_for(trainer, algo):
    """``algo`` as the trainer would use it (``norm_length`` filled in)."""
    return check_algo_for_trl(algo, trainer.args)


RUNS = {
    # the trainer's loss: k1 KL, a dual clip and an entropy bonus over grpo's per-sequence token mean (TRL has
    # neither the k1 KL nor the dual clip); compared with TRL's loss_type="grpo" (k3) with its bias-corrected
    # KL off, i.e. the grpo preset
    "grpo_k1_dual_clip": dict(
        algo=get_preset("grpo", group_size=GROUP, kl_estimator="k1", dual_clip=3.0, ent_coef=0.01),
        same_as=get_preset("grpo", group_size=GROUP),
        trl_settings={"loss_type": "grpo", "use_bias_correction_kl": False},
        config={},
    ),
    # Dr. GRPO (no std, token sums over max_completion_length, no KL) against TRL's loss_type="dr_grpo"
    "dr_grpo": dict(
        algo=get_preset("dr_grpo", group_size=GROUP),
        same_as=get_preset("dr_grpo", group_size=GROUP),
        trl_settings={"loss_type": "dr_grpo"},
        config={"beta": 0.0, "scale_rewards": "none"},
    ),
    # TRL's default loss (loss_type="dapo": token sum over the generation batch's token count, KL times the
    # ratio) with DAPO's clip-higher, as grpo_ref's dapo preset with the global token normaliser; 4 micro-batches
    # per generation and 2 per optimizer step, so the normaliser's GA / steps_per_generation factor is 1/2
    "dapo_global_tokens": dict(
        algo=get_preset("dapo", group_size=GROUP, filter_groups=False, global_token_norm=True, kl_coef=0.04,
                        kl_ratio_weighted=True),
        same_as=get_preset("dapo", group_size=GROUP, filter_groups=False, global_token_norm=True, kl_coef=0.04,
                           kl_ratio_weighted=True),
        trl_settings={"epsilon_high": 0.28},
        config={"steps_per_generation": 4},
    ),
}


@pytest.fixture(scope="module", params=sorted(RUNS))
def run(request, tiny, tmp_path_factory):
    spec = RUNS[request.param]
    trainer, before, records = train_recording(
        tiny, tmp_path_factory.mktemp(request.param), spec["algo"], spec["same_as"], spec["trl_settings"],
        **spec["config"],
    )
    return dict(name=request.param, trainer=trainer, before=before, records=records, **spec)


def test_training_ran_and_moved_the_parameters(run):
    trainer, records = run["trainer"], run["records"]
    assert trainer.state.global_step == 3
    assert len(records) == 3 * GA  # one _compute_loss per micro-batch
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), run["before"][n])]
    assert changed, "no parameter changed"
    logged = [h for h in trainer.state.log_history if "grpo_ref/loss" in h]
    assert len(logged) == 3 and all("grpo_ref/pg_loss" in h for h in logged)
    # num_iterations=2: the second pass over a generation batch is off-policy (ratio != 1), so TRL supplied
    # old_per_token_logps and the clip could act
    assert max(r["max_log_ratio"] for r in records) > 1e-3


def test_the_loss_trl_optimised_is_grpo_refs(run):
    for r in run["records"]:
        torch.testing.assert_close(r["loss"], r["ours"].to(r["loss"].dtype), rtol=1e-5, atol=1e-6)
        for g, g_ours in zip(r["grad"], r["grad_ours"]):
            torch.testing.assert_close(g, g_ours, rtol=1e-4, atol=1e-6)


def test_trl_own_loss_on_the_same_inputs_is_grpo_refs_for_the_equivalent_config(run):
    for r in run["records"]:
        torch.testing.assert_close(r["trl_own"], r["same"].to(r["trl_own"].dtype), rtol=1e-5, atol=1e-6)


def test_trl_own_loss_differs_where_the_configs_differ(run):
    gap = max(float((r["loss"] - r["trl_own"]).abs()) for r in run["records"])
    if run["algo"] == run["same_as"]:  # TRL's code, under the equivalent settings, is the trainer's loss
        assert gap < 1e-5
    else:  # k1 vs k3 once the policy has left the reference (after the first optimizer step)
        assert gap > 1e-4


def test_dr_grpo_norm_length_is_max_completion_length(run):
    if run["name"] == "dr_grpo":
        assert run["trainer"].algo.norm_length == 4
    else:
        assert run["trainer"].algo == run["algo"]


@pytest.fixture(scope="module")
def base_config(tmp_path_factory):
    return grpo_config(tmp_path_factory.mktemp("config"))


def with_fields(config, **fields):
    """A copy of a built GRPOConfig with some attributes changed (building one takes about a second)."""
    out = copy.copy(config)
    for name, value in fields.items():
        assert hasattr(out, name), name
        setattr(out, name, value)
    return out


@pytest.mark.parametrize(
    "algo, config, field",
    [
        (get_preset("ppo"), {"num_generations": 2}, "algo.loss_fn"),
        (get_preset("rloo", group_size=GROUP), {"beta": 0.0}, "algo.adv_estimator"),
        (get_preset("grpo", group_size=GROUP, kl_placement="reward"), {}, "algo.kl_placement"),
        (get_preset("dapo", group_size=GROUP), {"beta": 0.0}, "algo.filter_groups"),
        (get_preset("grpo", group_size=GROUP, overlong_buffer=2, max_response_length=4), {}, "algo.overlong_buffer"),
        (get_preset("grpo", group_size=8), {}, "algo.group_size"),
        (get_preset("grpo", group_size=GROUP), {"scale_rewards": "batch"}, "algo.adv_scale"),
        (get_preset("grpo", group_size=GROUP), {"beta": 0.1}, "args.beta"),
        (get_preset("grpo", group_size=GROUP), {"epsilon": 0.3}, "args.epsilon"),
        (get_preset("grpo", group_size=GROUP), {"loss_type": "bnpo"}, "args.loss_type"),
        (get_preset("grpo", group_size=GROUP), {"use_bias_correction_kl": False}, "args.use_bias_correction_kl"),
        (get_preset("grpo", group_size=GROUP), {"entropy_coef": 0.01}, "args.entropy_coef"),
    ],
)
def test_settings_that_would_not_apply_are_refused(base_config, algo, config, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        check_algo_for_trl(algo, with_fields(base_config, **config))


def test_accepted_presets(base_config):
    for algo, config in [
        (get_preset("grpo", group_size=GROUP), {}),
        (get_preset("dr_grpo", group_size=GROUP), {"beta": 0.0, "scale_rewards": "none"}),
        (get_preset("dapo", group_size=GROUP, filter_groups=False), {"beta": 0.0}),
        (get_preset("gspo", group_size=GROUP), {"beta": 0.0}),
        (get_preset("grpo", group_size=GROUP, kl_estimator="k2", dual_clip=3.0), {}),
    ]:
        assert check_algo_for_trl(algo, with_fields(base_config, **config)).loss_fn == "grpo"


def test_the_trainer_refuses_a_critic_before_building_models(tiny, base_config):
    with pytest.raises(ValueError, match=r"algo\.loss_fn='ppo'"):
        grpo_ref_trainer_class()(
            model="/nonexistent", reward_funcs=whitelist_reward, args=with_fields(base_config, num_generations=2),
            train_dataset=tiny["dataset"], algo=get_preset("ppo"),
        )
    with pytest.raises(ValueError, match="algo is required"):
        grpo_ref_trainer_class()(model="/nonexistent", reward_funcs=whitelist_reward, args=base_config)


def test_importing_grpo_ref_integrations_does_not_import_trl():
    code = (
        "import sys, grpo_ref, grpo_ref.integrations, grpo_ref.integrations.trl\n"
        "heavy = sorted(m for m in ('trl', 'transformers', 'verl', 'datasets') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "assert 'grpo_ref.integrations.verl' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=grpo_ref.__path__[0] + "/..")


TWO_PROCESS_SCRIPT = '''
import json, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[3])
from datasets import Dataset
from transformers import PreTrainedTokenizerFast
from trl import GRPOTrainer
import test_integration_trl as t

spec = t.RUNS["dapo_global_tokens"]
records = []


class Recording(t.grpo_ref_trainer_class()):
    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        saved = {k: getattr(self, k) for k in spec["trl_settings"]}
        for k, v in spec["trl_settings"].items():
            setattr(self, k, v)
        try:
            trl_own = GRPOTrainer._compute_loss(self, model, inputs)
        finally:
            for k, v in saved.items():
                setattr(self, k, v)
        records.append([float(loss), float(trl_own), float(inputs["num_items_in_batch"]),
                        float(inputs["completion_mask"].sum())])
        return loss


trainer = Recording(
    model=sys.argv[1], reward_funcs=t.whitelist_reward, args=t.grpo_config(sys.argv[2], **spec["config"]),
    train_dataset=Dataset.from_dict({"prompt": t.PROMPTS}),
    processing_class=PreTrainedTokenizerFast.from_pretrained(sys.argv[1]), algo=spec["algo"],
)
trainer.train()
rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
with open(f"{sys.argv[2]}/rank{rank}.json", "w") as f:
    json.dump({"world": world, "records": records}, f)
'''


@pytest.mark.slow
def test_two_processes_match_trls_own_loss(tiny, tmp_path):
    """torchrun, 2 CPU processes (gloo): on each rank, the loss of GRPORefTrainer under grpo_ref's dapo preset
    with the global token normaliser equals TRL's own loss_type="dapo" on the same micro-batches; the token
    count is the generation batch's across both processes (about 40 s on a busy 2-core machine)."""
    import json
    import os

    script = tmp_path / "two_processes.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # the timeout is a hang guard, not a speed test: the two imports of TRL alone took 70 s at load 3.5
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         tiny["path"], str(tmp_path), str(os.path.dirname(__file__))],
        check=True, env=env, cwd=grpo_ref.__path__[0] + "/..", timeout=3600, capture_output=True,
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["world"] == 2 and len(rank["records"]) == 3 * GA
        for loss, trl_own, _, _ in rank["records"]:
            assert abs(loss - trl_own) <= 1e-5 * max(1.0, abs(trl_own))
    # num_items_in_batch is the token count of both processes' shares of the generation batch
    total = {records[2] for rank in ranks for records in rank["records"]}
    assert len(total) == 1
    local = [sum(rec[3] for rec in rank["records"][:4]) for rank in ranks]  # the first generation batch
    assert total == {sum(local)}
