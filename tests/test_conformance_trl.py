"""TRL 1.16.0's own code against grpo_ref through :func:`grpo_ref.compat.from_trl`.

Each test builds a real ``GRPOTrainer`` from a real ``GRPOConfig`` (a tiny Llama made from a config and saved to a
temporary directory, a WordLevel tokenizer built offline, a dataset of eight prompts; no network) and runs TRL's
functions on fixed float64 tensors:

* the loss: ``GRPOTrainer._compute_loss`` with its log-prob function (``_get_per_token_logps_and_entropies``) patched
  to return our ``logp`` and ``entropy`` (leaf tensors requiring grad); loss and d loss / d logp, d entropy are
  compared with :func:`grpo_ref.compute_loss` under ``from_trl(trainer.args).algo``;
* the advantages: ``GRPOTrainer._generate_and_score_completions`` with ``_generate`` patched to return fixed
  completions and ``_calculate_rewards`` patched to return fixed rewards per function (NaN = a function returned
  None, as TRL's ``_calculate_rewards`` converts it), against :func:`grpo_ref.compute_advantages` /
  :func:`grpo_ref.combine_rewards`;
* the schedule (``_prepare_inputs``), the sampling settings (``generation_config``, the temperature in the
  log-probs), the reference sync (``SyncRefModelCallback``) and the optimizer (``create_optimizer``).

The trainer attributes TRL derives from its config in ``__init__`` are TRL's own (a trainer per config: building one
takes about 10 ms); only ``current_gradient_accumulation_steps``, which TRL's training loop sets before each
micro-batch, is set here. Every test adds the :data:`~grpo_ref.compat.trl.FIELDS` rows it exercises to ``COVERED``;
the last test asserts that every "exact" or "mapped" row is covered.
"""
from __future__ import annotations

import functools
import math
import tempfile
from types import SimpleNamespace

import pytest
import torch

import transformers  # noqa: E402  (TRL is installed in the README's environment: a missing TRL is an error)
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.trainer.callbacks import SyncRefModelCallback  # noqa: E402

import grpo_ref  # noqa: E402
from grpo_ref import LossInputs, compute_advantages, compute_loss  # noqa: E402
from grpo_ref.compat import UnsupportedSetting  # noqa: E402
from grpo_ref.compat.trl import FIELDS, from_trl, to_trl  # noqa: E402

assert trl.__version__ == "1.16.0", trl.__version__

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecation notices

COVERED: set = set()
TOL = 1e-6
G = 4  # num_generations
B = 8  # completions per micro-batch (two groups)
P = 3  # prompt length
T = 6  # padded completion length of the fixed batches (max_completion_length is 8: dr_grpo must use 8, not T)
VOCAB = {"<pad>": 0, "<eos>": 1, "a": 2, "b": 3, "c": 4, "d": 5, "e": 6}


# -- the trainer -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir():
    """A tiny Llama saved to a temporary directory, so TRL can also build its reference model from it (beta > 0)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the toy model's tiny matmuls are far slower on several OpenMP threads of a busy CPU
    d = tempfile.mkdtemp(prefix="grpo_trl_model_")
    cfg = transformers.LlamaConfig(vocab_size=len(VOCAB), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    yield d
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    tk = Tokenizer(models.WordLevel(VOCAB, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")


def _reward_a(completions, **kwargs):
    return [1.0] * len(completions)


def _reward_b(completions, **kwargs):
    return [0.0] * len(completions)


@pytest.fixture(scope="module")
def make_trainer(model_dir, tokenizer):
    """``make_trainer(**GRPOConfig kwargs)``: a GRPOTrainer (cached per config) on the tiny model, CPU, float32."""
    out_dir = tempfile.mkdtemp(prefix="grpo_trl_out_")
    dataset = Dataset.from_dict({"prompt": ["a b c", "b c d", "c d e", "d e a"] * 2})

    @functools.lru_cache(maxsize=None)
    def build(items):
        kw = dict(items)
        n_rewards = kw.pop("_n_rewards", 2)
        base = dict(output_dir=out_dir, use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1,
                    per_device_train_batch_size=B, num_generations=G, max_completion_length=8,
                    model_init_kwargs={"dtype": torch.float32})
        base.update(kw)
        args = GRPOConfig(**base)
        return GRPOTrainer(model=model_dir, reward_funcs=[_reward_a, _reward_b][:n_rewards], args=args,
                           train_dataset=dataset, processing_class=tokenizer)

    return lambda **kw: build(tuple(sorted(kw.items(), key=lambda kv: kv[0])))


# -- fixed batches -----------------------------------------------------------------------------------------------
def _batch(seed: int, b: int = B, t: int = T, spread: float = 0.4):
    """A ragged float64 batch: ``mask`` (one empty row for some seeds), ``old``, ``logp = old + noise``, ``ref``,
    ``adv`` [b] (both signs), ``entropy``; padding holds finite garbage."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    if seed % 2:
        lengths[int(torch.randint(0, b, (1,), generator=g))] = 0
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3 - 0.05
    logp = old + spread * torch.randn(b, t, generator=g, dtype=torch.float64)
    ref = old + spread * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    entropy = torch.rand(b, t, generator=g, dtype=torch.float64) * 2
    return SimpleNamespace(mask=mask, old=old, logp=logp, ref=ref, adv=adv, entropy=entropy)


