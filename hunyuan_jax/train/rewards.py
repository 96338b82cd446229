"""Verifiable rewards of GRPO (`train.grpo.reward`): a completion's text and its prompt record
in, a float out. Rewards read text; they never execute it.

Built in (the record's `grpo.answer_field`, default "answer", is the reference):
- "exact":   1.0 if the final answer equals the reference (both stripped), else 0.0;
- "regex":   1.0 if `grpo.pattern` is found in the completion (`re.search`), else 0.0;
- "numeric": 1.0 if the last number of the final answer is within `grpo.tolerance` of the
             reference's number, else 0.0.
The final answer is the last match of `grpo.answer_pattern`'s group 1 (e.g.
`"answer: *(\\S+)"`; 0.0 when it does not match), else the whole completion.

A user's reward is "module:function" (`package.module:fn`, importable from the working
directory or PYTHONPATH), called as fn(completion: str, record: dict) -> float. A module that
does not import, a missing function, a function that raises or returns something that is not a
finite number are `RewardError`s (exit 3) naming it, the record's file:line and the exception.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Mapping

from hunyuan_jax.errors import ConfigError, DataError

BUILTIN = ("exact", "regex", "numeric")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")

RewardFn = Callable[[str, Mapping], float]


class RewardError(DataError):
    """A reward could not be computed (a user function that raised, a record without the
    field a built-in reward reads); exit 3 like the other data errors."""


def final_answer(text: str, answer_pattern: re.Pattern | None) -> str | None:
    """The completion's final answer (see the module docstring); None if the pattern misses."""
    if answer_pattern is None:
        return text.strip()
    found = answer_pattern.findall(text)
    if not found:
        return None
    last = found[-1]
    return (last[0] if isinstance(last, tuple) else last).strip()


def last_number(text: str | None) -> float | None:
    if text is None:
        return None
    found = _NUMBER.findall(text.replace(",", ""))
    try:
        return float(found[-1]) if found else None
    except ValueError:
        return None


def _compile(pattern: str, key: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        msg = f"train key 'grpo.{key}': {pattern!r} is not a regular expression ({e})"
        raise ConfigError(msg) from None


def _user_fn(spec: str) -> RewardFn:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(
            f"train key 'grpo.reward' must be one of {BUILTIN} or 'module:function', got {spec!r}"
        )
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module's
        raise RewardError(
            f"reward {spec}: module {module!r} cannot be imported ({type(e).__name__}: {e}); "
            f"it must be importable: installed, on PYTHONPATH, or in the working directory "
            f"with `python -m hunyuan_jax.cli.train`"
        ) from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise RewardError(f"reward {spec}: module {module!r} has no function {name!r}")
    return fn


class Reward:
    """The run's reward: `reward(completion, record, where)` -> float (`where`: file:line)."""

    def __init__(self, gcfg):
        self.spec, self.field = gcfg.reward, gcfg.answer_field
        self.tolerance = gcfg.tolerance
        self.pattern = _compile(gcfg.pattern, "pattern") if gcfg.pattern else None
        self.answer = (
            _compile(gcfg.answer_pattern, "answer_pattern") if gcfg.answer_pattern else None
        )
        self.user = None if self.spec in BUILTIN else _user_fn(self.spec)

    @property
    def fields(self) -> tuple[str, ...]:
        """The record fields the reward needs (checked when the prompts are read)."""
        return (self.field,) if self.spec in ("exact", "numeric") else ()

    def __call__(self, completion: str, record: Mapping, where: str) -> float:
        if self.user is not None:
            try:
                value = self.user(completion, dict(record))
            except Exception as e:  # noqa: BLE001 - the user's function's failure, named
                raise RewardError(
                    f"reward {self.spec} raised on the prompt of {where}: {type(e).__name__}: {e}"
                ) from None
            try:
                out = float(value)
            except (TypeError, ValueError):
                out = math.nan
            if not math.isfinite(out):
                raise RewardError(
                    f"reward {self.spec} returned {value!r:.60} for the prompt of {where}: a "
                    f"finite number is needed"
                )
            return out
        if self.spec == "regex":
            return float(self.pattern.search(completion) is not None)
        answer = final_answer(completion, self.answer)
        ref = str(record[self.field])
        if self.spec == "exact":
            return float(answer is not None and answer == ref.strip())
        got, want = last_number(answer), last_number(ref)
        return float(got is not None and want is not None and abs(got - want) <= self.tolerance)
