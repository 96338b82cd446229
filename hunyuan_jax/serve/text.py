"""One choice of a completion as the HTTP layer sees it: token events in, text deltas, finish
reason and OpenAI-style logprobs out.

Text is the decoding of all new tokens so far (EOS excluded, and with `skip_special`, vLLM's
default, every special token: a generated `<|pad|>` is no text), so multi-byte characters split
over tokens come out whole: a text ending in U+FFFD waits for the next token. Echoed prompts
and logprob token strings keep special tokens as written. A `stop` string
ends the choice (finish_reason 'stop', text cut before it); while a choice runs, its last
(longest stop - 1) characters are held back from the deltas, since they may begin a stop string.
"""

from __future__ import annotations


class Choice:
    def __init__(
        self,
        index: int,
        prompt: list[int],
        tok,
        stops: list[str],
        echo: bool,
        k=0,
        skip_special=True,
    ):
        self.index, self.prompt, self.tok = index, prompt, tok
        self.skip_special = skip_special
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.echo = echo
        self.k = k  # top alternatives wanted per position
        self.prefix = _decode(tok, prompt) if echo else ""
        self.ids: list[int] = []  # new tokens with text (EOS excluded)
        self.lps: list[tuple] = []  # (id, logprob, top) of each of them
        self.prompt_lps: list | None = None
        self.generated = 0  # new tokens, EOS included (usage)
        self.text = ""
        self.sent = 0
        self.prefix_sent = False
        self.lp_sent = 0
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.siblings: list[Choice] = [self]
        self.request = None  # its engine request (usage: prompt tokens served from cache)

    # ------------------------------------------------------------------ events
    def add(self, ev) -> str:
        """Takes one engine event; returns the new text to send (may be '')."""
        if self.finish_reason is not None:
            return ""
        if ev.kind == "prompt":
            self.prompt_lps = ev.prompt_logprobs
            return ""
        if ev.kind == "token":
            self.generated += 1
            if ev.eos:
                return ""
            self.ids.append(ev.token)
            self.lps.append((ev.token, ev.logprob, ev.top))
            self.text = _decode(self.tok, self.ids, self.skip_special)
            if self.stops:
                cut = self._stop_at(max(0, self.sent - self.hold))
                if cut is not None:
                    self.text = self.text[:cut]
                    self.finish_reason = "stop"
                    return self._delta(final=True)
            return self._delta(final=False)
        # done
        self.finish_reason = ev.finish_reason
        self.error = ev.error
        return self._delta(final=True)

    def _stop_at(self, start: int) -> int | None:
        found = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
        return min(found) if found else None

    def _delta(self, final: bool) -> str:
        upto = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):
                upto -= 1
            upto = max(self.sent, upto - self.hold)
        out = self.text[self.sent : upto]
        self.sent = upto
        if self.echo and not self.prefix_sent:
            self.prefix_sent = True
            out = self.prefix + out
        return out

    def full_text(self) -> str:
        return (self.prefix if self.echo else "") + self.text

    # ------------------------------------------------------------------ logprobs
    def _positions(self, delta_only: bool):
        """(token id, logprob or None, top [(id, lp)] or None) of every position to report."""
        gen = self.lps
        if delta_only:
            gen, self.lp_sent = self.lps[self.lp_sent :], len(self.lps)
        out = []
        if self.echo and self.prompt_lps is not None and (not delta_only or not self._echoed):
            self._echoed = True
            for t, entry in zip(self.prompt, self.prompt_lps):
                out.append((t, None, None) if entry is None else (t, entry[0], entry[1]))
        return out + list(gen)

    _echoed = False

    def completion_logprobs(self, tok, delta_only: bool = False) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        offset = 0
        for t, lp, top in self._positions(delta_only):
            s = _decode(tok, [t])
            tokens.append(s)
            lps.append(lp)
            tops.append(None if top is None else {_decode(tok, [i]): v for i, v in top[: self.k]})
            offsets.append(offset)
            offset += len(s)
        return {
            "tokens": tokens,
            "token_logprobs": lps,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def chat_logprobs(self, tok, delta_only: bool = False) -> dict:
        def entry(i, lp):
            s = _decode(tok, [i])
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        content = []
        for t, lp, top in self._positions(delta_only):
            e = entry(t, lp)
            e["top_logprobs"] = [entry(i, v) for i, v in (top or [])[: self.k]]
            content.append(e)
        return {"content": content}


def _decode(tok, ids, skip_special: bool = False) -> str:
    try:
        return tok.decode(list(ids), skip_special_tokens=skip_special)
    except ValueError:
        return ""