def trl_loss(trainer, batch, *, num_items=None, ga: int = 1):
    """TRL's ``_compute_loss`` on ``batch``: its log-prob function patched to return ``batch.logp`` / ``entropy``.
    Returns (loss, d loss/d logp, d loss/d entropy)."""
    logp = batch.logp.clone().requires_grad_(True)
    ent = batch.entropy.clone().requires_grad_(True)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logp, ent, None)
    trainer.model.train()  # TRL's training loop does this; _compute_loss reads model.training ("train" mode)
    trainer.current_gradient_accumulation_steps = ga  # set by TRL's training loop before each micro-batch
    b, t = batch.mask.shape
    inputs = {
        "prompt_ids": torch.full((b, P), 2), "prompt_mask": torch.ones(b, P, dtype=torch.long),
        "completion_ids": torch.full((b, t), 3), "completion_mask": batch.mask,
        "advantages": batch.adv, "old_per_token_logps": batch.old, "ref_per_token_logps": batch.ref,
        "num_items_in_batch": torch.tensor(float(batch.mask.sum()) if num_items is None else float(num_items)),
    }
    loss = trainer._compute_loss(trainer.model, inputs)
    g_lp, g_ent = torch.autograd.grad(loss, (logp, ent), allow_unused=True)
    return loss.detach(), _zero_if_none(g_lp, logp), _zero_if_none(g_ent, ent)


def ref_loss(algo, batch, *, num_tokens=None):
    """grpo_ref's compute_loss on the same batch; returns (loss, d loss/d logp, d loss/d entropy)."""
    logp = batch.logp.clone().requires_grad_(True)
    ent = batch.entropy.clone().requires_grad_(True)
    extra = {} if num_tokens is None else {"num_tokens": num_tokens}
    inp = LossInputs(logp=logp, old_logp=batch.old, advantages=batch.adv, mask=batch.mask, ref_logp=batch.ref,
                     entropy=ent, **extra)
    loss, _ = compute_loss(inp, algo)
    g_lp, g_ent = torch.autograd.grad(loss, (logp, ent), allow_unused=True)
    return loss.detach(), _zero_if_none(g_lp, logp), _zero_if_none(g_ent, ent)


def _zero_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


def _num_tokens(tr, batch):
    """LossInputs.num_tokens for a minibatch that is the whole generation batch (steps_per_generation == GA)."""
    return float(batch.mask.sum()) / tr.train["minibatches"] if getattr(tr.algo, "global_token_norm", False) else None


def assert_close(a, b, what):
    assert torch.allclose(a, b, atol=TOL, rtol=TOL), f"{what}: max |diff| = {float((a - b).abs().max()):.3g}"


def check_loss_case(make_trainer, seeds=(0, 1, 2), spread=0.4, **config):
    tr_obj = make_trainer(**config)
    tr = from_trl(tr_obj.args)  # the GRPOConfig object TRL itself runs with
    for seed in seeds:
        batch = _batch(seed, spread=spread)
        want = trl_loss(tr_obj, batch)
        got = ref_loss(tr.algo, batch, num_tokens=_num_tokens(tr, batch))
        for w, g_, what in zip(want, got, ("loss", "d loss / d logp", "d loss / d entropy")):
            assert_close(g_, w, f"{what}, seed {seed}, {config}")
    return tr


