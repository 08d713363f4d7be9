"""A verifiable task whose responses may be short or long: the sum of a few digits, with an optional scratchpad.

The prompt is ``"3+5+2+4="``; the response is one or more numbers separated by ``;`` and ended by EOS, and only
the last number is the answer. ``"14"`` and ``"8;10;14"`` (the running sums) are both right, and so is
``"14;14;14;14"`` (the outcome reward checks the answer, not the steps: :meth:`ChainSumTask.process_rewards` scores
those); ``"8;10;15"`` and ``"1;2;3;4;5;6;7;8;9"`` are well-formed and wrong. So the length of a response is the
policy's choice, from 2 tokens to the sampling budget, and a wrong answer can be as long as a right one: the
setting in which the length biases of a loss's normalisation show (Dr. GRPO, Liu et al. 2025, sec. 3.1) and
which 2-digit addition, with its 3-4-token answers, cannot show.

The warm start sees both forms: a fixed share of the problems (``chain_fraction``) is taught with the running
sums, the others with the answer alone. Whether the scratchpad helps is for RL to find out.

Rewards are parsed from a whitelist, never evaluated: digits and ``;`` only, every number canonical (``0`` or
``[1-9][0-9]*``, at most :attr:`ChainSumTask.max_answer_digits` digits). The steps of a response give natural
process rewards (:meth:`ChainSumTask.process_rewards`, for :func:`grpo_ref.advantages.process_advantages`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import torch

from ._checks import check_dim, check_ids, check_int, check_real, check_tensor
from .tasks import CharTokenizer, pad_rows, parse_answer, teacher_forcing_batch

PAD = -1  # problems are right-padded with this value where a problem has fewer than max_terms terms


@dataclass
class ChainSumTask:
    """Sum of ``min_terms .. max_terms`` digits (0-9), answered directly or after a scratchpad of running sums.

    Problems are ``[N, max_terms]`` int64 tensors: the digits of each problem, then ``-1`` padding. The number
    of terms is uniform over ``min_terms .. max_terms`` and the digits uniform. ``eval_size`` distinct problems,
    drawn with ``seed``, form the eval split; training problems never include them. A well-formed response
    (numbers joined by ``;``, then EOS) earns ``format_reward``, a right final number ``1`` more.
    ``max_response_tokens`` is the sampling budget (``max_new_tokens``): a response without EOS within it scores 0.
    """

    min_terms: int = 3
    max_terms: int = 5
    eval_size: int = 256
    seed: int = 0
    format_reward: float = 0.1
    chain_fraction: float = 0.5
    max_response_tokens: int = 32

    def __post_init__(self) -> None:
        check_int("min_terms", self.min_terms, lo=2, hi=8)
        check_int("max_terms", self.max_terms, lo=self.min_terms, hi=8)
        n_problems = sum(10**k for k in range(self.min_terms, self.max_terms + 1))
        check_int("eval_size", self.eval_size, lo=1, hi=min(4096, n_problems // 4))
        check_int("seed", self.seed, lo=0)
        check_real("format_reward", self.format_reward, lo=0.0)
        check_real("chain_fraction", self.chain_fraction, lo=0.0, hi=1.0)
        longest = 2 * self.max_terms * self.max_answer_digits  # a full chain fits with room to spare
        check_int("max_response_tokens", self.max_response_tokens, lo=longest, hi=256)
        self.tokenizer = CharTokenizer("0123456789+=;")
        g = torch.Generator().manual_seed(self.seed)
        ids = torch.empty(0, dtype=torch.long)
        while ids.numel() < self.eval_size:  # distinct problems, drawn as the training problems are
            ids = torch.unique(torch.cat([ids, self.problem_ids(self._draw(4 * self.eval_size, g))]))
        self._eval_ids = ids[torch.randperm(ids.numel(), generator=g)[: self.eval_size]].sort().values

    # -- sizes ---------------------------------------------------------------------------------------------------
    @property
    def max_answer_digits(self) -> int:
        """Digits of the largest sum, ``9 * max_terms``."""
        return len(str(9 * self.max_terms))

    @property
    def max_prompt_len(self) -> int:
        """BOS, the digits, the ``+`` between them and ``=``."""
        return 2 * self.max_terms + 1

    @property
    def max_new_tokens(self) -> int:
        """The sampling budget, ``max_response_tokens``: room for a full chain of partial sums and EOS."""
        return self.max_response_tokens

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (digits, ``+``, ``=``, ``;`` and the three special ids)."""
        return self.tokenizer.vocab_size

    def to_dict(self) -> Dict:
        """The task's fields as a plain dict (``dataclasses.asdict``), as stored in a checkpoint's config."""
        return asdict(self)

    # -- problems --------------------------------------------------------------------------------------------------
    def _draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.randint(self.min_terms, self.max_terms + 1, (n, 1), generator=generator)
        digits = torch.randint(0, 10, (n, self.max_terms), generator=generator)
        return torch.where(torch.arange(self.max_terms) < k, digits, torch.full_like(digits, PAD))

    def problem_ids(self, problems: torch.Tensor) -> torch.Tensor:
        """``[N]`` int64: a different integer for every problem (base 11, padding as 0)."""
        problems = self._check_problems(problems)
        weights = 11 ** torch.arange(self.max_terms, dtype=torch.long)
        return ((problems + 1) * weights).sum(-1)

    def sample_train(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``[n, max_terms]`` training problems (never an eval problem), drawn with ``generator``."""
        check_int("n", n, lo=1)
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        problems = self._draw(n, generator)
        while True:
            clash = torch.isin(self.problem_ids(problems), self._eval_ids)
            if not clash.any():
                return problems
            problems[clash] = self._draw(int(clash.sum()), generator)

    def eval_pairs(self) -> torch.Tensor:
        """``[eval_size, max_terms]`` the fixed eval split (named as :meth:`~grpo_ref.tasks.AdditionTask.eval_pairs`, which the
        trainer calls)."""
        weights = 11 ** torch.arange(self.max_terms, dtype=torch.long)
        return (self._eval_ids[:, None] // weights % 11) - 1

    def _check_problems(self, problems, name: str = "problems") -> torch.Tensor:
        check_tensor(name, problems)
        check_dim(name, problems, 2, "[N, max_terms]")
        if problems.shape[0] == 0 or problems.shape[1] != self.max_terms:
            raise ValueError(f"{name} must be [N, {self.max_terms}] with N >= 1, got shape {tuple(problems.shape)}")
        problems = check_ids(name, problems)  # integer dtype, as int64
        present = problems >= 0
        n_terms = present.sum(-1)
        if int(problems.min()) < PAD or int(problems.max()) > 9 or bool((present[:, 1:] & ~present[:, :-1]).any()):
            bad = int(((problems < PAD) | (problems > 9)).any(-1).logical_or((present[:, 1:] & ~present[:, :-1]).any(-1))
                      .nonzero()[0, 0])
            raise ValueError(f"{name} must hold digits 0-9 followed by {PAD} padding, got row {bad}: "
                             f"{problems[bad].tolist()}")
        if int(n_terms.min()) < self.min_terms:
            raise ValueError(f"{name} must have at least min_terms={self.min_terms} terms per row, "
                             f"got a row with {int(n_terms.min())}")
        return problems

    @staticmethod
    def terms(problem: List[int]) -> List[int]:
        """The digits of one problem row, its padding dropped."""
        return [d for d in problem if d != PAD]

    def prompt_text(self, problem: List[int]) -> str:
        """``"d1+d2+...="`` for one problem row."""
        return "+".join(str(d) for d in self.terms(problem)) + "="

    def encode_prompts(self, problems: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompts ``(input_ids [N, P], attention_mask [N, P])``, each row ``BOS d1 + d2 + ... =``."""
        problems = self._check_problems(problems)
        rows = [[self.tokenizer.bos_id] + self.tokenizer.encode(self.prompt_text(p)) for p in problems.tolist()]
        return pad_rows(rows, self.tokenizer.pad_id, left=True)

    # -- responses -------------------------------------------------------------------------------------------------
    @staticmethod
    def running_sums(problem: List[int]) -> List[int]:
        """The scratchpad of a problem: the sums of its first 2, 3, ... terms (the last one is the answer)."""
        terms = ChainSumTask.terms(problem)
        return [sum(terms[: j + 1]) for j in range(1, len(terms))]

    def uses_chain(self, problems: torch.Tensor) -> torch.Tensor:
        """``[N]`` bool: the problems whose warm-start target is the full chain (a fixed hash of the problem, so
        the same problem is always taught the same way and about ``chain_fraction`` of them use the chain)."""
        h = (self.problem_ids(problems) * 2654435761) % (1 << 32)
        return h.double() / float(1 << 32) < self.chain_fraction

    def answer_ids(self, problem: List[int], chain: bool) -> List[int]:
        """The warm-start target of ``problem`` (a list of digits and padding): running sums or answer, then EOS."""
        numbers = self.running_sums(problem) if chain else [sum(self.terms(problem))]
        return self.tokenizer.encode(";".join(map(str, numbers))) + [self.tokenizer.eos_id]

    def parse_response(self, ids: List[int]) -> Optional[Tuple[List[int], List[int]]]:
        """``(numbers, ends)`` of a response's token ids, or None if it is not well-formed: EOS present, before
        it only digits and ``;``, every number canonical. ``ends[j]`` is the index of the token that closes
        number ``j`` (its ``;``, or the EOS)."""
        tok = self.tokenizer
        if tok.eos_id not in ids:
            return None
        body = ids[: ids.index(tok.eos_id)]
        if any(t not in tok.itos for t in body):
            return None
        text = tok.decode(body)
        numbers = [parse_answer(part, self.max_answer_digits) for part in text.split(";")]
        if any(n is None for n in numbers):  # also "", ";" at either end, "+" or "=" inside
            return None
        ends = [i for i, t in enumerate(body) if t == tok.stoi[";"]] + [len(body)]
        return [int(n) for n in numbers if n is not None], ends

    def _check_responses(self, problems, responses) -> Tuple[torch.Tensor, torch.Tensor]:
        problems = self._check_problems(problems)
        check_tensor("responses", responses)
        check_dim("responses", responses, 2, "[N, L]")
        responses = check_ids("responses", responses, self.vocab_size)
        if problems.shape[0] != responses.shape[0]:
            raise ValueError(f"problems has {problems.shape[0]} rows but responses has {responses.shape[0]}")
        return problems, responses

    def score(self, problems: torch.Tensor, responses: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Outcome reward: ``(rewards [N] float32, correct [N] bool)``; ``responses [N, L]`` right-padded ids.
        ``1 + format_reward`` if the last number is the sum, ``format_reward`` if well-formed but wrong, else 0."""
        problems, responses = self._check_responses(problems, responses)
        rewards = torch.zeros(problems.shape[0], dtype=torch.float32)
        correct = torch.zeros(problems.shape[0], dtype=torch.bool)
        for i, (row, problem) in enumerate(zip(responses.tolist(), problems.tolist(), strict=True)):
            parsed = self.parse_response(row)
            if parsed is None:
                continue
            correct[i] = parsed[0][-1] == sum(self.terms(problem))
            rewards[i] = self.format_reward + float(correct[i])
        return rewards, correct

    def process_rewards(self, problems: torch.Tensor, responses: torch.Tensor
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-step rewards for :func:`~grpo_ref.advantages.process_advantages`: ``(step_rewards [N, S] float32,
        step_ends [N, S] int64, step_mask [N, S] float32)``, ``S`` the most steps in a response.

        Step ``j`` of a well-formed response is its ``j``-th number, ending at the token that closes it. The last
        step is right (1) if it is the sum; an earlier step ``j`` if it is the ``j``-th running sum (steps
        beyond the scratchpad's length are 0). A malformed response is one step of reward 0 ending at its last
        token, so that its tokens still get an advantage."""
        problems, responses = self._check_responses(problems, responses)
        per_row = []
        for row, problem in zip(responses.tolist(), problems.tolist(), strict=True):
            parsed = self.parse_response(row)
            if parsed is None:
                per_row.append(([0.0], [len(row) - 1]))
                continue
            numbers, ends = parsed
            chain = self.running_sums(problem)
            rewards = [float(j < len(chain) - 1 and n == chain[j]) for j, n in enumerate(numbers[:-1])]
            rewards.append(float(numbers[-1] == chain[-1]))
            per_row.append((rewards, ends))
        s = max(len(r) for r, _ in per_row)
        step_rewards = torch.zeros(len(per_row), s)
        step_ends = torch.zeros(len(per_row), s, dtype=torch.long)
        step_mask = torch.zeros(len(per_row), s)
        for i, (r, e) in enumerate(per_row):
            step_rewards[i, : len(r)] = torch.tensor(r)
            step_ends[i, : len(e)] = torch.tensor(e)
            step_mask[i, : len(r)] = 1.0
        return step_rewards, step_ends, step_mask

    # -- supervised data -------------------------------------------------------------------------------------------
    def supervised_batch(self, problems: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt + target + EOS for teacher forcing, ``(input_ids [N, T], attention_mask [N, T], loss_mask [N, T])``
        as :meth:`AdditionTask.supervised_batch <grpo_ref.tasks.AdditionTask.supervised_batch>`; the target is the
        chain or the bare answer, as :meth:`uses_chain` chooses."""
        problems = self._check_problems(problems)
        prompts, pmask = self.encode_prompts(problems)
        chain = self.uses_chain(problems).tolist()
        targets = [self.answer_ids(p, c) for p, c in zip(problems.tolist(), chain, strict=True)]
        return teacher_forcing_batch(prompts, pmask, targets, self.tokenizer.pad_id)


__all__ = ["ChainSumTask", "PAD"]
