"""A verifiable task for RL on a CPU: multi-digit addition, ``"12+34="`` -> ``"46"``, with a character tokenizer.

Why addition: the answer is checked exactly by a parser (a verifiable reward, as in DeepSeekMath/R1's math
rewards), prompts are unlimited, and a tiny transformer can learn it, but not from a few seconds of supervised
warm start: that leaves the policy right on some prompts and wrong on most, which is where RL has work to do.

The reward never evaluates model text. :func:`parse_answer` accepts only a canonical decimal integer (a
whitelist regex: digits, no sign, no leading zero, bounded length); ``"2**99"``, ``"__import__('os')"``,
``"1e9"`` or ``" 4"`` are rejected and score 0. (Reward functions that ``eval()`` model output can be made to
hang by ``9**9**9``; see the pitfalls chapter.)
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ._checks import check_bool, check_dim, check_ids, check_int, check_real, check_tensor


class CharTokenizer:
    """Character-level tokenizer: ids 0, 1, 2 are ``pad``, ``bos``, ``eos``; then one id per character."""

    #: Id of the padding token (left of prompts, right of responses), never a target.
    pad_id = 0
    #: Id of the begin-of-sequence token that starts every prompt.
    bos_id = 1
    #: Id of the end-of-sequence token that ends a well-formed response.
    eos_id = 2

    def __init__(self, chars: str = "0123456789+="):
        if not isinstance(chars, str) or not chars:
            raise ValueError(f"chars must be a non-empty str, got {chars!r}")
        if len(set(chars)) != len(chars):
            raise ValueError(f"chars must be distinct characters, got {chars!r}")
        self.chars = chars
        self.stoi = {ch: i + 3 for i, ch in enumerate(chars)}
        self.itos = {i: ch for ch, i in self.stoi.items()}

    @property
    def vocab_size(self) -> int:
        """The three special ids plus one per character."""
        return len(self.chars) + 3

    def encode(self, text: str) -> List[int]:
        """The ids of ``text``'s characters, no special token added; a character outside ``chars`` is a
        ``ValueError`` that lists the unknown ones."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        bad = sorted(set(text) - set(self.stoi))
        if bad:
            raise ValueError(f"characters {bad} are not in the vocabulary {self.chars!r}")
        return [self.stoi[ch] for ch in text]

    def decode(self, ids: Sequence[int], stop_at_eos: bool = True) -> str:
        """Characters of ``ids``; special ids are dropped, and decoding stops at the first EOS if asked."""
        out = []
        for i in (int(x) for x in ids):
            if i == self.eos_id and stop_at_eos:
                break
            if i in self.itos:
                out.append(self.itos[i])
        return "".join(out)


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, left: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(ids [N, W], mask [N, W])`` int64 of ``N >= 1`` token lists padded with ``pad_id`` to the longest, ``W``:
    on the left (prompts, so that every row ends where generation starts) or on the right (responses)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(list(r), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def teacher_forcing_batch(prompts: torch.Tensor, prompt_mask: torch.Tensor, targets: Sequence[Sequence[int]],
                          pad_id: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ``prompts [N, P]`` (with their mask) followed by the right-padded ``targets``: ``(input_ids,
    attention_mask, loss_mask)``, each ``[N, P + W]``; ``loss_mask`` is 1 on the target tokens only."""
    resp, rmask = pad_rows(targets, pad_id, left=False)
    return (torch.cat([prompts, resp], dim=1), torch.cat([prompt_mask, rmask], dim=1),
            torch.cat([torch.zeros_like(prompt_mask), rmask], dim=1))


def parse_answer(text: str, max_digits: int) -> Optional[int]:
    """The integer written in ``text`` if it is a canonical decimal of at most ``max_digits`` digits, else None.

    Whitelist, never ``eval``: ``0`` or ``[1-9][0-9]*``, nothing else (no sign, spaces, operators, exponents).
    A ``text`` that is not a str is not an answer (None); ``max_digits`` must be an int ``>= 1`` (``ValueError``).
    """
    check_int("max_digits", max_digits, lo=1)
    if not isinstance(text, str) or len(text) > max_digits:
        return None
    if re.fullmatch(r"0|[1-9][0-9]*", text) is None:
        return None
    return int(text)


@dataclass
class AdditionTask:
    """Addition of two ``n_digits``-digit numbers (``0 .. 10**n_digits - 1``), written without leading zeros.

    ``eval_size`` distinct pairs, drawn with ``seed``, form the eval split; training prompts are drawn from all
    other pairs, so the two splits are disjoint. ``format_reward`` is paid for a well-formed answer (digits then
    EOS) whether or not it is right; a correct answer gets ``1 + format_reward``.
    """

    n_digits: int = 2
    eval_size: int = 256
    seed: int = 0
    format_reward: float = 0.1
    zero_pad: bool = True  # operands written with n_digits digits ("07+35="): digits line up, learning is faster

    def __post_init__(self) -> None:
        check_int("n_digits", self.n_digits, lo=1, hi=6)
        n_pairs = self.base**2
        if not isinstance(self.eval_size, int) or isinstance(self.eval_size, bool) or not 0 < self.eval_size <= n_pairs // 2:
            raise ValueError(f"eval_size must be in [1, {n_pairs // 2}] (half of the {n_pairs} pairs), got {self.eval_size!r}")
        check_real("format_reward", self.format_reward, lo=0.0)
        check_int("seed", self.seed, lo=0)
        check_bool("zero_pad", self.zero_pad)
        self.tokenizer = CharTokenizer("0123456789+=")
        g = torch.Generator().manual_seed(self.seed)
        if n_pairs <= 1 << 22:
            idx = torch.randperm(n_pairs, generator=g)[: self.eval_size]
        else:
            idx = torch.unique(torch.randint(0, n_pairs, (2 * self.eval_size,), generator=g))
            idx = idx[torch.randperm(idx.numel(), generator=g)][: self.eval_size]
        self._eval_idx = idx.sort().values  # pair index a * base + b

    # -- sizes ---------------------------------------------------------------------------------------------------
    @property
    def base(self) -> int:
        """``10**n_digits``, one more than the largest operand."""
        return 10**self.n_digits

    @property
    def max_answer_digits(self) -> int:
        """Digits of the largest sum, ``n_digits + 1`` (a carry out of the top digit)."""
        return self.n_digits + 1

    @property
    def max_prompt_len(self) -> int:
        """BOS + two operands + '+' + '='."""
        return 1 + 2 * self.n_digits + 2

    @property
    def max_new_tokens(self) -> int:
        """The length of the longest correct response (the answer digits plus EOS)."""
        return self.max_answer_digits + 1

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size, the model's ``vocab_size``."""
        return self.tokenizer.vocab_size

    def to_dict(self) -> Dict:
        """The task's fields as a plain dict (``dataclasses.asdict``), as stored in a checkpoint's config."""
        return asdict(self)

    # -- prompts ---------------------------------------------------------------------------------------------------
    def sample_train(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``[n, 2]`` int64 operand pairs from the training split (never an eval pair), drawn with ``generator``
        (a ``torch.Generator``); ``n`` an int ``>= 1``."""
        check_int("n", n, lo=1)
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        idx = torch.randint(0, self.base**2, (n,), generator=generator)
        while True:
            clash = torch.isin(idx, self._eval_idx)
            if not clash.any():
                break
            idx[clash] = torch.randint(0, self.base**2, (int(clash.sum()),), generator=generator)
        return torch.stack([idx // self.base, idx % self.base], dim=-1)

    def eval_pairs(self) -> torch.Tensor:
        """``[eval_size, 2]`` the fixed eval split."""
        return torch.stack([self._eval_idx // self.base, self._eval_idx % self.base], dim=-1)

    def _check_pairs(self, pairs, name: str = "pairs") -> torch.Tensor:
        """``pairs: [N, 2]`` integer operands in ``[0, 10**n_digits)`` with ``N >= 1``, returned as int64."""
        check_tensor(name, pairs)
        check_dim(name, pairs, 2, "[N, 2]")
        if pairs.shape[0] == 0 or pairs.shape[1] != 2:
            raise ValueError(f"{name} must be [N, 2] with N >= 1, got shape {tuple(pairs.shape)}")
        pairs = check_ids(name, pairs)
        if int(pairs.min()) < 0 or int(pairs.max()) >= self.base:
            raise ValueError(f"{name} must hold operands in [0, {self.base}), got range [{int(pairs.min())}, {int(pairs.max())}]")
        return pairs

    def is_eval_pair(self, pairs: torch.Tensor) -> torch.Tensor:
        """``[N]`` bool: which pairs belong to the eval split."""
        pairs = self._check_pairs(pairs)
        return torch.isin(pairs[:, 0] * self.base + pairs[:, 1], self._eval_idx)

    def prompt_text(self, a: int, b: int) -> str:
        """``"a+b="`` (operands zero-padded to ``n_digits`` if ``zero_pad``); ints in ``[0, 10**n_digits)``."""
        check_int("a", a, lo=0, hi=self.base - 1)
        check_int("b", b, lo=0, hi=self.base - 1)
        if self.zero_pad:
            return f"{a:0{self.n_digits}d}+{b:0{self.n_digits}d}="
        return f"{a}+{b}="

    def encode_prompts(self, pairs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompts: ``(input_ids [N, P], attention_mask [N, P])``, each row ``BOS a + b =``.
        ``pairs``: ``[N, 2]`` integer operands in ``[0, 10**n_digits)``, ``N >= 1`` (``ValueError`` otherwise)."""
        pairs = self._check_pairs(pairs)
        rows = [[self.tokenizer.bos_id] + self.tokenizer.encode(self.prompt_text(int(a), int(b))) for a, b in pairs.tolist()]
        return pad_rows(rows, self.tokenizer.pad_id, left=True)

    def answer_ids(self, a: int, b: int) -> List[int]:
        """The target response: digits of ``a + b`` followed by EOS (``a, b`` ints in ``[0, 10**n_digits)``)."""
        check_int("a", a, lo=0, hi=self.base - 1)
        check_int("b", b, lo=0, hi=self.base - 1)
        return self.tokenizer.encode(str(a + b)) + [self.tokenizer.eos_id]

    # -- reward ----------------------------------------------------------------------------------------------------
    def score(self, pairs: torch.Tensor, responses: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Verifiable reward of sampled responses.

        Args:
            pairs: ``[N, 2]`` operands.
            responses: ``[N, L]`` response token ids (right-padded; may or may not contain EOS).
        Returns:
            ``(rewards [N] float32, correct [N] bool)``, the reward ``1 + format_reward`` if right, ``format_reward`` if a
            well-formed number ended by EOS but wrong, 0 otherwise (no EOS, a special or non-digit token inside).
        """
        pairs = self._check_pairs(pairs)
        check_tensor("responses", responses)
        check_dim("responses", responses, 2, "[N, L]")
        responses = check_ids("responses", responses, self.vocab_size)
        if pairs.shape[0] != responses.shape[0]:
            raise ValueError(f"pairs has {pairs.shape[0]} rows but responses has {responses.shape[0]}")
        tok = self.tokenizer
        rewards = torch.zeros(pairs.shape[0], dtype=torch.float32)
        correct = torch.zeros(pairs.shape[0], dtype=torch.bool)
        for i, (row, (a, b)) in enumerate(zip(responses.tolist(), pairs.tolist(), strict=False)):
            if tok.eos_id not in row:
                continue
            body = row[: row.index(tok.eos_id)]
            if any(t not in tok.itos for t in body):  # a pad or BOS inside the answer
                continue
            value = parse_answer(tok.decode(body), self.max_answer_digits)
            if value is None:
                continue
            correct[i] = value == a + b
            rewards[i] = self.format_reward + float(correct[i])
        return rewards, correct

    # -- supervised data -------------------------------------------------------------------------------------------
    def supervised_batch(self, pairs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt + correct answer + EOS for teacher forcing.

        Returns ``(input_ids [N, T], attention_mask [N, T], loss_mask [N, T])``: prompts left-padded, answers
        right-padded; ``loss_mask[i, t] = 1`` where ``input_ids[i, t]`` is an answer token (EOS included), so the
        logits at ``t - 1`` are trained to predict it. ``pairs`` as in :meth:`encode_prompts`.
        """
        pairs = self._check_pairs(pairs)
        prompts, pmask = self.encode_prompts(pairs)
        answers = [self.answer_ids(a, b) for a, b in pairs.tolist()]
        return teacher_forcing_batch(prompts, pmask, answers, self.tokenizer.pad_id)