def covers(*rows):
    """Declare the FIELDS rows a test exercises (recorded at import, so the check also holds under pytest-xdist)."""
    known = {r.framework_field for r in FIELDS}
    missing = set(rows) - known
    assert not missing, f"not FIELDS rows: {missing}"

    def mark(fn):
        COVERED.update(rows)
        fn.trl_fields = rows
        return fn

    return mark


# -- the loss ----------------------------------------------------------------------------------------------------
CLIP_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


@covers("loss_type=grpo", "loss_type=bnpo", "loss_type=dr_grpo", "loss_type=dapo", "loss_type=luspo", "loss_type=cispo", "loss_type=sapo",
        "importance_sampling_level", "beta", "use_bias_correction_kl", "epsilon", "epsilon_high", "max_completion_length")
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", CLIP_TYPES + ("cispo", "sapo"))
def test_every_loss_type_and_ratio_level(make_trainer, loss_type, level):
    """Each loss_type at both importance-sampling levels, with the KL (beta 0.04, TRL's default bias-corrected KL)
    and clip-higher."""
    extra = {"epsilon_high": 5.0} if loss_type == "cispo" else {"epsilon_high": 0.28}
    check_loss_case(make_trainer, loss_type=loss_type, importance_sampling_level=level, beta=0.04, **extra)


@covers("beta", "use_bias_correction_kl", "loss_type=grpo", "epsilon", "importance_sampling_level")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_beta_and_bias_corrected_kl(make_trainer, beta, bias, level):
    check_loss_case(make_trainer, loss_type="grpo", beta=beta, use_bias_correction_kl=bias,
                    importance_sampling_level=level)


@covers("delta", "epsilon", "epsilon_high", "loss_type=grpo", "loss_type=dapo", "loss_type=dr_grpo")
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("delta", [1.1, 1.25, 1.5, 3.0])
def test_delta_below_and_above_one_plus_eps_high(make_trainer, loss_type, delta):
    """TRL's two-sided clip ``delta``: below 1 + eps_high (1.28) it lowers the upper clip too, above it it is a
    dual clip for negative advantages. Ratios spread widely (log-ratio noise 0.8) so every branch is hit."""
    tr = check_loss_case(make_trainer, spread=0.8, loss_type=loss_type, epsilon_high=0.28, delta=delta, beta=0.02)
    assert tr.algo.dual_clip == pytest.approx(max(delta, 1.28))
    assert tr.algo.eps_high == pytest.approx(min(0.28, delta - 1.0))


@covers("delta")
def test_delta_really_changes_trl_loss(make_trainer):
    """The delta cases above are not vacuous: TRL's loss with delta differs from the one without."""
    batch = _batch(3, spread=0.8)
    with_delta = trl_loss(make_trainer(loss_type="grpo", epsilon_high=0.28, delta=1.1), batch)[0]
    without = trl_loss(make_trainer(loss_type="grpo", epsilon_high=0.28), batch)[0]
    assert abs(float(with_delta - without)) > 1e-4


@covers("entropy_coef", "loss_type=grpo", "loss_type=bnpo", "loss_type=dr_grpo", "loss_type=dapo", "loss_type=luspo", "loss_type=cispo", "loss_type=sapo")
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "sapo", "cispo"])
def test_entropy_coef(make_trainer, loss_type):
    """TRL's entropy bonus is a token mean whatever the loss_type (grpo_ref ent_agg_mode='token-mean')."""
    extra = {"epsilon_high": 4.0} if loss_type == "cispo" else {}
    tr = check_loss_case(make_trainer, loss_type=loss_type, entropy_coef=0.05, **extra)
    assert tr.algo.ent_coef == 0.05


@covers("sapo_temperature_pos", "sapo_temperature_neg", "loss_type=sapo")
@pytest.mark.parametrize("pos,neg", [(1.0, 1.05), (0.5, 2.0)])
def test_sapo_temperatures(make_trainer, pos, neg):
    check_loss_case(make_trainer, loss_type="sapo", sapo_temperature_pos=pos, sapo_temperature_neg=neg, beta=0.04)


@covers("loss_type=cispo", "epsilon_high")
@pytest.mark.parametrize("eps_high", [1.2, 5.0])
def test_cispo_clamp(make_trainer, eps_high):
    """cispo: TRL clamps the ratio at epsilon_high (no lower bound); grpo_ref eps_high = epsilon_high - 1."""
    tr = check_loss_case(make_trainer, spread=0.6, loss_type="cispo", epsilon_high=eps_high)
    assert tr.algo.eps_low == 1.0 and tr.algo.eps_high == pytest.approx(eps_high - 1.0)


@covers("loss_type=dapo", "beta", "use_bias_correction_kl", "epsilon", "epsilon_high", "num_generations")
def test_trl_default_config(make_trainer, model_dir, tokenizer):
    """TRL's default GRPOConfig (only the machine settings and beta=0.04 changed: loss_type 'dapo', epsilon 0.2,
    use_bias_correction_kl True, max_completion_length 512, 8 generations) translated gives TRL's loss."""
    args = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="grpo_trl_default_"), use_cpu=True, bf16=False, report_to=[],
                      beta=0.04, model_init_kwargs={"dtype": torch.float32})
    trainer = GRPOTrainer(model=model_dir, reward_funcs=_reward_a, args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["a b"] * 8}), processing_class=tokenizer)
    tr = from_trl(args)
    assert args.loss_type == "dapo" and args.use_bias_correction_kl and tr.algo.kl_ratio_weighted
    for seed in range(3):
        batch = _batch(seed)
        want = trl_loss(trainer, batch)
        got = ref_loss(tr.algo, batch, num_tokens=_num_tokens(tr, batch))
        for w, g_, what in zip(want, got, ("loss", "d logp", "d entropy")):
            assert_close(g_, w, f"default config {what}, seed {seed}")


@covers("gradient_accumulation_steps", "steps_per_generation", "per_device_train_batch_size",
        "loss_type=grpo", "loss_type=bnpo", "loss_type=dr_grpo", "loss_type=dapo", "loss_type=luspo", "loss_type=cispo", "loss_type=sapo")
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "luspo", "cispo", "sapo", "bnpo"])
def test_gradient_accumulation_and_steps_per_generation(make_trainer, loss_type):
    """gradient_accumulation_steps=2, steps_per_generation=4: a generation batch of 4 micro-batches of 8, two
    optimizer steps (grpo_ref minibatches = 2). TRL's two micro-batch losses of one optimizer step, summed, equal
    grpo_ref's loss on the 16-row minibatch, dapo/cispo normalised by the generation batch's token count / 2.
    bnpo differs (a token mean per micro-batch), as its note says (so does the entropy bonus, a token mean per
    micro-batch in TRL: not used here)."""
    extra = {"epsilon_high": 3.0} if loss_type == "cispo" else {}
    trainer = make_trainer(loss_type=loss_type, gradient_accumulation_steps=2, steps_per_generation=4, beta=0.03,
                           **extra)
    tr = from_trl(trainer.args)
    assert tr.train["minibatches"] == 2 and tr.train["prompts_per_step"] == 4 * B // G
    gen = _batch(7, b=4 * B)  # the whole generation batch; its token count is TRL's num_items_in_batch
    n_items = float(gen.mask.sum())
    mb = _slice(gen, 0, 2 * B)  # the first optimizer step's minibatch
    parts = [trl_loss(trainer, _slice(gen, k * B, (k + 1) * B), num_items=n_items, ga=2) for k in range(2)]
    want = [parts[0][0] + parts[1][0]] + [torch.cat([parts[0][i], parts[1][i]]) for i in (1, 2)]
    num_tokens = n_items / tr.train["minibatches"] if getattr(tr.algo, "global_token_norm", False) else None
    got = ref_loss(tr.algo, mb, num_tokens=num_tokens)
    if loss_type == "bnpo":
        assert any("bnpo" in n for n in tr.notes)
        assert abs(float(got[0] - want[0])) > 1e-6  # the documented difference is real on ragged micro-batches
        same = [_slice(gen, 0, B), _slice(gen, 0, B)]  # equal token counts per micro-batch: equal
        same_mb = SimpleNamespace(**{k: torch.cat([getattr(same[0], k), getattr(same[1], k)]) for k in vars(gen)})
        parts = [trl_loss(trainer, s, num_items=n_items, ga=2) for s in same]
        assert_close(ref_loss(tr.algo, same_mb)[0], parts[0][0] + parts[1][0], "bnpo, equal token counts")
    else:
        for w, g_, what in zip(want, got, ("loss", "d logp", "d entropy")):
            assert_close(g_, w, f"{loss_type} {what}")


def _slice(b, lo, hi):
    return SimpleNamespace(**{k: v[lo:hi] for k, v in vars(b).items()})


@covers("loss_type=dr_grpo", "max_completion_length")
def test_dr_grpo_divides_by_max_completion_length_not_t(make_trainer):
    """The batches are padded to T = 6 < max_completion_length = 8: TRL divides by 8, and so does the translation."""
    tr = check_loss_case(make_trainer, loss_type="dr_grpo")
    assert tr.algo.norm_length == 8 and T < 8
    wrong = tr.algo.replace(norm_length=None)  # grpo_ref's default, the padded length
    batch = _batch(0)
    assert abs(float(ref_loss(wrong, batch)[0] - trl_loss(make_trainer(loss_type="dr_grpo"), batch)[0])) > 1e-6


@covers("loss_type=grpo")
def test_log_ratio_beyond_20_is_the_documented_difference(make_trainer):
    """TRL does not clamp ``lp - old``; grpo_ref clamps it at +-20 (a note of every translation). With a token at
    log-ratio 25 and a negative advantage TRL's loss is larger; TRL fed the clamped log-ratio (20) equals grpo_ref."""
    trainer = make_trainer(loss_type="grpo")
    tr = from_trl(trainer.args)
    assert any("clamp" in n for n in tr.notes)
    batch = _batch(0)
    batch.adv = -batch.adv.abs()
    batch.mask[0, 0] = 1
    far = SimpleNamespace(**vars(batch))
    far.logp = batch.logp.clone()
    far.logp[0, 0] = batch.old[0, 0] + 25.0
    at20 = SimpleNamespace(**vars(far))
    at20.old = batch.old.clone()
    at20.old[0, 0] = far.logp[0, 0] - 20.0
    trl_far, trl_20 = trl_loss(trainer, far)[0], trl_loss(trainer, at20)[0]
    ours = ref_loss(tr.algo, far)[0]
    assert float(trl_far) > float(ours) * 10
    assert_close(ours, trl_20, "grpo_ref at log-ratio 25 vs TRL at 20")


@covers("loss_type=vespo")
@covers("beta")
def test_kl_log_ratio_beyond_20_is_the_documented_difference(make_trainer):
    """TRL's k3 does not clamp ``ref - lp``; grpo_ref clamps it at +-20. At ref - lp = 25 TRL's KL value is larger;
    TRL fed ref - lp = 20 gives grpo_ref's value (the gradient differs: 0 through grpo_ref's active clamp)."""
    trainer = make_trainer(loss_type="grpo", beta=0.04)
    tr = from_trl(trainer.args)
    far = _batch(1)
    far.mask[0, 0] = 1
    far.ref = far.ref.clone()
    far.ref[0, 0] = far.logp[0, 0] + 25.0
    at20 = SimpleNamespace(**vars(far))
    at20.ref = far.ref.clone()
    at20.ref[0, 0] = far.logp[0, 0] + 20.0
    ours = ref_loss(tr.algo, far)[0]
    assert float(trl_loss(trainer, far)[0]) > float(ours) * 10
    assert_close(ours, trl_loss(trainer, at20)[0], "grpo_ref at ref - lp = 25 vs TRL at 20")


def test_vespo_is_refused_naming_loss_type(make_trainer):
    trainer = make_trainer(loss_type="vespo")  # TRL builds it: a real loss type of TRL 1.16.0
    with pytest.raises(UnsupportedSetting, match="loss_type") as e:
        from_trl(trainer.args)
    assert e.value.field_name == "loss_type"


# -- the advantages ----------------------------------------------------------------------------------------------
def trl_advantages(trainer, rewards_per_func, *, completion_ids=None):
    """TRL's ``_generate_and_score_completions`` on fixed completions and fixed rewards per function."""
    n = rewards_per_func.shape[0]
    prompt_ids = [[2, 3]] * n
    completion_ids = completion_ids or [[4, 5, 1]] * n
    trainer._generate = lambda prompts: (prompt_ids, completion_ids, None, ["x"] * n, None, {}, None, None)
    trainer._calculate_rewards = lambda *a, **k: rewards_per_func.clone()
    trainer.model.train()
    out = trainer._generate_and_score_completions([{"prompt": "a b"} for _ in range(n)])
    return out


def _rewards(seed, n=B, k=1, nan_frac=0.0, all_nan_rows=()):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n, k, generator=g, dtype=torch.float64).round(decimals=1)
    if nan_frac:
        r[torch.rand(n, k, generator=g) < nan_frac] = math.nan
    for i in all_nan_rows:
        r[i] = math.nan
    return r


@covers("scale_rewards", "num_generations")
@pytest.mark.parametrize("scale", ["group", "batch", "none", True, False])
def test_advantages_one_reward_function(make_trainer, scale):
    trainer = make_trainer(scale_rewards=scale, _n_rewards=1)
    tr = from_trl(trainer.args)
    assert tr.algo.adv_eps == 1e-4
    mask = torch.ones(B, 3)
    for seed in range(3):
        r = _rewards(seed)
        want = trl_advantages(trainer, r)["advantages"]
        got = compute_advantages(tr.algo, r[:, 0], mask)[0][:, 0]
        assert_close(got, want.to(got.dtype), f"scale {scale}, seed {seed}")


@covers("scale_rewards", "num_generations")
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_none_rewards(make_trainer, scale):
    """A completion every reward function scored None is unscorable: excluded from its group's mean/std, advantage 0."""
    trainer = make_trainer(scale_rewards=scale, _n_rewards=1)
    tr = from_trl(trainer.args)
    mask = torch.ones(B, 3)
    r = _rewards(4, all_nan_rows=(1, 6))
    want = trl_advantages(trainer, r)["advantages"]
    got = compute_advantages(tr.algo, r[:, 0], mask)[0][:, 0]
    assert_close(got, want.to(got.dtype), f"None rewards, scale {scale}")
    assert float(want[1]) == 0.0 and float(want[6]) == 0.0


@covers("reward_weights", "multi_objective_aggregation", "scale_rewards", "num_generations")
@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("weights", [None, (0.7, -1.5)])
def test_advantages_several_reward_functions(make_trainer, aggregation, scale, weights):
    """Two reward functions, some None (NaN) per function and one row None for both, weights and both
    multi_objective_aggregation values, against grpo_ref.combine_rewards."""
    trainer = make_trainer(scale_rewards=scale, multi_objective_aggregation=aggregation, reward_weights=weights)
    tr = from_trl(trainer.args)
    r = _rewards(5, k=2, nan_frac=0.2, all_nan_rows=(3,))
    want = trl_advantages(trainer, r)["advantages"]
    w = tr.train["reward_weights"]
    got = grpo_ref.combine_rewards(r, None if w is None else torch.tensor(w, dtype=torch.float64), tr.algo.group_size,
                                   aggregation=tr.train["reward_aggregation"], scale=tr.train["reward_scale"],
                                   eps=tr.algo.adv_eps)
    assert_close(got, want.to(got.dtype), f"{aggregation}, scale {scale}, weights {weights}")
    assert float(want[3]) == 0.0


@covers("mask_truncated_completions")
def test_mask_truncated_completions(make_trainer):
    """TRL zeroes the loss mask of a completion that ends without EOS and keeps its reward in the group statistics:
    grpo_ref's truncation='mask' (rollout: loss_mask = mask * ~truncated; advantages from all rewards)."""
    trainer = make_trainer(mask_truncated_completions=True, _n_rewards=1)
    tr = from_trl(trainer.args)
    assert tr.train["truncation"] == "mask"
    ids = [[4, 5, 1]] * B
    ids[2] = [4, 5, 6]  # no EOS: truncated
    r = _rewards(6)
    out = trl_advantages(trainer, r, completion_ids=ids)
    expected_mask = torch.ones(B, 3, dtype=torch.long)
    expected_mask[2] = 0
    assert torch.equal(out["completion_mask"].long(), expected_mask)
    got = compute_advantages(tr.algo, r[:, 0], torch.ones(B, 3))[0][:, 0]  # statistics over every completion
    assert_close(got, out["advantages"].to(got.dtype), "advantages with a truncated completion")
    keep = from_trl(make_trainer(_n_rewards=1).args)
    assert keep.train["truncation"] == "keep"


# -- the schedule, the sampler, the reference sync, the optimizer -----------------------------------------------
@covers("num_iterations", "steps_per_generation", "gradient_accumulation_steps", "per_device_train_batch_size")
@pytest.mark.parametrize("iters,spg,ga", [(1, 1, 1), (2, 4, 2), (3, 2, 1), (1, 4, 4)])
def test_update_schedule(make_trainer, iters, spg, ga):
    """TRL's ``_prepare_inputs``: one generation per steps_per_generation * num_iterations micro-steps, each
    generation batch split into steps_per_generation micro-batches of per_device_train_batch_size, each replayed
    num_iterations times; an optimizer step every gradient_accumulation_steps micro-steps. So per generation batch:
    ppo_epochs passes of minibatches optimizer steps, as the translation says."""
    trainer = make_trainer(num_iterations=iters, steps_per_generation=spg, gradient_accumulation_steps=ga)
    tr = from_trl(trainer.args)
    n = B * spg
    calls = []

    def fake_generate(batch):
        calls.append(len(batch))
        return {"row": torch.arange(n) + 1000 * len(calls)}

    trainer._generate_and_score_completions = fake_generate
    trainer._buffered_inputs = None
    trainer.model.train()
    seen = []
    steps = spg * iters * 2  # two generation batches
    for step in range(steps):
        trainer._step = step
        seen.append(trainer._prepare_inputs([{"prompt": "a"}] * n)["row"])
    assert len(calls) == 2 and calls == [n, n]
    assert tr.train["prompts_per_step"] * G == n
    per_gen = steps // 2
    assert per_gen // ga == tr.train["ppo_epochs"] * tr.train["minibatches"]  # optimizer steps per generation
    for k in range(2):
        rows = torch.cat(seen[k * per_gen:(k + 1) * per_gen])
        assert all(len(s) == B for s in seen[k * per_gen:(k + 1) * per_gen])
        counts = torch.bincount(rows - rows.min())
        assert torch.all(counts == tr.train["ppo_epochs"])  # every completion used ppo_epochs times


@covers("generation_batch_size")
def test_generation_batch_size(make_trainer):
    trainer = make_trainer(generation_batch_size=3 * B, gradient_accumulation_steps=1)
    tr = from_trl(trainer.args)
    assert trainer.args.steps_per_generation == 3
    assert tr.train["prompts_per_step"] == 3 * B // G and tr.train["minibatches"] == 3


@covers("temperature", "top_p", "top_k", "min_p", "max_completion_length")
def test_sampling_settings_reach_trl_generation_config(make_trainer):
    trainer = make_trainer(temperature=0.7, top_p=0.9, top_k=3, min_p=0.05, max_completion_length=5)
    tr = from_trl(trainer.args)
    gc = trainer.generation_config
    assert (gc.temperature, gc.top_p, gc.top_k, gc.min_p, gc.max_new_tokens) == (
        tr.train["temperature"], tr.train["top_p"], tr.train["top_k"], tr.train["min_p"], tr.train["max_new_tokens"])
    assert gc.repetition_penalty == 1.0
    off = from_trl(make_trainer().args).train
    assert (off["top_k"], off["top_p"], off["min_p"]) == (0, 1.0, 0.0)


@covers("temperature")
def test_temperature_in_trl_log_probs(make_trainer):
    """TRL's log-probs and entropies (its own forward, unpatched) are those of softmax(logits / temperature) over
    the full vocabulary: grpo_ref.token_logprobs / token_entropy with train['temperature']."""
    trainer = make_trainer(temperature=0.7, loss_type="grpo")
    tr = from_trl(trainer.args)
    model = trainer.model
    ids = torch.tensor([[2, 3, 4, 5, 6, 1], [3, 4, 2, 2, 5, 6]])
    attn = torch.ones_like(ids)
    keep = 3
    with torch.no_grad():
        lp, ent, _ = GRPOTrainer._get_per_token_logps_and_entropies(trainer, model, ids, attn, keep,
                                                                     compute_entropy=True)
        logits = model(input_ids=ids, attention_mask=attn).logits[:, -keep - 1:-1].double()
    want_lp = grpo_ref.token_logprobs(logits, ids[:, -keep:], temperature=tr.train["temperature"])
    want_ent = grpo_ref.token_entropy(logits, temperature=tr.train["temperature"])
    assert torch.allclose(lp.double(), want_lp, atol=1e-5) and torch.allclose(ent.double(), want_ent, atol=1e-5)
    assert not torch.allclose(lp.double(), grpo_ref.token_logprobs(logits, ids[:, -keep:]), atol=1e-3)


@covers("sync_ref_model", "ref_model_sync_steps", "ref_model_mixup_alpha")
def test_reference_sync(make_trainer):
    """TRL's SyncRefModelCallback: every ref_model_sync_steps optimizer steps ref <- alpha * policy + (1 - alpha) * ref:
    grpo_ref ref_sync_every / ref_sync_alpha."""
    trainer = make_trainer(beta=0.04, sync_ref_model=True, ref_model_sync_steps=3, ref_model_mixup_alpha=0.3)
    tr = from_trl(trainer.args)
    assert (tr.train["ref_sync_every"], tr.train["ref_sync_alpha"]) == (3, 0.3)
    cb = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SyncRefModelCallback))
    policy, ref = trainer.model, trainer.ref_model
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.1)
    expected = [r.detach().clone() for r in ref.parameters()]
    for step in range(1, 7):
        cb.on_step_end(trainer.args, SimpleNamespace(global_step=step), None, model=policy)
        if step % tr.train["ref_sync_every"] == 0:
            a = tr.train["ref_sync_alpha"]
            expected = [a * p.detach() + (1 - a) * e for p, e in zip(policy.parameters(), expected)]
        for r, e in zip(ref.parameters(), expected):
            assert torch.allclose(r, e, atol=1e-6), f"step {step}"
    assert from_trl(make_trainer().args).train["ref_sync_every"] == 0


@covers("learning_rate", "weight_decay")
def test_optimizer_settings(make_trainer):
    trainer = make_trainer(learning_rate=3e-4, weight_decay=0.01)
    tr = from_trl(trainer.args)
    opt = trainer.create_optimizer()
    decayed = [g for g in opt.param_groups if g["weight_decay"] > 0]
    assert all(g["lr"] == tr.train["lr"] for g in opt.param_groups)
    assert decayed and all(g["weight_decay"] == tr.train["weight_decay"] for g in decayed)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "gspo"])
def test_to_trl_output_is_a_valid_grpo_config(make_trainer, name):
    """to_trl's keyword arguments pass TRL's own GRPOConfig validation and a GRPOTrainer builds from them; the
    config object translates back as the dict does."""
    import warnings

    train = {"max_new_tokens": 8, "prompts_per_step": 4, "minibatches": 2, "ppo_epochs": 2, "temperature": 0.9}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # adv_eps / norm_length, tested in test_compat_trl
        kwargs = to_trl(grpo_ref.PRESETS[name].replace(group_size=G), train)
    kwargs.pop("beta")  # a reference model needs a path; beta is exercised above
    trainer = make_trainer(**kwargs)
    assert from_trl(trainer.args).algo == from_trl(kwargs).algo
    assert from_trl(trainer.args).train == from_trl(kwargs).train


# -- coverage ----------------------------------------------------------------------------------------------------
def test_every_exact_or_mapped_row_runs_trl_code():
    """Runs last in this module (pytest keeps file order): each 'exact'/'mapped' FIELDS row has a test above."""
    need = {r.framework_field for r in FIELDS if r.status in ("exact", "mapped")}
    assert not need - COVERED, f"FIELDS rows without a TRL conformance test: {sorted(need - COVERED)}"
